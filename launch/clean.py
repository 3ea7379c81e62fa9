"""`pfc clean`: list the training samples far from their class's dominant sub-center.

Sub-center ArcFace's cleaning step (Deng et al. 2020; docs/margins.md, "Sub-center ArcFace"):
after training with k sub-centers per class, each class's dominant sub-center is the one
nearest to most of its samples; a sample whose angle to it exceeds a threshold (the paper's
75°) is most likely a wrong label. The command embeds every record of a dataset with a
checkpoint's backbone, measures that angle and writes the samples above the threshold as a
tab-separated list, so they can be dropped before training again. It works for any checkpoint
(with one row per class, the dominant row is the class's only one).

Memory: the class matrix as float32 ([k·C, D]: 0.6 GB for 93k classes, k = 3, D = 512) plus k
floats per sample.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from launch import commands

COLUMNS = ("file", "record", "source", "label", "angle_deg", "dominant", "nearest")


@dataclass(frozen=True)
class Sample:
    """Where a record came from: its shard file, index in it, source name and label."""

    file: str
    record: int
    source: str
    label: int


@dataclass(frozen=True)
class Angles:
    """Every sample's cosines to its class's rows and what follows from them."""

    cos: np.ndarray  # [N, g] cos(x, W_{y, i}) for the g rows of the label's class
    labels: np.ndarray  # [N]
    dominant: np.ndarray  # [N] the dominant row (0..g-1) of each sample's class
    angle_deg: np.ndarray  # [N] the angle to it, degrees

    @property
    def nearest(self) -> np.ndarray:
        return self.cos.argmax(axis=1)


def add_parser(sub) -> None:
    p = commands.add(sub, "clean")
    p.add_argument("--config", required=True, help="the experiment's YAML config (backbone, image size)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the newest of the run)")
    p.add_argument("--data", default=None, help="the dataset to check (default: the config's data.train)")
    p.add_argument("out", metavar="OUT.tsv", help="the samples above the threshold, one per line, with a header")
    p.add_argument(
        "--threshold",
        type=float,
        default=75.0,
        help="angle to the dominant sub-center, degrees, above which a sample is listed (default 75, the paper's)",
    )
    p.add_argument("--batch", type=int, default=128, help="images per call of the backbone (default 128)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one config key"
    )
    p.set_defaults(func=run_clean)


def dominant_rows(nearest: np.ndarray, labels: np.ndarray, g: int, num_classes: int) -> np.ndarray:
    """[N] nearest row of each sample, [N] labels -> [C] each class's dominant row: the one nearest
    to most of its samples (the lowest on a tie; 0 for a class without samples)."""
    counts = np.bincount(labels * g + nearest, minlength=num_classes * g).reshape(num_classes, g)
    return counts.argmax(axis=1)


def angles(cos: np.ndarray, labels: np.ndarray, num_classes: int) -> Angles:
    """[N, g] cosines to the label's rows, [N] labels -> `Angles`."""
    g = cos.shape[1]
    dominant = dominant_rows(cos.argmax(axis=1), labels, g, num_classes)[labels]
    c = np.clip(cos[np.arange(len(labels)), dominant], -1.0, 1.0)
    return Angles(cos, labels, dominant, np.degrees(np.arccos(c)))


def label_cosines(emb: np.ndarray, labels: np.ndarray, matrix: np.ndarray, g: int) -> np.ndarray:
    """[b, D] embeddings, [b] labels, [g·C, D] unit rows -> [b, g] cos to the label's rows."""
    rows = matrix.reshape(-1, g, matrix.shape[1])[labels]  # [b, g, D]
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return np.einsum("bd,bgd->bg", unit, rows)


def unit_matrix(path: str) -> np.ndarray:
    """A checkpoint's class matrix [g·C, D] float32, each row unit norm (verified first)."""
    from launch import checkpoint as ckpt

    blocks = [rows for _, rows in ckpt.class_blocks(path)]
    matrix = np.concatenate(blocks)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def records(path: str) -> Iterator[tuple[Sample, bytes]]:
    """(Sample, JPEG bytes) of every record of a dataset, in shard order."""
    from launch.embed import dataset_records
    from pipelines import schema

    for file, i, ex in dataset_records(path):
        source = ex[schema.SOURCE_KEY].numpy().decode("utf-8", "replace")
        sample = Sample(os.path.basename(file), i, source, int(ex[schema.LABEL_KEY].numpy()))
        yield sample, ex[schema.IMAGE_KEY].numpy()


