"""Markdown table of bench/run_scale.sh's JSON lines (pasted into docs/benchmarks.md).

python bench/scale_table.py bench/scale_results.jsonl
"""

import json
import sys


def beyond(r: dict) -> float:
    """Peak RSS minus the warmed-up runtime minus weights + state, the largest worker's (older
    rows: the sum of the build and step parts, each the largest worker's)."""
    if "beyond_state_gib_per_worker" in r:
        return r["beyond_state_gib_per_worker"]
    return r["overhead_gib_per_worker"] + r.get("build_overhead_gib_per_worker", 0.0)


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print(
        "| C | workers | r | chunk | dtype | step (s) | bare matmuls (s) | ratio | samples/s "
        "| weights+state / worker | beyond weights+state / worker | peak RSS / worker "
        "| loss first → last |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        losses = r.get("losses") or [float("nan")]
        print(
            f"| {r['classes']:,} | {r['workers']} | {r['sample_rate']:g} | {r['chunk_size'] or '—'} "
            f"| {r['dtype']} | {r['step_s']:.3f} | {r['matmul_s']:.3f} | {r['ratio']:.2f}× "
            f"| {r['samples_per_s']:,.0f} | {r['state_gib_per_worker']:.2f} GiB "
            f"| {beyond(r):.2f} GiB | {r['peak_rss_gib_per_worker']:.2f} GiB "
            f"| {losses[0]:.2f} → {losses[-1]:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/scale_results.jsonl")
