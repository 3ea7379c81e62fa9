"""Where a step's milliseconds go: TensorFlow's profiler around a few steps, summed per op.

`pfc bench fc --profile N` prints the table (docs/benchmarks.md, "Per-kernel profile"). Ops are
keyed by their innermost name scope and type (`fc_update/PartitionedCall` is one XLA kernel of
partitioned_fc/sharded_softmax.py; `while/Gather:ResourceGather` a TensorFlow op), so the same op
in every block of the backward is one row, its time the sum over blocks.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from collections.abc import Callable

import tensorflow as tf

_GENERATED = re.compile(r"_\d+$")


def profile(run_step: Callable[[], None], steps: int) -> list[tuple[str, float, int]]:
    """Run `run_step` `steps` times under the profiler -> [(op, ms per step, calls per step)],
    largest first."""
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            for _ in range(steps):
                run_step()
        finally:
            tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        with open(path, "rb") as f:
            totals = _op_totals(f.read())
    rows = [(op, ps / 1e9 / steps, n // steps) for op, (ps, n) in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def _op_totals(xspace: bytes) -> dict[str, list[int]]:
    """Serialized XSpace -> op key -> [picoseconds, calls] over the host plane's op events."""
    from tensorflow.core.profiler.protobuf import xplane_pb2  # the profiler's own file format

    space = xplane_pb2.XSpace()
    space.ParseFromString(xspace)
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                key = _op_key(plane, event)
                if key:
                    totals[key][0] += event.duration_ps
                    totals[key][1] += 1
    return totals


def _op_key(plane, event) -> str | None:
    """An op execution's key, or None for the executor's own bookkeeping events."""
    name = plane.event_metadata[event.metadata_id].name
    if name == "ExecutorState::ProcessAsync::Start":  # an async op (a function call): its node
        stats = {plane.stat_metadata[s.metadata_id].name: _stat_text(plane, s) for s in event.stats}
        name = f"{stats.get('name', '?')}:{stats.get('kernel_type', '?')}"
    if ":" not in name or "::" in name or " " in name:  # "EagerLocalExecute: f" wraps the step
        return None
    node, kind = name.rsplit(":", 1)
    parts = [_GENERATED.sub("", p) for p in node.split("/") if not p.startswith("_")]
    return "/".join(parts[-2:]) + ":" + kind


def _stat_text(plane, stat) -> str:
    """A string stat's value: inline, or interned in the plane's stat metadata."""
    return stat.str_value or (plane.stat_metadata[stat.ref_value].name if stat.ref_value else "")


def format_table(rows: list[tuple[str, float, int]], step_ms: float, top: int = 20) -> str:
    """A markdown table of the largest ops, with their share of the step."""
    lines = ["| op | ms / step | calls / step | share of the step |", "|---|---|---|---|"]
    for op, ms, calls in rows[:top]:
        lines.append(f"| `{op}` | {ms:.1f} | {calls} | {100 * ms / step_ms:.0f} % |")
    rest = sum(ms for _, ms, _ in rows[top:])
    lines.append(f"| (other ops) | {rest:.1f} | | {100 * rest / step_ms:.0f} % |")
    return "\n".join(lines)
