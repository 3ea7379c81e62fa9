"""Each XLA kernel of the fused FC step timed alone, beside the bare matmuls it contains.

    python -m bench.fc_kernels [--classes 100000] [--batch 256] [--block 16384] [--repeats 7]

One thread, float32, normalized rows (ArcFace's path), SGD with momentum. Prints, per kernel,
its median time, the median of its matmuls alone (alternated with it in this process) and the
difference: what the kernel's passes over memory cost on top of its matmuls
(docs/benchmarks.md, "Where the rest goes").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import tensorflow as tf

from partitioned_fc import sharded_softmax as ss


def _run(fn: Callable[[], object]) -> float:
    """One call, its outputs fetched -> seconds."""
    start = time.perf_counter()
    for t in tf.nest.flatten(fn()):
        t.numpy()
    return time.perf_counter() - start


def _alternate(kernel: Callable, matmuls: Callable, repeats: int) -> tuple[float, float]:
    """-> median ms of each, run in turn after one warm-up call of both."""
    _run(kernel), _run(matmuls)
    pairs = [(_run(kernel), _run(matmuls)) for _ in range(repeats)]
    return tuple(1000 * statistics.median(p[i] for p in pairs) for i in (0, 1))


@tf.function(jit_compile=True)
def _logits_matmul(x, w):
    """[B, D], [C_r, D] -> [B, C_r]."""
    return tf.matmul(x, w, transpose_b=True)


@tf.function(jit_compile=True)
def _grad_matmuls(dz, w, x):
    """[B, k], [k, D], [B, D] -> dx [B, D], dw [k, D]."""
    return tf.matmul(dz, w), tf.matmul(dz, x, transpose_a=True)


def _momentum(w, g, state, lr):
    """The shard SGD's shape of rule: one slot."""
    v = 0.9 * state[0] + g
    return w - lr * v, (v,)


def _cases(classes: int, batch: int, block: int):
    """-> [(name, kernel, its matmuls, matmuls per step)] on random data."""
    x = tf.random.normal([batch, 512]) * 10.0
    weight = tf.Variable(tf.random.normal([classes, 512]))
    slot = tf.Variable(tf.zeros([classes, 512]))
    label = tf.random.uniform([batch], 0, classes, tf.int32)
    t = tf.random.normal([batch])
    kw = dict(normalize=True, rule=None, ctx=None, group=1)
    e = ss._kept_forward(x, weight, None, t, label, **kw)[4]
    rows = tf.range(block)
    w_block, dz = tf.gather(weight, rows), tf.random.normal([batch, block])
    pw, dw_rows, count = tf.random.normal([block, 512]), tf.random.normal([batch, 512]), tf.constant(0)
    blocks = -(-classes // block)
    return [
        (
            "fc_forward (whole shard)",
            lambda: ss._kept_forward(x, weight, None, t, label, **kw),
            lambda: _logits_matmul(x, weight),
            1,
        ),
        (
            "fc_grads (one block)",
            lambda: ss._kept_grads(e, rows, tf.ones([batch]), x, weight, rows, label, normalize=True),
            lambda: _grad_matmuls(dz, w_block, x),
            blocks,
        ),
        (
            "fc_update (one block)",
            lambda: ss._update_kernel(
                count, pw, weight, (slot,), rows, label, dw_rows, 0.01, _momentum, normalize=True
            ),
            lambda: tf.constant(0.0),
            blocks,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Print one row per kernel: ms alone, ms of its matmuls, calls per step."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--block", type=int, default=16_384)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print("| kernel | ms | its matmuls, ms | rest, ms | calls / step |\n|---|---|---|---|---|")
    for name, kernel, matmuls, calls in _cases(args.classes, args.batch, args.block):
        k, m = _alternate(kernel, matmuls, args.repeats)
        print(f"| {name} | {k:.1f} | {m:.1f} | {k - m:.1f} | {calls} |")


if __name__ == "__main__":
    main()
