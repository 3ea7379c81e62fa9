"""`pfc bench fc`: one forward+backward of the model-parallel loss vs the bare matmuls it needs.

The baseline is measured in the same process, on the same shapes and threads: the logits matmul
[B, D]x[D, C_r] and the two backward matmuls ([B, C_r]x[C_r, D] and [C_r, B]x[B, D]). Their time
is the floor any exact implementation pays; the ratio says what everything else costs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# Set by the parent when it re-executes itself under horovodrun for --workers N.
_CHILD_ENV = "PFC_BENCH_CHILD"


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (fc: the model-parallel layer; data: the reader)")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    fc = kinds.add_parser("fc", help="time of one FC forward+backward vs the bare matmuls")
    fc.add_argument("--classes", type=int, required=True, help="C, total classes")
    fc.add_argument("--dim", type=int, default=512, help="D, embedding width")
    fc.add_argument("--batch", type=int, default=256, help="GLOBAL batch B (split over workers)")
    fc.add_argument("--workers", type=int, default=1, help="run N workers with horovodrun on localhost")
    fc.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    fc.add_argument("--margin", default="arcface", help="margin name (default arcface)")
    fc.add_argument("--threads", type=int, default=0,
                    help="intra-op threads per worker (default: cores // workers)")
    fc.add_argument("--json", dest="json_out", default=None, help="append the result as a JSON line here")
    fc.set_defaults(func=run_fc)
    from launch import bench_data
    data = kinds.add_parser("data", help="images/s of the training reader vs decode-only, same JPEGs")
    bench_data.add_arguments(data)
    data.set_defaults(func=bench_data.run)


def run_fc(args: argparse.Namespace) -> int:
    for name in ("classes", "dim", "batch", "workers", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"pfc bench fc: --{name} must be >= 1, got {getattr(args, name)}")
    if args.batch % args.workers:
        raise SystemExit(f"pfc bench fc: --batch {args.batch} must divide evenly over --workers {args.workers}")
    if args.workers > 1 and not os.environ.get(_CHILD_ENV):
        return _relaunch(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    return _measure(args, threads)


def _relaunch(args) -> int:
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    argv = list(sys.argv[1:])  # the same `bench fc ...` arguments, run by every worker
    cmd = [horovodrun, "-np", str(args.workers), "-H", f"localhost:{args.workers}", "--gloo",
           sys.executable, "-m", "launch.cli", *argv]
    env = dict(os.environ, **{_CHILD_ENV: "1"})
    return subprocess.call(cmd, env=env)


def _measure(args, threads: int) -> int:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import cluster
    import partitioned_fc
    from partitioned_fc import margins

    comm = cluster.init()
    b_local = args.batch // comm.size
    fc = partitioned_fc.PartitionedFC(args.classes, args.dim, margins.get(args.margin), comm, seed=0)
    rows = fc.num_local_classes
    rng = tf.random.Generator.from_seed(1 + comm.rank)
    x = rng.normal([b_local, args.dim])
    y = rng.uniform([b_local], 0, args.classes, dtype=tf.int64)

    @tf.function
    def fc_step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fc(x, y)
        gx, gw = tape.gradient(loss, [x, fc.weight])
        return loss, gx, gw

    x_all = comm.allgather(x)
    w = tf.convert_to_tensor(fc.weight)

    @tf.function
    def matmuls(x_all, w):
        z = tf.matmul(x_all, w, transpose_b=True)            # [B, C_r] logits
        return tf.matmul(z, w), tf.matmul(z, x_all, transpose_a=True)  # [B, D], [C_r, D]

    def timed(fn, *a):
        comm.barrier()
        t0 = time.perf_counter()
        out = fn(*a)
        _ = [o.numpy() if o.shape.rank == 0 else o.shape for o in tf.nest.flatten(out)]
        dt = time.perf_counter() - t0
        # a step is as slow as its slowest worker
        return float(comm.allreduce_max(tf.constant([dt]))[0])

    timed(fc_step, x, y), timed(matmuls, x_all, w)  # warm-up: tracing, allocation
    fc_times, mm_times = [], []
    for _ in range(args.steps):  # interleaved so drift hits both alike
        fc_times.append(timed(fc_step, x, y))
        mm_times.append(timed(matmuls, x_all, w))
    fc_t, mm_t = sorted(fc_times)[len(fc_times) // 2], sorted(mm_times)[len(mm_times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    peak_max = float(comm.allreduce_max(tf.constant([float(peak)]))[0])
    if comm.rank == 0:
        result = {"bench": "fc", "classes": args.classes, "dim": args.dim, "batch": args.batch,
                  "workers": comm.size, "classes_per_worker": rows, "margin": args.margin,
                  "threads_per_worker": threads, "step_s": round(fc_t, 4), "matmul_s": round(mm_t, 4),
                  "ratio": round(fc_t / mm_t, 3), "samples_per_s": round(args.batch / fc_t, 1),
                  "peak_rss_gib_per_worker": round(peak_max / 2**30, 2)}
        print(f"fc  C={args.classes:,} D={args.dim} B={args.batch} workers={comm.size}: "
              f"step {fc_t:.3f}s  bare matmuls {mm_t:.3f}s  ratio {fc_t / mm_t:.2f}x  "
              f"{args.batch / fc_t:,.1f} samples/s  peak RSS {peak_max / 2**30:.2f} GiB/worker", flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0
