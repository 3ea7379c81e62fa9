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

from launch import commands, host_memory

# Set by the parent when it re-executes itself under horovodrun for --workers N.
_CHILD_ENV = "PFC_BENCH_CHILD"


def add_parser(sub) -> None:
    bench = commands.add(sub, "bench")
    kinds = bench.add_subparsers(dest="bench_kind", metavar="KIND", required=True)
    fc = commands.add(
        kinds,
        "fc",
        "time of one FC training step vs the bare matmuls of the same work",
        (
            "pfc bench fc --classes 1000000 --dim 512 --batch 256 --workers 2 --steps 5",
            "pfc bench fc --classes 100000 --sample-rate 0.1 --dtype bfloat16 --json bench/fc_results.jsonl",
        ),
    )
    fc.add_argument("--classes", type=int, required=True, help="C, total classes")
    fc.add_argument("--dim", type=int, default=512, help="D, embedding width")
    fc.add_argument("--batch", type=int, default=256, help="GLOBAL batch B (split over workers)")
    fc.add_argument("--workers", type=int, default=1, help="run N workers with horovodrun on localhost")
    fc.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    fc.add_argument("--margin", default="arcface", help="margin name (default arcface)")
    fc.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate r in (0, 1]")
    fc.add_argument(
        "--chunk-size", type=int, default=None, help="logits in blocks of K classes (default: one block, [B, C_r] kept)"
    )
    fc.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="param_dtype and compute_dtype of the layer",
    )
    fc.add_argument(
        "--mode",
        default="train",
        choices=("train", "tape"),
        help="train: the fused step with the sparse SGD-momentum update (what training "
        "runs); tape: loss and gradients through an autodiff tape, no update",
    )
    fc.add_argument("--threads", type=int, default=0, help="intra-op threads per worker (default: cores // workers)")
    fc.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after timing, profile this many steps and print where each millisecond "
        "goes, per op (docs/benchmarks.md, 'Per-kernel profile')",
    )
    fc.add_argument("--json", dest="json_out", default=None, help="append the result as a JSON line here")
    fc.set_defaults(func=run_fc)
    from launch import bench_data

    data = commands.add(
        kinds,
        "data",
        "images/s of the training reader vs decode-only, same JPEGs",
        ("pfc bench data data/synth --workers 2 --rounds 3",),
    )
    bench_data.add_arguments(data)
    data.set_defaults(func=bench_data.run)


