"""The reader's CPU per image as its process's history grows, against the reader alone.

    .venv/bin/python bench/reader_heap.py /tmp/pfc-bench-data-112-40k [--rounds 3]

Why `pfc bench data` runs each pipeline in its own process. In one process: the reader fresh,
then after the decode-only baselines' JPEGs are loaded, after the batched baseline ran, after the
per-image baseline ran (as in the one-process harness, where the reader came last). Then, in a
second process, the control: the reader alone for as many windows. Each line: median img/s and
CPU µs per image of `--rounds` windows of 600 batches of 128 (1 worker, 2 threads, `pfc`'s
allocator settings), timed as `pfc bench data` times them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from launch import host_memory

    host_memory.configure()  # before TensorFlow loads
    from bench.data import baselines, timed_window, warmup_batches
    from pipelines import reader
    from pipelines.threads import cores_per_worker

    threads, steps = cores_per_worker(1), 600
    pipe = reader.open_dataset(args.data, 128, seed=0, threads=threads)
    warmup, n = warmup_batches(4096, 128), 128 * steps

    def windows(tag):
        ts = [timed_window(pipe.dataset, warmup, steps) for _ in range(args.rounds)]
        print(
            f"{tag:32s} reader {statistics.median([n / t[0] for t in ts]):8,.0f} img/s  CPU "
            f"{statistics.median([1e6 * t[1] / n for t in ts]):6.1f} µs/img  "
            f"({', '.join(f'{1e6 * t[1] / n:.1f}' for t in ts)})",
            flush=True,
        )

    if args.control:
        for k in range(4):
            windows(f"control: reader alone, {k + 1}")
        return 0
    windows("fresh process")
    per_image, batched = baselines(pipe, 128, steps, threads)
    windows("baselines' JPEGs loaded")
    timed_window(batched, 20, steps)
    windows("after batched decode-only ran")
    timed_window(per_image, 20, steps)
    windows("after per-image decode-only ran")
    return subprocess.call([sys.executable, __file__, args.data, "--rounds", str(args.rounds), "--control"])


if __name__ == "__main__":
    sys.exit(main())
