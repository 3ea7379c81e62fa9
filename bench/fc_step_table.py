"""The FC step table of docs/benchmarks.md from bench/run_fc_step.sh's JSON lines.

    python bench/fc_step_table.py [RESULTS.jsonl]   (RESULTS.jsonl.baseline: the other version)

One row per path and batch: the interleaved ratio (step / bare matmuls, alternated in one process)
and samples/s of the baseline version and of this one, and the target of that path.
"""

from __future__ import annotations

import json
import sys

# (mode, margin, chunk, rate, dtype) -> (what the row is, the target ratio)
PATHS = {
    ("tape", "amsoftmax", None, 1.0, "float32"): ("tape `fc(x, y)`, AM-Softmax, C = 100k", 1.30),
    ("tape", "arcface", None, 1.0, "float32"): ("tape `fc(x, y)`, ArcFace, C = 100k", 1.30),
    ("train", "arcface", None, 1.0, "float32"): ("`train_step` + SGD momentum, C = 100k", 1.35),
    ("train", "arcface", 16384, 1.0, "float32"): ("`train_step`, chunked 16,384, C = 100k", 1.50),
    ("train", "arcface", None, 0.1, "float32"): ("`train_step`, r = 0.1, C = 100k", 1.50),
    ("train", "arcface", None, 0.01, "float32"): ("`train_step`, r = 0.01, C = 1M", 2.00),
    ("train", "arcface", None, 1.0, "bfloat16"): ("`train_step`, bfloat16, C = 100k", 2.00),
    ("tape", "arcface", None, 1.0, "bfloat16"): ("tape `fc(x, y)`, ArcFace, bfloat16, C = 100k", 2.00),
}


def _key(row: dict) -> tuple:
    return row["mode"], row["margin"], row["chunk_size"], row["sample_rate"], row["dtype"]


def _load(path: str) -> dict:
    """(path key, batch) -> the last row measured for it."""
    rows = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows[(_key(row), row["batch"])] = row
    return rows


def table(results: str) -> str:
    new, old = _load(results), _load(results + ".baseline")
    lines = [
        "| path | B | before: ratio | now: ratio | before: samples/s | now: samples/s | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in sorted({b for _, b in new}):
        for key, (label, target) in PATHS.items():
            if (key, batch) not in new:
                continue
            a, b = old.get((key, batch)), new[(key, batch)]
            ratio_a = f"{a['ratio_interleaved']:.2f}×" if a else "–"
            speed_a = f"{a['samples_per_s']:,.0f}" if a else "–"
            lines.append(
                f"| {label} | {batch} | {ratio_a} | **{b['ratio_interleaved']:.2f}×** | {speed_a} | "
                f"{b['samples_per_s']:,.0f} | ≤ {target:.2f}× |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "bench/fc_step_results.jsonl"))