def run_fc(args: argparse.Namespace) -> int:
    if not 0.0 < args.sample_rate <= 1.0:
        raise SystemExit(f"pfc bench fc: --sample-rate must be in (0, 1], got {args.sample_rate}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise SystemExit(f"pfc bench fc: --chunk-size must be >= 1, got {args.chunk_size}")
    for name in ("classes", "dim", "batch", "workers", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"pfc bench fc: --{name} must be >= 1, got {getattr(args, name)}")
    if args.batch % args.workers:
        raise SystemExit(f"pfc bench fc: --batch {args.batch} must divide evenly over --workers {args.workers}")
    if args.workers > 1 and not os.environ.get(_CHILD_ENV):
        return _relaunch(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    return _measure(args, threads)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _rss_now() -> int:
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak is this layer's, not start-up's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # fallback: peak, KiB


def _relaunch(args) -> int:
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    argv = list(sys.argv[1:])  # the same `bench fc ...` arguments, run by every worker
    cmd = [
        horovodrun,
        "-np",
        str(args.workers),
        "-H",
        f"localhost:{args.workers}",
        "--gloo",
        sys.executable,
        "-m",
        "launch.cli",
        *argv,
    ]
    env = dict(os.environ, **{_CHILD_ENV: "1"})
    return subprocess.call(cmd, env=env)


def _measure(args, threads: int) -> int:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import cluster
    import partitioned_fc
    from partitioned_fc import margins
    from partitioned_fc import optimizer as shard_opt
    from partitioned_fc.memory import release_free_memory

    comm = cluster.init()
    b_local = args.batch // comm.size

    def make(classes):
        fc = partitioned_fc.PartitionedFC(
            classes,
            args.dim,
            margins.get(args.margin),
            comm,
            seed=0,
            sample_rate=args.sample_rate,
            chunk_size=args.chunk_size,
            compute_dtype=args.dtype,
            param_dtype=args.dtype,
        )
        return fc, shard_opt.SGD(fc.weight, momentum=0.9, weight_decay=5e-4)

    rss_start = _rss_now()
    # Warm the runtime on a small layer of the same kind (kernels compiled, allocator grown), so the
    # measured step overhead is what a step over C classes needs, not one-time start-up.
    small, small_opt = make(min(args.classes, 4 * (args.chunk_size or 4096) * comm.size))
    x_small = tf.random.normal([b_local, args.dim])
    y_small = tf.zeros([b_local], tf.int64)
    for _ in range(2):
        tf.function(small.train_step)(x_small, y_small, small_opt, 0.1).loss.numpy()
    del small, small_opt
    rss_before = _rss_now()
    fc, opt = make(args.classes)
    rss_built = _rss_now()  # + weights and state, + what building them left behind
    rows = fc.num_local_classes
    state_bytes = sum(v.shape.num_elements() * v.dtype.size for v in (fc.weight, *opt.state().values()))
    rng = tf.random.Generator.from_seed(1 + comm.rank)
    # a new batch per step: the train mode updates the rows, and one batch repeated is memorized
    # within a few steps (its loss printed 0.000 -> 0.000)
    batches = [
        (rng.normal([b_local, args.dim]), rng.uniform([b_local], 0, args.classes, dtype=tf.int64))
        for _ in range(args.steps + 1)
    ]
    x, y = batches[0]

    @tf.function
    def fc_step(x, y):
        if args.mode == "train":
            out = fc.train_step(x, y, opt, 0.1)
            return out.loss, out.d_embeddings
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fc(x, y)
        gx, gw = tape.gradient(loss, [x, fc.weight])
        return loss, gx, gw

    def timed(fn, *a):
        comm.barrier()
        t0 = time.perf_counter()
        out = fn(*a)
        _ = [o.numpy() if o.shape.rank == 0 else o.shape for o in tf.nest.flatten(out)]
        dt = time.perf_counter() - t0
        # a step is as slow as its slowest worker
        return float(comm.allreduce_max(tf.constant([dt]))[0]), float(tf.nest.flatten(out)[0])

    # The FC steps first, so the peak memory is theirs and not the baseline's.
    timed(fc_step, x, y)  # warm-up: tracing, compilation, allocation
    release_free_memory()  # the compiler's freed scratch, as `pfc train` after its first step
    rss_built = max(rss_built, _rss_now())  # what the warm-up kept (compiled kernels) is not a step's
    _reset_peak_rss()
    fc_times, losses = [], []
    for xb, yb in batches[1:]:
        dt, loss = timed(fc_step, xb, yb)
        fc_times.append(dt)
        losses.append(loss)
    peak = _peak_rss()

    # The bare matmuls of the same work (the rows taking part, in the same dtype), in blocks of at
    # most 65,536 rows gathered from the shard (never a copy of all of it, nor a huge [B, C_r]).
    k = rows if args.sample_rate == 1.0 else max(1, int(args.sample_rate * rows))
    x_all = tf.cast(comm.allgather(x), args.dtype)
    block = min(k, 65536)

    @tf.function
    def matmuls(x_all, weight):
        outs = []
        for lo in range(0, k, block):
            wb = tf.cast(tf.gather(weight, tf.range(lo, min(k, lo + block))), args.dtype)
            z = tf.matmul(x_all, wb, transpose_b=True)  # [B, k] logits
            outs += [tf.reduce_sum(tf.matmul(z, wb)), tf.reduce_sum(tf.matmul(z, x_all, transpose_a=True))]
        return tf.add_n(outs)

    timed(matmuls, x_all, fc.weight)
    mm_times = [timed(matmuls, x_all, fc.weight)[0] for _ in range(max(3, min(args.steps, 5)))]
    # Steps and matmuls alternated: a ratio that a noisy neighbour on the cores shifts less
    pairs = [timed(fc_step, xb, yb)[0] / timed(matmuls, x_all, fc.weight)[0] for xb, yb in batches[1:]]
    fc_t, mm_t = _median(fc_times), _median(mm_times)
    profile = _profile(args, fc_step, batches, fc_t) if args.profile and comm.rank == 0 else None
    # Each the largest worker's. beyond: the memory bound's measure, peak minus the warmed-up runtime
    # minus weights + state, per worker (its two parts, build and step, may peak on different ones).
    peak_max, over_max, build_max, beyond_max = (
        float(v)
        for v in comm.allreduce_max(
            tf.constant(
                [peak, peak - rss_built, rss_built - rss_before - state_bytes, peak - rss_before - state_bytes],
                tf.float32,
            )
        )
    )
    # RSS counts touched pages: rows not yet written can make "built minus weights+state" negative;
    # nothing was left behind then
    build_max = max(build_max, 0.0)
    if comm.rank == 0:
        result = {
            "bench": "fc",
            "mode": args.mode,
            "classes": args.classes,
            "dim": args.dim,
            "batch": args.batch,
            "workers": comm.size,
            "classes_per_worker": rows,
            "margin": args.margin,
            "sample_rate": args.sample_rate,
            "chunk_size": args.chunk_size,
            "dtype": args.dtype,
            "threads_per_worker": threads,
            "allocator": "system"
            if os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "").lower() in ("1", "true")
            else "onednn-pool",
            "malloc_arena_max": host_memory.arena_limit,
            "step_s": round(fc_t, 4),
            "matmul_s": round(mm_t, 4),
            "ratio": round(fc_t / mm_t, 3),
            "ratio_interleaved": round(_median(pairs), 3),
            "samples_per_s": round(args.batch / fc_t, 1),
            "peak_rss_gib_per_worker": round(peak_max / 2**30, 2),
            "runtime_gib_per_worker": round(rss_before / 2**30, 2),
            "startup_gib_per_worker": round(rss_start / 2**30, 2),
            "state_gib_per_worker": round(state_bytes / 2**30, 2),
            "overhead_gib_per_worker": round(over_max / 2**30, 3),
            "build_overhead_gib_per_worker": round(build_max / 2**30, 3),
            "beyond_state_gib_per_worker": round(beyond_max / 2**30, 3),
            "losses": [round(v, 4) for v in losses],
        }
        if profile:
            result["profile_ms_per_step"] = {op: round(ms, 2) for op, ms, _ in profile[:25]}
        print(
            f"fc  C={args.classes:,} D={args.dim} B={args.batch} workers={comm.size} r={args.sample_rate} "
            f"chunk={args.chunk_size} {args.dtype} {args.mode}: step {fc_t:.3f}s  bare matmuls "
            f"{mm_t:.3f}s  ratio {fc_t / mm_t:.2f}x (interleaved {_median(pairs):.2f}x)  "
            f"{args.batch / fc_t:,.1f} samples/s  peak RSS "
            f"{peak_max / 2**30:.2f} GiB/worker (runtime {rss_before / 2**30:.2f}, weights+state "
            f"{state_bytes / 2**30:.2f}, left by building it {build_max / 2**30:.3f}, step "
            f"{over_max / 2**30:.3f})  loss {losses[0]:.3f} -> {losses[-1]:.3f}",
            flush=True,
        )
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


def _profile(args, fc_step, batches, step_s: float):
    """Per-op milliseconds of `args.profile` steps (launch/bench_profile.py), printed as a table."""
    from launch import bench_profile

    cycle = iter(batches * (args.profile // len(batches) + 1))
    rows = bench_profile.profile(lambda: fc_step(*next(cycle))[0].numpy(), args.profile)
    print(bench_profile.format_table(rows, 1e3 * step_s), flush=True)
    return rows
