"""`pfc bench data PATH`: images/s of the full training reader vs decoding the same JPEGs alone.

Each pipeline of each worker runs in its own process, as the reader runs in a training process;
the processes take turns, in rounds (so drift hits all alike): in each round every pipeline's
timed window, its workers' windows started together, while the other pipelines' processes wait.
(Until session 9 all pipelines shared one process: the C allocator's heap, left by the baselines'
76,800 loaded JPEGs and their decoding, then cost the reader 5-30 us of CPU per image that a
fresh process does not pay: bench/reader_heap.py, docs/benchmarks.md.) Each window comes from a fresh
iterator after a warm-up, in a thread pool of this worker's share of the cores (cores // workers):
  * decode-only: the worker's JPEG bytes already in memory -> parallel tf.io.decode_jpeg -> batch.
    The floor for any reader that decodes JPEGs (no I/O, parsing, shuffling or augmentation).
  * decode-only, batched: the same bytes in batches, each decoded in one function call run
    inline (`pipelines.reader.jpeg_batch_decoder` in `map_inline`), batches in parallel: the
    decoding the reader itself does. Per image it avoids tf.data's per-element cost, which with
    several threads per worker is large.
    The headline overhead is against the faster of the two.
  * reader: pipelines.reader.open_dataset with its defaults (files, parallel interleave, parsing,
    decode, the corruption and label checks, shuffle buffer, batch, prefetch): uint8 batches.
  * augment: the reader's augmentation (random flip, x / 127.5 - 1 to float32), which runs in the
    compiled training step: timed here on this CPU over the reader's batches and reported apart
    (per image, and as a share of decode-only), since on a GPU it runs on the device instead.
The overhead is paired: reader time / baseline time within each round (img/s summed over the
workers), then the median over rounds. Medians of each pipeline's img/s taken apart let one slow
round of either move the ratio (run-to-run spread ~±6 points at 3 rounds, measured); the paired
median cancels what drifts between rounds.
The reader keeps a shuffle buffer and prefetched batches of decoded images, so a timed window
must be long against them (--steps 600 batches of 128: 76,800 images against the default 4,096-image
buffer) or it would count images decoded before it began.
With --workers 2, each pipeline runs in two processes on this host, as ranks 0 and 1 of 2 (rank
and size passed explicitly: the reader needs no collective); images/s are summed over the
workers. File barriers order the turns; the JSON row keeps each turn's start and end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from launch import host_memory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="dataset directory (with manifest.json)")
    p.add_argument("--workers", type=int, default=1, choices=(1, 2), help="reader processes on this host")
    p.add_argument("--batch", type=int, default=128, help="batch size per worker")
    p.add_argument(
        "--steps", type=int, default=600, help="batches per timed round (default 600: many times the reader's buffers)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of each (medians reported)")
    p.add_argument("--shuffle-buffer", type=int, default=4096, help="reader's shuffle buffer (default 4096)")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="the reader in skip_corrupt mode (every batch guarded by a record-by-record fallback)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="append the result as a JSON line here")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--barrier-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pipeline", default=None, choices=PIPELINES, help=argparse.SUPPRESS)


PIPELINES = ("decode_only", "decode_batched", "reader")


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"pfc bench data: --{name} must be >= 1, got {getattr(args, name)}")
    if args.rank is not None:
        return _measure(args, args.rank, args.workers, args.barrier_dir, args.pipeline)
    # One process per pipeline and worker, timed in turn (see the module docstring).
    with tempfile.TemporaryDirectory() as barrier:
        argv = [
            sys.executable,
            "-m",
            "launch.cli",
            "bench",
            "data",
            args.path,
            "--workers",
            str(args.workers),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--rounds",
            str(args.rounds),
            "--shuffle-buffer",
            str(args.shuffle_buffer),
            "--barrier-dir",
            barrier,
        ]
        argv += ["--skip-corrupt"] if args.skip_corrupt else []
        # as horovodrun tells its workers, so each sets up its allocator as in training
        env = {**os.environ, "HOROVOD_LOCAL_SIZE": str(args.workers)}
        procs = {
            (name, r): subprocess.Popen(
                argv + ["--rank", str(r), "--pipeline", name], stdout=subprocess.PIPE, text=True, env=env
            )
            for name in PIPELINES
            for r in range(args.workers)
        }
        # The others would wait for a failed process at their next barrier forever: stop them.
        while True:
            failed = [key for key, p in procs.items() if p.poll()]
            if failed:
                for p in procs.values():
                    p.kill()
                print(
                    f"pfc bench data: the {failed[0][0]} process of worker {failed[0][1]} failed "
                    f"(exit {procs[failed[0]].returncode})",
                    file=sys.stderr,
                )
                return 1
            if all(p.returncode is not None for p in procs.values()):
                break
            time.sleep(0.2)
        outs = {key: p.communicate()[0] for key, p in procs.items()}
    parts = {key: json.loads(o.strip().splitlines()[-1]) for key, o in outs.items()}
    return _report(args, [_worker_result(args, [parts[name, r] for name in PIPELINES]) for r in range(args.workers)])


def _worker_result(args, parts: list[dict]) -> dict:
    """One worker's figures from its pipelines' processes: medians of the rounds' wall and CPU
    times, and the reader's process's other figures."""
    n = args.batch * args.steps
    reader_part = next(part for part in parts if part["pipeline"] == "reader")
    out = {k: v for k, v in reader_part.items() if k not in ("pipeline", "times", "turns")}
    for part in parts:
        name, times = part["pipeline"], part["times"]
        wall, cpu = sorted(times)[len(times) // 2]
        out[f"{name}_img_s"], out[f"{name}_cpu_us"], out[f"{name}_wall_us"] = n / wall, 1e6 * cpu / n, 1e6 * wall / n
        out.setdefault("walls", {})[name] = [t[0] for t in times]
        out.setdefault("turns", {})[name] = part["turns"]
    return out


def paired_overhead(baselines: list[list[list[float]]], reader_s: list[list[float]]) -> float:
    """Median over rounds of (reader time / baseline time - 1) for the same images.

    baselines: one or more baselines, each [workers][rounds] seconds of each worker's timed
    window; reader_s: the reader's, [workers][rounds]. Every window holds the same number of
    images. Workers run at once, so within a round images/s add up over the workers; with
    several baselines each round is compared with the one that was faster in that round.
    """
    rounds = len(reader_s[0]) if reader_s else 0
    if (
        not rounds
        or not baselines
        or any(len(t) != len(reader_s) or any(len(w) != rounds for w in t) for t in [*baselines, reader_s])
    ):
        raise ValueError("paired_overhead: one time per worker and round for every pipeline")
    rate = lambda t, k: sum(1 / w[k] for w in t)  # noqa: E731 (images/s, up to the image count)
    return statistics.median(max(rate(t, k) for t in baselines) / rate(reader_s, k) - 1 for k in range(rounds))


def _report(args, results: list[dict]) -> int:
    dec = sum(r["decode_only_img_s"] for r in results)
    dec_b = sum(r["decode_batched_img_s"] for r in results)
    rdr = sum(r["reader_img_s"] for r in results)
    walls = {name: [r["walls"][name] for r in results] for name in ("decode_only", "decode_batched", "reader")}
    over = paired_overhead([walls["decode_only"], walls["decode_batched"]], walls["reader"])
    r0 = results[0]
    result = {
        "bench": "data",
        "path": args.path,
        "workers": len(results),
        "batch": args.batch,
        "shuffle_buffer": args.shuffle_buffer,
        "skip_corrupt": args.skip_corrupt,
        "rounds": args.rounds,
        "image_size": r0["image_size"],
        "threads_per_worker": r0["threads"],
        "malloc_arena_max": r0["malloc_arena_max"],
        "decode_only_img_s": round(dec, 1),
        "decode_batched_img_s": round(dec_b, 1),
        "reader_img_s": round(rdr, 1),
        "overhead": round(over, 3),
        "overhead_vs_per_image": round(paired_overhead([walls["decode_only"]], walls["reader"]), 3),
        "overhead_vs_batched": round(paired_overhead([walls["decode_batched"]], walls["reader"]), 3),
        "augment_us_per_img": round(sum(r["augment_us"] for r in results) / len(results), 1),
        "augment_share_of_decode": round(
            sum(r["augment_us"] / r["decode_only_wall_us"] for r in results) / len(results), 3
        ),
        "decode_only_cpu_us_per_img": round(sum(r["decode_only_cpu_us"] for r in results) / len(results), 1),
        "decode_batched_cpu_us_per_img": round(sum(r["decode_batched_cpu_us"] for r in results) / len(results), 1),
        "reader_cpu_us_per_img": round(sum(r["reader_cpu_us"] for r in results) / len(results), 1),
        "walls": walls,
        "turns": {name: [r["turns"][name] for r in results] for name in walls},
    }
    print(
        f"data {args.path} {r0['image_size'][0]}x{r0['image_size'][1]} workers={len(results)} "
        f"batch={args.batch} shuffle={args.shuffle_buffer}{' skip_corrupt' if args.skip_corrupt else ''}: "
        f"decode-only {dec:,.0f} img/s, batched {dec_b:,.0f}  reader {rdr:,.0f} img/s  "
        f"reader overhead {100 * over:+.1f}% over the faster (paired, median of {args.rounds} rounds)  "
        f"(CPU per image: decode-only "
        f"{result['decode_only_cpu_us_per_img']} us, batched {result['decode_batched_cpu_us_per_img']} us, "
        f"reader {result['reader_cpu_us_per_img']} us); augment in "
        f"the step {result['augment_us_per_img']} us/img on this CPU "
        f"({100 * result['augment_share_of_decode']:.0f}% of decode-only)",
        flush=True,
    )
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def _barrier(directory: str, name: str, me: str, everyone: list[str]) -> None:
    """Wait until every process in `everyone` has reached barrier `name` (files in `directory`)."""
    open(os.path.join(directory, f"{name}.{me}"), "w").close()
    while not all(os.path.exists(os.path.join(directory, f"{name}.{p}")) for p in everyone):
        time.sleep(0.005)


def baselines(pipe, batch: int, steps: int, threads: int):
    """(per-image, batched) decode-only datasets of the JPEGs `pipe`'s worker reads (its files'
    first batch * steps records, held in memory), each in a private pool of `threads`."""
    import tensorflow as tf

    from pipelines import reader, schema

    h, w = pipe.image_size
    need = batch * steps
    jpegs = []
    for f in pipe.plan.files:
        for r in tf.data.TFRecordDataset(f):
            jpegs.append(tf.io.parse_single_example(r, schema.feature_spec())[schema.IMAGE_KEY])
            if len(jpegs) >= need:
                break
        if len(jpegs) >= need:
            break
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    # The reader's own decoders (at the stored size: no resize).
    decode_batch, decode_one = reader.jpeg_batch_decoder(batch, (h, w), (h, w))
    encoded = tf.data.Dataset.from_tensor_slices(tf.stack(jpegs)).repeat()  # (stacked once: ~0.5 GB)
    per_image = (
        encoded.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
        .with_options(options)
    )
    batched = (
        reader.map_inline(encoded.batch(batch, drop_remainder=True), decode_batch, parallel=threads)
        .prefetch(2)
        .with_options(options)
    )
    return per_image, batched


def warmup_batches(shuffle_buffer: int, batch: int) -> int:
    """Batches to draw before a timed window: tracing, threads, and two full shuffle buffers."""
    return max(10, 2 * -(-shuffle_buffer // batch))


def timed_window(ds, warmup: int, steps: int, ready=None) -> tuple[float, float]:
    """(wall s, process CPU s) of `steps` batches from a fresh iterator of `ds` after `warmup`
    batches (and `ready()`, e.g. a barrier). The iterator is dropped afterwards, and its background
    threads given time to stop, so they do not run into the next window (measured: a pipeline
    still prefetching slowed the next one)."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    if ready is not None:
        ready()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(it)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    gc.collect()
    time.sleep(1.0)
    return wall, cpu


