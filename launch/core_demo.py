"""`make demo` until `pfc train` lands: a data-parallel linear backbone + PartitionedFC trained on
synthetic identities, under horovodrun or alone. Shows the loss falling and top-1 accuracy rising.

Each identity is a random centre in input space; samples are noisy views of it. The backbone is a
linear map to the embedding space (no batch statistics), its gradient SUMMED over workers, and
each worker's FC shard updated with its own exact gradient.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow as tf

import cluster
import partitioned_fc
from partitioned_fc import margins


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--classes", type=int, default=2000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--input-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=128, help="per worker")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--margin", default="cosface")
    args = p.parse_args(argv)

    comm = cluster.init()
    fc = partitioned_fc.PartitionedFC(args.classes, args.dim, margins.get(args.margin), comm, seed=0)
    centres = np.random.default_rng(0).normal(size=(args.classes, args.input_dim)).astype(np.float32)
    backbone = tf.Variable(np.random.default_rng(1).normal(
        scale=args.input_dim ** -0.5, size=(args.input_dim, args.dim)).astype(np.float32))
    comm.broadcast_variables([backbone], root=0)
    rng = np.random.default_rng(100 + comm.rank)  # each worker draws its own samples

    @tf.function
    def step(inputs, labels):
        with tf.GradientTape() as tape:
            loss, acc = fc(tf.matmul(inputs, backbone), labels, return_accuracy=True)
        g_backbone, g_fc = tape.gradient(loss, [backbone, fc.weight])
        # The layer's loss is the GLOBAL mean: data-parallel gradients are summed, not averaged.
        backbone.assign_sub(args.lr * comm.allreduce_sum(g_backbone))
        fc.weight.assign_sub(args.lr * args.classes / 10 * g_fc)  # rows see few samples per step
        return loss, acc

    first = None
    t0 = time.perf_counter()
    for s in range(1, args.steps + 1):
        labels = rng.integers(0, args.classes, args.batch)
        inputs = centres[labels] + 0.5 * rng.normal(size=(args.batch, args.input_dim)).astype(np.float32)
        loss, acc = step(tf.constant(inputs), tf.constant(labels))
        first = first if first is not None else float(loss)
        if comm.rank == 0 and (s % 50 == 0 or s == 1):
            rate = s * args.batch * comm.size / (time.perf_counter() - t0)
            print(f"step {s:4d}  loss {float(loss):8.4f}  acc {float(acc):6.3f}  "
                  f"{rate:8.0f} samples/s  ({comm.size} worker(s), {args.classes} classes)", flush=True)
    if comm.rank == 0:
        print(f"loss {first:.3f} -> {float(loss):.3f}; final batch top-1 accuracy {float(acc):.3f}")
    return 0 if float(loss) < first and float(acc) > 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
