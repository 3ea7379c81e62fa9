"""CPU per image of the reader's stages before decoding, each stage added to the last.

    .venv/bin/python bench/reader_stages.py /tmp/pfc-bench-data-112-40k [--batches 300]

The stages of `pipelines.reader`'s record stream, rebuilt from tf.data parts in the same shape
(16 files interleaved, blocks of 64 records, windows of 4096 records each permuted by one
gather, batches of 128 cut from them, parse of the two keys), under `pfc`'s allocator settings and a 2-thread pool as one worker on 2 cores
gets. It leaves out the reader's per-block bookkeeping, the tags and the checks, so the reader's own
figure is above the last line. Compare with `pfc bench data`'s CPU µs/img of batched decoding.
Timed as `pfc bench data` times its pipelines (`launch.bench_data.timed_window`).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--batches", type=int, default=300)
    args = p.parse_args()
    from launch import host_memory

    host_memory.configure()  # before TensorFlow loads
    import tensorflow as tf

    from launch.bench_data import timed_window
    from pipelines import reader, schema

    files = sorted(glob.glob(os.path.join(args.data, "*.tfrecord")))
    if not files:
        raise SystemExit(f"reader_stages: no *.tfrecord files in {args.data}")

    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 2
    blocks = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20).batch(64), cycle_length=16).repeat()

    def permute(k, window):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(window)[0]), seed=tf.stack([tf.constant(1, tf.int64), k]))
        return tf.gather(window, order)

    shuffled = reader.map_inline(blocks.rebatch(4096).enumerate(), permute).rebatch(128)
    stages = {
        "read in blocks of 64, rebatch(128)": blocks.rebatch(128),
        "+ window permutation (4096)": shuffled,
        "+ parse_example": reader.map_inline(shuffled, lambda r: tf.io.parse_example(r, schema.feature_spec())),
    }
    n = 128 * args.batches
    for name, ds in stages.items():
        # warm-up of 20 batches: files open, shuffle buffer full
        wall, cpu = timed_window(ds.with_options(options), 20, args.batches)
        print(f"{name:34s} {1e6 * cpu / n:6.1f} µs CPU/img  {n / wall:10,.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
