"""`pfc bench fc`: one forward+backward of the model-parallel loss vs the bare matmuls it needs.

The baseline is measured in the same process, on the same shapes and threads: the logits matmul
[B, D]x[D, C_r] and the two backward matmuls ([B, C_r]x[C_r, D] and [C_r, B]x[B, D]). Their time
is the floor any exact implementation pays; the ratio says what everything else costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

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
    from bench import data as bench_data

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


@dataclasses.dataclass
class _Run:
    """One measurement: the arguments, the cluster, the layer under test, its optimizer and data."""

    args: argparse.Namespace
    threads: int
    comm: Any
    fc: Any
    opt: Any
    batches: list  # (x [B_r, D], y [B_r]) per step, one more than timed (the warm-up's)

    @property
    def rows(self) -> int:
        """The rows taking part in a step: all of the shard, or the sampled share (g rows per
        class: Sub-center ArcFace's sub-centers)."""
        rows = self.fc.num_local_classes
        classes = rows if self.args.sample_rate == 1.0 else max(1, int(self.args.sample_rate * rows))
        return classes * self.fc.rows_per_class

    def state_bytes(self) -> int:
        return sum(v.shape.num_elements() * v.dtype.size for v in (self.fc.weight, *self.opt.state().values()))


@dataclasses.dataclass
class _Memory:
    """Resident set sizes (bytes) at the points of a measurement, this worker's."""

    start: int  # before anything
    runtime: int  # after warming the runtime on a small layer
    built: int  # after building the layer (and the warm-up step's kept kernels)
    peak: int  # the steps' peak


def _measure(args, threads: int) -> int:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import cluster

    comm = cluster.init()
    start = _rss_now()
    _warm_runtime(args, comm)
    runtime = _rss_now()
    run = _build(args, threads, comm)
    built = _rss_now()  # + weights and state, + what building them left behind
    step = _step_function(run)
    fc_times, losses, built, peak = _time_steps(run, step, built)
    matmuls = _bare_matmuls(run)
    mm_times = [_timed(comm, matmuls)[0] for _ in range(max(3, min(args.steps, 5)))]
    # Steps and matmuls alternated: a ratio that a noisy neighbour on the cores shifts less
    pairs = [_timed(comm, step, xb, yb)[0] / _timed(comm, matmuls)[0] for xb, yb in run.batches[1:]]
    times = {"step": _median(fc_times), "matmuls": _median(mm_times), "interleaved": _median(pairs)}
    profile = _profile(args, step, run.batches, times["step"]) if args.profile and comm.rank == 0 else None
    memory = _memory_figures(run, _Memory(start, runtime, built, peak))
    if comm.rank == 0:
        _report(run, times, memory, losses, profile)
    return 0


def _build(args, threads: int, comm) -> _Run:
    """The layer of `args.classes` classes, its SGD and a new batch per step (the train mode
    updates the rows, and one batch repeated is memorized within a few steps)."""
    import tensorflow as tf

    fc, opt = _layer(args, comm, args.classes)
    rng = tf.random.Generator.from_seed(1 + comm.rank)
    b_local = args.batch // comm.size
    batches = [
        (rng.normal([b_local, args.dim]), rng.uniform([b_local], 0, args.classes, dtype=tf.int64))
        for _ in range(args.steps + 1)
    ]
    return _Run(args, threads, comm, fc, opt, batches)


def _layer(args, comm, classes: int):
    """-> (PartitionedFC of `classes` as `args` asks, its shard SGD with momentum and decay)."""
    import partitioned_fc
    from partitioned_fc import margins
    from partitioned_fc import optimizer as shard_opt

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


def _warm_runtime(args, comm) -> None:
    """Two steps of a small layer of the same kind (kernels compiled, allocator grown), so the
    measured overhead is what a step over C classes needs, not one-time start-up."""
    import tensorflow as tf

    small, opt = _layer(args, comm, min(args.classes, 4 * (args.chunk_size or 4096) * comm.size))
    b_local = args.batch // comm.size
    x, y = tf.random.normal([b_local, args.dim]), tf.zeros([b_local], tf.int64)
    for _ in range(2):
        tf.function(small.train_step)(x, y, opt, 0.1).loss.numpy()


def _step_function(run: _Run):
    """The step under test as a tf.function (x, y) -> (loss, gradients...)."""
    import tensorflow as tf

    fc, opt = run.fc, run.opt

    @tf.function
    def step(x, y):
        if run.args.mode == "train":
            out = fc.train_step(x, y, opt, 0.1)
            return out.loss, out.d_embeddings
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = fc(x, y)
        gx, gw = tape.gradient(loss, [x, fc.weight])
        return loss, gx, gw

    return step


def _timed(comm, fn, *a) -> tuple[float, float]:
    """-> (seconds of fn(*a), as slow as the slowest worker; its first output as a float)."""
    import tensorflow as tf

    comm.barrier()
    t0 = time.perf_counter()
    out = fn(*a)
    _ = [o.numpy() if o.shape.rank == 0 else o.shape for o in tf.nest.flatten(out)]
    dt = time.perf_counter() - t0
    return float(comm.allreduce_max(tf.constant([dt]))[0]), float(tf.nest.flatten(out)[0])


def _time_steps(run: _Run, step, built: int):
    """The FC steps, before the baseline so the peak memory is theirs -> (step seconds, losses,
    RSS after the warm-up step, peak RSS)."""
    from partitioned_fc.memory import release_free_memory

    _timed(run.comm, step, *run.batches[0])  # warm-up: tracing, compilation, allocation
    release_free_memory()  # the compiler's freed scratch, as `pfc train` after its first step
    built = max(built, _rss_now())  # what the warm-up kept (compiled kernels) is not a step's
    _reset_peak_rss()
    times, losses = [], []
    for xb, yb in run.batches[1:]:
        dt, loss = _timed(run.comm, step, xb, yb)
        times.append(dt)
        losses.append(loss)
    return times, losses, built, _peak_rss()


def _bare_matmuls(run: _Run):
    """A tf.function () -> the three matmuls of the same rows in the same dtype, in blocks of at
    most 65,536 rows gathered from the shard (never a copy of all of it, nor a huge [B, C_r])."""
    import tensorflow as tf

    dtype, k = run.args.dtype, run.rows
    x_all = tf.cast(run.comm.allgather(run.batches[0][0]), dtype)
    weight, block = run.fc.weight, min(k, 65536)

    @tf.function
    def matmuls():
        outs = []
        for lo in range(0, k, block):
            wb = tf.cast(tf.gather(weight, tf.range(lo, min(k, lo + block))), dtype)
            z = tf.matmul(x_all, wb, transpose_b=True)  # [B, k] logits
            outs += [tf.reduce_sum(tf.matmul(z, wb)), tf.reduce_sum(tf.matmul(z, x_all, transpose_a=True))]
        return tf.add_n(outs)

    _timed(run.comm, matmuls)  # tracing
    return matmuls


def _memory_figures(run: _Run, mem: _Memory) -> dict:
    """The largest worker's figures, GiB. beyond: the memory bound's measure, peak minus the
    warmed-up runtime minus weights + state (its two parts, build and step, may peak on
    different workers)."""
    import tensorflow as tf

    state = run.state_bytes()
    values = [mem.peak, mem.peak - mem.built, mem.built - mem.runtime - state, mem.peak - mem.runtime - state]
    peak, step, build, beyond = (float(v) / 2**30 for v in run.comm.allreduce_max(tf.constant(values, tf.float32)))
    # RSS counts touched pages: rows not yet written can make "built minus weights+state"
    # negative; nothing was left behind then
    return {
        "peak_rss_gib_per_worker": round(peak, 2),
        "runtime_gib_per_worker": round(mem.runtime / 2**30, 2),
        "startup_gib_per_worker": round(mem.start / 2**30, 2),
        "state_gib_per_worker": round(state / 2**30, 2),
        "overhead_gib_per_worker": round(step, 3),
        "build_overhead_gib_per_worker": round(max(build, 0.0), 3),
        "beyond_state_gib_per_worker": round(beyond, 3),
    }


def _report(run: _Run, times: dict, memory: dict, losses: list[float], profile) -> None:
    """Print the result line; append its JSON line to --json."""
    args = run.args
    fc_t, mm_t = times["step"], times["matmuls"]
    result = {
        "bench": "fc",
        "mode": args.mode,
        "classes": args.classes,
        "dim": args.dim,
        "batch": args.batch,
        "workers": run.comm.size,
        "classes_per_worker": run.fc.num_local_classes,
        "margin": args.margin,
        "sample_rate": args.sample_rate,
        "chunk_size": args.chunk_size,
        "dtype": args.dtype,
        "threads_per_worker": run.threads,
        "allocator": "system"
        if os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "").lower() in ("1", "true")
        else "onednn-pool",
        "malloc_arena_max": host_memory.arena_limit,
        "step_s": round(fc_t, 4),
        "matmul_s": round(mm_t, 4),
        "ratio": round(fc_t / mm_t, 3),
        "ratio_interleaved": round(times["interleaved"], 3),
        "samples_per_s": round(args.batch / fc_t, 1),
        **memory,
        "losses": [round(v, 4) for v in losses],
    }
    if profile:
        result["profile_ms_per_step"] = {op: round(ms, 2) for op, ms, _ in profile[:25]}
    print(
        f"fc  C={args.classes:,} D={args.dim} B={args.batch} workers={run.comm.size} r={args.sample_rate} "
        f"chunk={args.chunk_size} {args.dtype} {args.mode}: step {fc_t:.3f}s  bare matmuls "
        f"{mm_t:.3f}s  ratio {fc_t / mm_t:.2f}x (interleaved {times['interleaved']:.2f}x)  "
        f"{args.batch / fc_t:,.1f} samples/s  peak RSS "
        f"{memory['peak_rss_gib_per_worker']:.2f} GiB/worker (runtime {memory['runtime_gib_per_worker']:.2f}, "
        f"weights+state {memory['state_gib_per_worker']:.2f}, left by building it "
        f"{memory['build_overhead_gib_per_worker']:.3f}, step {memory['overhead_gib_per_worker']:.3f})  "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}",
        flush=True,
    )
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")


def _profile(args, step, batches, step_s: float):
    """Per-op milliseconds of `args.profile` steps (bench/fc_profile.py), printed as a table."""
    from bench import fc_profile

    cycle = iter(batches * (args.profile // len(batches) + 1))
    rows = fc_profile.profile(lambda: step(*next(cycle))[0].numpy(), args.profile)
    print(fc_profile.format_table(rows, 1e3 * step_s), flush=True)
    return rows
