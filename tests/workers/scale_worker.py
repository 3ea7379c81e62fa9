"""Run by `horovodrun -np N` (or directly for N = 1): chunked logits, the fused train step with the
sparse shard optimizers, and 16-bit storage, saved for the test to compare with a dense reference."""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cases import (
    LOCAL_BATCH,
    MARGINS,
    STEP,
    TAPE_CHUNK_MARGINS,
    TRAIN_CASES,
    class_counts,
    global_batch,
    reset_state,
    train_class_counts,
)  # noqa: E402

import cluster  # noqa: E402
import partitioned_fc  # noqa: E402
from partitioned_fc import optimizer as shard_opt  # noqa: E402

LR = 0.5  # large enough that every update is visible in float32


def tape_step(fc, x_in, labels, backbone):
    reset_state(fc.margin)
    with tf.GradientTape() as tape:
        tape.watch(x_in)
        loss, acc = fc(tf.matmul(x_in, backbone), labels, step=STEP, return_accuracy=True)
    g_x, g_w = tape.gradient(loss, [x_in, fc.weight])
    return loss, acc, g_x, tf.convert_to_tensor(g_w)


def main(out_dir: str) -> None:
    comm = cluster.init()
    r, n = comm.rank, comm.size
    res = {"world_size": n}
    for num_classes in class_counts(n):
        inputs, labels, backbone = global_batch(num_classes, n)
        sl = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        x_in, a = tf.constant(inputs[sl]), tf.constant(backbone)
        emb = tf.matmul(x_in, a)
        # The tape form with chunked logits: chunk sizes that do and do not divide the shard.
        for name in TAPE_CHUNK_MARGINS:
            for chunk in (1, 3):
                fc = partitioned_fc.PartitionedFC(
                    num_classes, backbone.shape[1], MARGINS[name], comm, seed=11, chunk_size=chunk
                )
                for tag, v in zip(("loss", "acc", "gx", "gw"), tape_step(fc, x_in, labels[sl], a)):
                    res[f"{num_classes}/tape/{name}/{chunk}/{tag}"] = np.asarray(v)
        # The fused step: two steps of forward + backward + sparse update.
        for case in TRAIN_CASES:
            if num_classes not in train_class_counts(case["id"], n):
                continue
            key = f"{num_classes}/train/{case['id']}"
            fc = partitioned_fc.PartitionedFC(
                num_classes,
                backbone.shape[1],
                MARGINS[case["margin"]],
                comm,
                seed=11,
                sample_rate=case["rate"],
                chunk_size=case["chunk"],
                compute_dtype=case.get("dtype", "float32"),
                param_dtype=case.get("dtype", "float32"),
            )
            opt = shard_opt.get(case["opt"], fc.weight, **case["opt_params"])
            step_fn = tf.function(fc.train_step) if case["graph"] else fc.train_step
            res[key + "/w0"] = fc.weight.numpy().astype(np.float32)
            reset_state(fc.margin)  # the two steps advance it twice, as the test's reference does
            for s in range(2):
                out = step_fn(emb, labels[sl], opt, LR, step=STEP)
                res[f"{key}/{s}/loss"] = out.loss.numpy()
                res[f"{key}/{s}/acc"] = out.accuracy.numpy()
                res[f"{key}/{s}/demb"] = out.d_embeddings.numpy()
                res[f"{key}/{s}/applied"] = out.applied.numpy()
                res[f"{key}/{s}/w"] = fc.weight.numpy().astype(np.float32)
                for slot, var in opt.state().items():
                    res[f"{key}/{s}/state/{slot}"] = var.numpy().astype(np.float32)
                if case["rate"] < 1:
                    res[f"{key}/{s}/index"] = fc.sampled_index.numpy()
                for stat, var in fc.margin.state().items():
                    res[f"{key}/{s}/margin/{stat}"] = var.numpy()
            res[key + "/weight_dtype"] = np.array(fc.weight.dtype.name)
            res[key + "/state_dtypes"] = np.array(sorted(v.dtype.name for v in opt.state().values()))
        # A non-finite loss leaves everything as it was.
        fc = partitioned_fc.PartitionedFC(
            num_classes, backbone.shape[1], MARGINS["softmax"], comm, seed=11, chunk_size=2
        )
        opt = shard_opt.SGD(fc.weight, momentum=0.9)
        bad = emb + (np.inf if r == 0 else 0.0)
        before = fc.weight.numpy()
        out = fc.train_step(bad, labels[sl], opt, LR)
        res[f"{num_classes}/nonfinite/applied"] = out.applied.numpy()
        res[f"{num_classes}/nonfinite/unchanged"] = np.array(
            np.array_equal(before, fc.weight.numpy()) and not opt.velocity.numpy().any()
        )
    np.savez(os.path.join(out_dir, f"rank{r}.npz"), **res)


if __name__ == "__main__":
    main(sys.argv[1])
