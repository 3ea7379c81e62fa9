"""Writing the typeface dataset (`pfc data fonts`): training shards, the closed set, two .bin sets.

Everything is written under a hidden sibling `.OUT.partial-*` and renamed to OUT at the end, so OUT
exists only complete; a failure removes the partial folder. OUT must not exist (local paths).
pipelines/fonts.py makes the plan; this module adds the TFRecord and .bin writers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

from pipelines import fonts, verification, writer
from pipelines.typefaces import FontError


def _records(plan: fonts.Plan, renderer: fonts.Renderer, samples, shard: int, shards: int):
    part = samples[shard::shards]
    for s, image in zip(part, renderer.images(part)):
        yield writer.Record(image, s.label, name=f"U+{ord(s.ch):04X}", source=fonts.source_text(plan, s))


def _write_records(out: str, plan, cfg, renderer, samples, shards: int, log, bins=()) -> None:
    writer.write_sharded(
        out,
        shards,
        lambda k: _records(plan, renderer, samples, k, shards),
        num_classes=len(plan.classes),
        image_size=(cfg.size, cfg.size),
        resume=False,
        verification=list(bins),
        job={"fonts": fonts.describe(plan, cfg)["config"]},
        log=log,
    )


def _write_pairs(path: str, plan, cfg, renderer, styles, tag: int) -> int:
    samples, same = fonts.pair_samples(plan, cfg, styles, tag)
    verification.save_bin(path, list(renderer.images(samples)), same)
    return len(same)


def _fill(tmp: str, plan, cfg, processes: int, log) -> dict:
    counts = {}
    with fonts.Renderer(plan, cfg, processes) as r:
        train = fonts.train_samples(plan, cfg)
        _write_records(tmp, plan, cfg, r, train, cfg.shards, log, (fonts.SEEN_BIN, fonts.UNSEEN_BIN))
        closed = fonts.closed_samples(plan, cfg)
        _write_records(os.path.join(tmp, fonts.CLOSED_DIR), plan, cfg, r, closed, 1, log)
        counts.update(train=len(train), closed=len(closed))
        counts["seen_pairs"] = _write_pairs(os.path.join(tmp, fonts.SEEN_BIN), plan, cfg, r, plan.train_styles, 1)
        counts["unseen_pairs"] = _write_pairs(os.path.join(tmp, fonts.UNSEEN_BIN), plan, cfg, r, plan.unseen_styles, 2)
    desc = {**fonts.describe(plan, cfg), "counts": counts}
    with open(os.path.join(tmp, fonts.DESCRIPTION), "w", encoding="utf-8") as f:
        json.dump(desc, f, ensure_ascii=False, indent=1)
    return counts


def write_fonts(
    out: str, cfg: fonts.FontsConfig, plan: fonts.Plan, *, processes: int = 1, log: Callable[[str], None] | None = None
) -> dict:
    """Render and write the dataset to the new folder `out`; -> record and pair counts."""
    if "://" in out:
        raise FontError(f"{out}: pfc data fonts writes local folders (copy the result to object storage)")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FontError(f"{out}: already exists; pick a new output folder or remove it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    said = (lambda msg: log(msg.replace(tmp, out))) if log else None  # name the final paths
    try:
        counts = _fill(tmp, plan, cfg, processes, said)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
