"""`pfc report RUN_DIR`: PNG plots of a run's JSON-lines log, during or after the run.

The log is RUN_DIR/log.jsonl, one JSON object per line (schema in docs/monitoring.md):
  training:   {"time": unix s, "step": int, "epoch": number, "loss": number, "accuracy": 0..1,
               "lr": number, "samples_per_sec": number, ...more keys allowed}
  evaluation: {"time": unix s, "step": int, "eval": {"lfw": {"accuracy": 0.99, "tar@far=1e-3": 0.98}, ...}}
  other:      {"event": "...", ...}  (checkpoints, start, ...): ignored here.
Plots: loss.png, accuracy.png, throughput.png, verification.png (when the log has evaluations), written
to RUN_DIR/report/ (or --out) through temporary files, so a reader never sees a half-written image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch import commands

LOG_NAME = "log.jsonl"
TRAIN_KEYS = ("time", "step", "epoch", "loss", "accuracy", "lr", "samples_per_sec")


class LogError(ValueError):
    """The log is missing or a line breaks the schema; the message names the file and line."""


@dataclass
class RunLog:
    """Columns of the training records (file order) and evaluation series per set and metric."""

    train: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in TRAIN_KEYS})
    evals: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    skipped_partial_line: bool = False


def _number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LogError(f"{where}: key {key!r} is {value!r}, expected a number")
    return float(value)


def _step(record: dict, where: str) -> int:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise LogError(
            f"{where}: key 'step' is {step!r}, expected an integer"
            if "step" in record
            else f"{where}: missing key 'step'"
        )
    return step


def _rewind(run: RunLog, step: int) -> None:
    """A resume at `step`: the records past it were written by the run that crashed, and the
    resumed run writes them again; keep the resumed run's."""
    keep = [i for i, s in enumerate(run.train["step"]) if s <= step]
    for key, column in run.train.items():
        run.train[key] = [column[i] for i in keep]
    for metrics in run.evals.values():
        for name, points in metrics.items():
            metrics[name] = [(s, v) for s, v in points if s <= step]


