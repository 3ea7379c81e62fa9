"""A full check of a dataset: every record read, parsed, decoded and its label range-checked.

Used by `pfc data inspect`. Unlike the training reader it does not stop at the first problem: it
lists every bad record by file and record index, and compares counts with the manifest.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from pipelines import reader, schema


@dataclasses.dataclass(frozen=True)
class BadRecord:
    file: str
    index: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.index}: {self.reason}"


@dataclasses.dataclass
class Report:
    directory: str
    manifest: schema.Manifest
    files: list[str]
    records: int = 0
    label_counts: np.ndarray | None = None  # int64 [num_classes]
    bad: list[BadRecord] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)  # count mismatches

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems

    def summary(self) -> str:
        m, counts = self.manifest, self.label_counts
        present = counts[counts > 0]
        lines = [
            f"dataset     {self.directory}",
            f"shards      {len(self.files)} read of {len(m.shards)} in the manifest",
            f"records     {self.records} read ({m.num_examples} in the manifest)",
            f"classes     {m.num_classes} in the manifest, {present.size} with images",
            f"image size  {m.image_size[0]}x{m.image_size[1]}",
        ]
        if present.size:
            lines.append(
                f"per class   min {present.min()}  median {int(np.median(present))}  "
                f"mean {present.mean():.1f}  max {present.max()}  "
                f"(classes without images: {m.num_classes - present.size})"
            )
        if m.verification:
            lines.append(f"verification {', '.join(m.verification)}")
        lines += [f"PROBLEM {p}" for p in self.problems] + [f"CORRUPT {b}" for b in self.bad]
        lines.append(
            "ok" if self.ok else f"FAILED: {len(self.bad)} bad record(s), {len(self.problems)} other problem(s)"
        )
        return "\n".join(lines)


def inspect(path: str, decode: bool = True) -> Report:
    """Read everything under `path` (a dataset directory, manifest, shard file or glob)."""
    directory, manifest, files, expected = reader.resolve(path)
    report = Report(directory, manifest, files, label_counts=np.zeros(manifest.num_classes, np.int64))
    for f, n in zip(files, expected):
        got = _check_file(f, n, manifest.num_classes, decode, report)
        if got != n:
            report.problems.append(f"{f}: {got} records readable, the manifest lists {n}")
    return report


def _check_file(path: str, expected: int, num_classes: int, decode: bool, report: Report) -> int:
    it = iter(tf.data.TFRecordDataset(path))
    index = 0
    while True:
        try:
            serialized = next(it).numpy()
        except StopIteration:
            return index
        except tf.errors.OpError as e:
            rest = f"; records {index}..{expected - 1} cannot be reached" if index < expected else ""
            report.bad.append(BadRecord(path, index, f"unreadable ({schema.first_line(e)}){rest}"))
            return index
        reason = _check_record(serialized, num_classes, decode, report)
        if reason:
            report.bad.append(BadRecord(path, index, reason))
        report.records += 1
        index += 1


def _check_record(serialized: bytes, num_classes: int, decode: bool, report: Report) -> str | None:
    try:
        feats = tf.train.Example.FromString(serialized).features.feature
    except Exception as e:  # protobuf's DecodeError and friends
        return f"not a tf.train.Example ({type(e).__name__})"
    image, label = feats.get(schema.IMAGE_KEY), feats.get(schema.LABEL_KEY)
    if image is None or len(image.bytes_list.value) != 1:
        return f"missing or malformed {schema.IMAGE_KEY}"
    if label is None or len(label.int64_list.value) != 1:
        return f"missing or malformed {schema.LABEL_KEY}"
    y = label.int64_list.value[0]
    if not 0 <= y < num_classes:
        return f"label {y} outside [0, {num_classes})"
    report.label_counts[y] += 1
    if decode:
        try:
            tf.io.decode_jpeg(image.bytes_list.value[0], channels=3)
        except tf.errors.InvalidArgumentError as e:
            return f"undecodable JPEG ({schema.first_line(e)})"
    return None