def batches(items: Iterator[tuple[Sample, bytes]], size: int) -> Iterator[tuple[list[Sample], np.ndarray]]:
    """Decoded uint8 batches of one image shape (a change of shape starts a new batch)."""
    from launch.embed import batches as image_batches

    samples: dict[str, Sample] = {}

    def named() -> Iterator[tuple[str, bytes]]:
        for sample, data in items:
            name = f"{sample.file}:{sample.record}"
            samples[name] = sample
            yield name, data

    for names, pixels in image_batches(named(), size):
        yield [samples.pop(n) for n in names], pixels


def check_labels(samples: list[Sample], num_classes: int) -> None:
    for s in samples:
        if not 0 <= s.label < num_classes:
            from pipelines.schema import DataError

            raise DataError(f"{s.file} record {s.record}: label {s.label} is outside [0, {num_classes})")


def measure(embed, data: str, matrix: np.ndarray, g: int, batch: int) -> tuple[list[Sample], Angles]:
    """Every record of `data` -> (its Samples, their Angles)."""
    num_classes = matrix.shape[0] // g
    samples, cos = [], []
    for taken, pixels in batches(records(data), batch):
        check_labels(taken, num_classes)
        labels = np.array([s.label for s in taken])
        cos.append(label_cosines(embed(pixels), labels, matrix, g))
        samples += taken
    if not samples:
        from pipelines.schema import DataError

        raise DataError(f"{data}: no records")
    labels = np.array([s.label for s in samples])
    return samples, angles(np.concatenate(cos), labels, num_classes)


def write_list(out: str, samples: list[Sample], a: Angles, threshold: float) -> int:
    """The samples above `threshold` to `out` (written whole, then renamed) -> how many."""
    far = np.flatnonzero(a.angle_deg > threshold)
    nearest = a.nearest
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\t".join(COLUMNS) + "\n")
        for i in far:
            s = samples[i]
            fields = (s.file, s.record, s.source, s.label, f"{a.angle_deg[i]:.2f}", a.dominant[i], nearest[i])
            f.write("\t".join(str(v) for v in fields) + "\n")
    os.replace(tmp, out)
    return len(far)


def _backbone_embed(cfg, path: str):
    from launch import backbones
    from launch import checkpoint as ckpt
    from launch.evaluate import uint8_embed

    model = backbones.from_config(cfg)
    ckpt.restore_backbone(path, model.variables)
    return uint8_embed(model, cfg.data.image_size)


def run_clean(args: argparse.Namespace) -> int:
    from launch import checkpoint as ckpt
    from launch.config import load_config

    if not 0.0 <= args.threshold <= 180.0:
        raise SystemExit(f"pfc clean: --threshold must be an angle in [0, 180] degrees, got {args.threshold}")
    cfg = load_config(args.config, args.overrides)
    path = args.checkpoint or ckpt.latest(cfg.checkpoint_dir)
    if path is None:
        raise ckpt.CheckpointError(f"{cfg.checkpoint_dir}: no checkpoint (pass --checkpoint)")
    g = ckpt.rows_per_class(path)
    samples, a = measure(_backbone_embed(cfg, path), args.data or cfg.data.train[0], unit_matrix(path), g, args.batch)
    listed = write_list(args.out, samples, a, args.threshold)
    share = np.bincount(a.nearest == a.dominant, minlength=2)[1] / len(samples)
    print(
        f"{len(samples)} samples, {g} row(s) per class: {share:.1%} nearest to their class's dominant "
        f"sub-center; {listed} ({listed / len(samples):.2%}) above {args.threshold:g}° listed in {args.out}",
        file=sys.stdout,
        flush=True,
    )
    return 0
