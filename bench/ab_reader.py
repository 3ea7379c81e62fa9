"""A/B of reader versions: two or more `pipelines/reader.py` files, timed in one process.

    git show 05c42dd:pipelines/reader.py > /tmp/reader_old.py
    .venv/bin/python bench/ab_reader.py DATA /tmp/reader_old.py pipelines/reader.py [--rounds 7]

Each version's default pipeline (1 worker, the host's cores) and the batched decode-only baseline
of `pfc bench data` run alternately, `--rounds` times, each from a fresh iterator after a warm-up
of two shuffle buffers; per round each version's time is divided by the same round's baseline
time. Prints per version: median img/s, CPU µs per image, cores busy, and the median (and all)
of the per-round overheads, in wall time and in CPU time. A version named twice is timed twice
per round: `OLD NEW NEW OLD` balances the order within a round. It runs under `pfc`'s allocator
settings (`launch.host_memory`); MALLOC_ARENA_MAX etc. in the environment override them, as for
`pfc`. The versions share one process and its heap, which moves a reader's CPU per image by
several µs (bench/reader_heap.py): for small differences, run each version alone (one file per
run) against the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("readers", nargs="+", help="reader.py files to compare")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    from launch import host_memory

    host_memory.configure()  # before TensorFlow loads
    print(f"malloc arenas: {host_memory.arena_limit or 'glibc default'}")
    from bench.data import baselines, timed_window, warmup_batches
    from pipelines.threads import cores_per_worker

    threads = cores_per_worker(1)
    versions = {}
    for k, path in enumerate(args.readers):
        spec = importlib.util.spec_from_file_location(f"reader_v{k}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        versions[f"{k}:{path}"] = mod.open_dataset(args.data, args.batch, seed=0, threads=threads)
    _, batched = baselines(next(iter(versions.values())), args.batch, args.steps, threads)
    datasets = {"batched decode-only": batched}
    datasets.update({name: v.dataset for name, v in versions.items()})
    warmup = warmup_batches(4096, args.batch)  # the readers' default shuffle buffer
    times = {name: [] for name in datasets}
    for _ in range(args.rounds):
        for name, ds in datasets.items():
            times[name].append(timed_window(ds, warmup, args.steps))
    n = args.batch * args.steps
    base = times["batched decode-only"]
    med = statistics.median
    for name, ts in times.items():
        over = sorted(100 * (t[0] / b[0] - 1) for t, b in zip(ts, base))
        # CPU per image paired the same way: on a host shared with other jobs the wall time of a
        # round swings with their load, its CPU time far less.
        cpu_over = sorted(100 * (t[1] / b[1] - 1) for t, b in zip(ts, base))
        print(
            f"{name}: {med([n / t[0] for t in ts]):,.0f} img/s, CPU {med([1e6 * t[1] / n for t in ts]):.1f} us/img, "
            f"cores {med([t[1] / t[0] for t in ts]):.2f}, overhead vs batched decode-only "
            f"{med(over):+.1f} % (rounds: {', '.join(f'{o:+.1f}' for o in over)}), in CPU "
            f"{med(cpu_over):+.1f} % (rounds: {', '.join(f'{o:+.1f}' for o in cpu_over)})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
