"""CPU per image of the reader's stages before decoding (an indented stage adds to the one above).

    .venv/bin/python bench/reader_stages.py /tmp/pfc-bench-data-112-40k [--batches 300]

The record stream of `pipelines.reader` rebuilt in the same shape (16 files interleaved, blocks
of 64 records, windows of 4096 records each permuted by one gather, batches of 128 cut from
them), read and parsed two ways: with TensorFlow's TFRecordDataset and parse_example, and with
the reader's compiled op (`pipelines.record_blocks`). Under `pfc`'s allocator settings and a
2-thread pool, as one worker on 2 cores gets. It leaves out the reader's per-block bookkeeping,
the tags and the checks. Compare with `pfc bench data`'s CPU µs/img of batched decoding.
Timed as `pfc bench data` times its pipelines (`bench.data.timed_window`).
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

    from bench.data import timed_window
    from pipelines import reader, record_blocks, schema

    files = sorted(glob.glob(os.path.join(args.data, "*.tfrecord")))
    if not files:
        raise SystemExit(f"reader_stages: no *.tfrecord files in {args.data}")

    options = tf.data.Options()
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 2

    def interleaved(read):
        return tf.data.Dataset.from_tensor_slices(files).interleave(read, cycle_length=16).repeat()

    # TensorFlow's record reader, one record per element, batched, then parse_example
    tf_blocks = interleaved(lambda f: tf.data.TFRecordDataset(f, buffer_size=1 << 20).batch(64)).rebatch(128)
    # the reader's op: blocks read and parsed in one call (JPEGs, labels)
    op_blocks = interleaved(lambda f: record_blocks.RecordBlocks(f, 64).map(lambda s, j, y, d: (j, y)))

    def permute(k, window):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(tf.shape(window[0])[0]), seed=tf.stack([tf.constant(1, tf.int64), k])
        )
        return tuple(tf.gather(t, order) for t in window)

    stages = {
        "TFRecordDataset, blocks of 64": tf_blocks,
        "  + parse_example": reader.map_inline(tf_blocks, lambda r: tf.io.parse_example(r, schema.feature_spec())),
        "record_blocks op, blocks of 64": op_blocks.rebatch(128),
        "  + window permutation (4096)": reader.map_inline(op_blocks.rebatch(4096).enumerate(), permute).rebatch(128),
    }
    n = 128 * args.batches
    for name, ds in stages.items():
        # warm-up of 20 batches: files open, shuffle buffer full
        wall, cpu = timed_window(ds.with_options(options), 20, args.batches)
        print(f"{name:34s} {1e6 * cpu / n:6.1f} µs CPU/img  {n / wall:10,.0f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
