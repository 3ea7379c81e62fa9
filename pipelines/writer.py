"""Sharded, atomic TFRecord writing.

Each shard is written under a hidden temporary name and renamed to `PREFIX-0000k-of-0000S.tfrecord`
only when complete, so a final name always means a complete shard. The manifest is written last.
An interrupted run leaves complete shards, maybe a stale temporary file, and no manifest; running
the same job again with `resume=True` keeps the complete shards (counting their records) and
writes the rest, and with `resume=False` rewrites everything. "The same job" is checked: a hidden
`.PREFIX-job.json` records the job's description (source, sizes, seeds) and the layout, and a
run with another description rewrites every shard instead of mixing old shards into a new set.
Works on local paths and on object storage (tf.io.gfile; rename on S3 is copy + delete, still
never a half-written final name).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable

import tensorflow as tf

from pipelines import schema, storage


@dataclasses.dataclass(frozen=True)
class Record:
    """One image to write: JPEG bytes, label, optional identity name and source."""

    image: bytes
    label: int
    name: str = ""
    source: str = ""


def write_sharded(
    out_dir: str,
    num_shards: int,
    shard_records: Callable[[int], Iterable[Record]],
    *,
    num_classes: int,
    image_size: tuple[int, int],
    prefix: str = "train",
    resume: bool = True,
    verification: list[str] | None = None,
    job: dict | None = None,
    log: Callable[[str], None] | None = None,
    skipped: list[dict] | None = None,
) -> schema.Manifest:
    """Write shards 0..num_shards-1 (`shard_records(k)` yields shard k's records), then the manifest.

    `shard_records(k)` must yield the same records on every call (resume relies on it); `job`
    describes what is written (JSON-serializable), so that a resume never keeps another job's shards.
    Labels are checked against `num_classes` before anything is renamed into place. `skipped`: the
    source files left out, listed in the manifest.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    storage.prepare(out_dir)
    tf.io.gfile.makedirs(out_dir)
    _remove_stale_temps(out_dir, prefix)
    names = [schema.shard_name(prefix, k, num_shards) for k in range(num_shards)]
    _remove_other_layouts(out_dir, prefix, num_shards)
    job_path = storage.join(out_dir, f".{prefix}-job.json")
    job_text = json.dumps(
        {"job": job, "num_shards": num_shards, "num_classes": num_classes, "image_size": list(image_size)},
        sort_keys=True,
    )
    if resume and not (tf.io.gfile.exists(job_path) and _read_text(job_path) == job_text):
        resume = False
        if log and tf.io.gfile.glob(storage.join(out_dir, f"{prefix}-*-of-*.tfrecord")):
            log(f"{out_dir}: existing shards are from another job; rewriting all")
    if not resume and tf.io.gfile.exists(schema.manifest_path(out_dir)):
        tf.io.gfile.remove(schema.manifest_path(out_dir))
    schema.write_atomic(job_path, job_text.encode("utf-8"))
    counts = []
    for k, name in enumerate(names):
        path = storage.join(out_dir, name)
        if resume and tf.io.gfile.exists(path):
            counts.append(count_records(path))
            if log:
                log(f"{path}: complete, kept ({counts[-1]} records)")
            continue
        counts.append(write_shard(path, shard_records(k), num_classes))
        if log:
            log(f"{path}: {counts[-1]} records")
    manifest = schema.Manifest(
        num_classes=num_classes,
        image_size=tuple(image_size),
        shards=names,
        examples_per_shard=counts,
        verification=list(verification or []),
        skipped=list(skipped or []),
    )
    manifest.save(out_dir)
    return manifest


def write_shard(path: str, records: Iterable[Record], num_classes: int) -> int:
    """Write one shard atomically; returns its record count. On any error the temp file is removed."""
    tmp = schema.temp_name(path)
    n = 0
    try:
        with tf.io.TFRecordWriter(tmp) as w:
            for n, r in enumerate(records, start=1):  # noqa: B007 (n: the count, read after the loop)
                if not 0 <= r.label < num_classes:
                    raise schema.DataError(f"{r.source or path}: label {r.label} outside [0, {num_classes})")
                w.write(schema.encode_example(r.image, r.label, r.name, r.source))
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise
    return n


def count_records(path: str) -> int:
    """Records in a TFRecord file (reads it through, verifying every CRC)."""
    try:
        return int(tf.data.TFRecordDataset(path).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    except tf.errors.OpError as e:
        raise schema.DataError(
            f"{path}: unreadable shard ({schema.first_line(e)}); delete it or rewrite with resume off"
        ) from None


def _read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def _remove_stale_temps(out_dir: str, prefix: str) -> None:
    # Left by a killed run (the process could not clean up). Names never collide with final ones.
    for p in tf.io.gfile.glob(storage.join(out_dir, f".{prefix}-*.tfrecord.tmp-*")):
        tf.io.gfile.remove(p)


def _remove_other_layouts(out_dir: str, prefix: str, num_shards: int) -> None:
    # Shards of the same prefix but another shard count (an earlier run with --shards S') would
    # otherwise sit next to the new ones and be picked up by globs.
    for p in tf.io.gfile.glob(storage.join(out_dir, f"{prefix}-*-of-*.tfrecord")):
        parsed = schema.parse_shard_name(storage.basename(p))
        if parsed and parsed[0] == prefix and parsed[2] != num_shards:
            tf.io.gfile.remove(p)