def _measure(args, rank: int, size: int, barrier: str, pipeline: str) -> int:
    """One pipeline of one worker, in its own process: `args.rounds` timed windows, each when the
    previous pipeline's window of the round has ended (all processes meet before each), started
    together with the other workers' windows of the same pipeline. Prints a JSON line."""
    import tensorflow as tf

    from pipelines import reader
    from pipelines.threads import cores_per_worker

    # Each worker's pipelines get its share of the cores, as `pfc train` gives them.
    threads = cores_per_worker(size)
    pipe = reader.open_dataset(
        args.path,
        args.batch,
        rank=rank,
        size=size,
        seed=0,
        shuffle_buffer=args.shuffle_buffer,
        skip_corrupt=args.skip_corrupt,
        threads=threads,
    )
    if pipeline == "reader":
        ds = pipe.dataset
    else:
        ds = baselines(pipe, args.batch, args.steps, threads)[PIPELINES.index(pipeline)]
    everyone = [f"{name}-{r}" for name in PIPELINES for r in range(size)]
    me, peers = f"{pipeline}-{rank}", [f"{pipeline}-{r}" for r in range(size)]
    warmup = warmup_batches(args.shuffle_buffer, args.batch)
    times, turns = [], []  # (wall s, CPU s) of each timed window; (start, end) of each turn
    for rnd in range(args.rounds):  # alternating, so drift hits all alike
        for name in PIPELINES:
            _barrier(barrier, f"turn-{rnd}-{name}", me, everyone)
            if name == pipeline:
                t0 = time.monotonic()  # (the host's clock: comparable across processes)
                times.append(
                    timed_window(ds, warmup, args.steps, lambda rnd=rnd: _barrier(barrier, f"start-{rnd}", me, peers))
                )
                turns.append((t0, time.monotonic()))
    result = {
        "pipeline": pipeline,
        "rank": rank,
        "threads": threads,
        "malloc_arena_max": host_memory.arena_limit,
        "image_size": list(pipe.image_size),
        "times": times,
        "turns": turns,
    }
    if pipeline == "reader":
        # The augmentation as the training step runs it (compiled, here on the CPU), on real batches.
        batches = [b[0] for b in pipe.dataset.take(8)]
        augment = tf.function(pipe.augment)
        augment(batches[0], tf.constant(0, tf.int64)).numpy()
        _barrier(barrier, "augment", me, peers)
        t0 = time.perf_counter()
        for i in range(max(1, args.steps // 10)):
            augment(batches[i % len(batches)], tf.constant(i, tf.int64)).numpy()
        result["augment_us"] = 1e6 * (time.perf_counter() - t0) / (args.batch * max(1, args.steps // 10))
    print(json.dumps(result), flush=True)
    return 0
