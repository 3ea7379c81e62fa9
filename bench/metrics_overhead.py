"""Cost of recording one step's metrics, vs a small training-like step measured in the same run.

    .venv/bin/python bench/metrics_overhead.py [--json bench/metrics_overhead.jsonl]

Baseline step: the FC logits matmul [B, D] x [D, C_r] in numpy with deliberately small shapes (a real
step is far longer, so the ratio printed is an upper bound). Measured three ways:
  per_call_us:  mean time of `observe_step` in a tight loop of 20,000 calls;
  step_ms / step_with_metrics_ms: medians of the step alone and of step + observe_step, interleaved;
  both while the exporter serves /metrics and a thread scrapes it every 100 ms (150x Prometheus' 15 s),
  so scrape contention for the GIL and the metric locks is included.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from monitoring import TrainingMetrics  # noqa: E402
from monitoring.local_prometheus import free_port  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=2048, help="C_r, classes of this worker's shard")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--json", dest="json_out", default=None, help="append the result as a JSON line here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.dim), dtype=np.float32)
    w = rng.standard_normal((args.dim, args.classes), dtype=np.float32)

    def step():
        return float((x @ w).max())

    port = free_port()
    m = TrainingMetrics(job="bench", bind="127.0.0.1", base_port=port)
    stop = threading.Event()

    def scraper():
        while not stop.wait(0.1):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()

    t = threading.Thread(target=scraper, daemon=True)
    t.start()
    i = 0

    def observe(loss):
        nonlocal i
        i += 1
        m.observe_step(
            step=i,
            samples=args.batch,
            loss=loss,
            accuracy=0.5,
            lr=0.1,
            lam=1.0,
            epoch=i / 1000,
            step_seconds=0.01,
            data_wait_seconds=0.001,
            comm_seconds=0.002,
        )

    for _ in range(20):  # warm-up
        observe(step())
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        observe(1.0)
    per_call = (time.perf_counter() - t0) / n

    plain, with_metrics = [], []
    for _ in range(args.rounds):  # interleaved so drift hits both alike
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        observe(step())
        with_metrics.append(time.perf_counter() - t0)
    stop.set()
    t.join()
    m.close()

    step_s, step_m_s = statistics.median(plain), statistics.median(with_metrics)
    result = {
        "bench": "metrics_overhead",
        "batch": args.batch,
        "dim": args.dim,
        "classes": args.classes,
        "per_call_us": round(per_call * 1e6, 2),
        "step_ms": round(step_s * 1e3, 3),
        "step_with_metrics_ms": round(step_m_s * 1e3, 3),
        "per_call_over_step": round(per_call / step_s, 5),
        "cpus": os.cpu_count(),
    }
    print(
        f"observe_step: {per_call * 1e6:.1f} us/call; baseline step [{args.batch}x{args.dim}]x"
        f"[{args.dim}x{args.classes}] {step_s * 1e3:.2f} ms (median), with metrics {step_m_s * 1e3:.2f} ms; "
        f"per-call cost = {100 * per_call / step_s:.3f}% of the step"
    )
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