def read_log(path: Path) -> RunLog:
    """Parse and check the whole log. A last line without its newline is a record being written: skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LogError(f"{path}: no such file (a training run writes RUN_DIR/{LOG_NAME})") from None
    run = RunLog()
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # no newline after it: the writer is mid-line
                run.skipped_partial_line = True
                continue
            raise LogError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise LogError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if record.get("event") == "resume":
            _rewind(run, _step(record, where))
            continue
        if "event" in record:
            continue
        step = _step(record, where)
        if "eval" in record:
            sets = record["eval"]
            if not isinstance(sets, dict) or not sets:
                raise LogError(f"{where}: key 'eval' must map set names to metrics, got {sets!r}")
            for name, metrics in sets.items():
                if not isinstance(metrics, dict) or "accuracy" not in metrics:
                    raise LogError(f"{where}: eval set {name!r} must be an object with 'accuracy', got {metrics!r}")
                for metric, value in metrics.items():
                    if value is None and metric != "accuracy":  # not measurable on this set (TAR at an unreachable FAR)
                        continue
                    run.evals.setdefault(name, {}).setdefault(metric, []).append(
                        (step, _number(value, where, f"eval.{name}.{metric}"))
                    )
            continue
        for key in TRAIN_KEYS:
            if key not in record:
                raise LogError(f"{where}: missing key {key!r} (a training record needs {', '.join(TRAIN_KEYS)})")
            run.train[key].append(_number(record[key], where, key))
    if not run.train["step"] and not run.evals:
        raise LogError(f"{path}: no training or evaluation records")
    return run


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over ~2% of the points, ignoring non-finite values (a NaN step leaves a gap)."""
    window = max(1, len(values) // 50)
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot(run: RunLog, out_dir: Path, title: str) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    steps = run.train["step"]
    written = []
    for name, key, ylabel in (
        ("loss", "loss", "loss"),
        ("accuracy", "accuracy", "batch top-1 accuracy"),
        ("throughput", "samples_per_sec", "samples / s (all workers)"),
    ):
        if not steps:
            break
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(steps, run.train[key], lw=0.6, alpha=0.35, color="C0", label="per record")
        ax.plot(steps, _smooth(run.train[key]), lw=1.6, color="C0", label="trailing mean")
        ax.set(xlabel="step", ylabel=ylabel, title=f"{title}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        path = out_dir / f"{name}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    if run.evals:
        path = out_dir / "verification.png"
        _plot_verification(plt, verification_series(run), path, title)
        written.append(path)
    return written


def verification_series(run: RunLog) -> dict[str, dict[str, list[tuple]]]:
    """{panel: {set: [(step, value, std or None)]}}: accuracy (± fold std) and TAR at the FAR, per set.

    Only these two panels are drawn: the other keys of an evaluation (thresholds, pair counts,
    the reached FAR) are not on an accuracy scale.
    """
    out: dict[str, dict[str, list[tuple]]] = {"accuracy": {}, "tar": {}}
    for name, metrics in sorted(run.evals.items()):
        std = dict(metrics.get("accuracy_std", []))
        out["accuracy"][name] = [(x, y, std.get(x)) for x, y in metrics["accuracy"]]
        for key in sorted(k for k in metrics if k.startswith("tar@far=")):
            out["tar"][f"{name} {key.replace('tar@far=', 'TAR@FAR=')}"] = [(x, y, None) for x, y in metrics[key]]
    return out


# The verification figure's panels: (series key, panel title, y label).
_PANELS = (
    ("accuracy", "verification accuracy", "10-fold accuracy (± fold std)"),
    ("tar", "TAR at the evaluation FAR", "TAR"),
)


def _plot_verification(plt, series: dict, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (panel, name, ylabel) in zip(axes, _PANELS):
        ax.set(xlabel="step", ylabel=ylabel, title=f"{title}: {name}")
        ax.grid(alpha=0.3)
        if not series[panel]:  # every TAR was n/a: the sets have too few impostor pairs for the FAR
            ax.text(
                0.5,
                0.5,
                "not measurable: the sets have too few\nimpostor pairs for this FAR (eval.far)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
            continue
        _draw_series(ax, panel, series[panel])
        ax.legend(loc="best", fontsize="small")
    _save(fig, path)
    plt.close(fig)


def _draw_series(ax, panel: str, series: dict) -> None:
    """One line per set (accuracy: with its ± fold std as error bars)."""
    for i, (label, points) in enumerate(series.items()):
        xs, ys, std = zip(*points)
        ax.plot(xs, ys, marker="o", ms=3, color=f"C{i}", label=label)
        if panel == "accuracy" and all(v is not None for v in std):
            # error bars, not a band: one evaluation (a short run) is a single point
            ax.errorbar(xs, ys, yerr=std, fmt="none", ecolor=f"C{i}", elinewidth=1, capsize=3, alpha=0.6)


def summary(run: RunLog) -> str:
    t = run.train
    lines = []
    if t["step"]:
        finite = [x for x in t["loss"] if math.isfinite(x)]
        lines.append(
            f"steps {int(t['step'][0])}..{int(t['step'][-1])} ({len(t['step'])} records), epoch "
            f"{t['epoch'][-1]:g}, last loss {t['loss'][-1]:.4g} (min {min(finite, default=math.nan):.4g}), "
            f"last accuracy {t['accuracy'][-1]:.3f}, mean {sum(t['samples_per_sec']) / len(t['step']):.1f} samples/s"
        )
    for name, metrics in sorted(run.evals.items()):
        best = max(metrics["accuracy"], key=lambda p: p[1])
        lines.append(f"{name}: last accuracy {metrics['accuracy'][-1][1]:.4f}, best {best[1]:.4f} at step {best[0]}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = commands.add(sub, "report")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help=f"the run's directory (reads RUN_DIR/{LOG_NAME})")
    p.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default RUN_DIR/report)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    try:
        run = read_log(args.run_dir / LOG_NAME)
    except LogError as e:
        print(f"pfc report: {e}", file=sys.stderr)
        return 1
    if run.skipped_partial_line:
        print("pfc report: the last line is incomplete (run still writing?): skipped", file=sys.stderr)
    paths = plot(run, args.out or args.run_dir / "report", title=args.run_dir.resolve().name)
    print(summary(run))
    if not run.evals:
        print("no evaluation records: verification.png not written")
    for path in paths:
        print(f"wrote {path}")
    return 0
