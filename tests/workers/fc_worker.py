"""Run by `horovodrun -np N` (or directly for N = 1): every margin's loss and gradients on this
worker's share, saved for the test process to compare with the dense reference."""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cases import (
    GRAPH_MARGINS,
    LOCAL_BATCH,
    MARGINS,
    SAMPLE_RATE,
    SAMPLED_MARGINS,
    STEP,
    class_counts,  # noqa: E402
    global_batch,
    reset_state,
)

import cluster  # noqa: E402
import partitioned_fc  # noqa: E402


def step(fc, inputs, labels, backbone):
    """Linear backbone x = inputs @ A, then the layer. Returns loss, acc, the three gradients and
    the gradient of the margin's learned state (SphereFace2's bias; 0 for the others)."""
    reset_state(fc.margin)
    x_in = tf.convert_to_tensor(inputs)
    with tf.GradientTape() as tape:
        tape.watch(x_in)
        x = tf.matmul(x_in, backbone)
        loss, acc = fc(x, labels, step=STEP, return_accuracy=True)
    learned = [fc.margin.bias] if fc.margin.binary else []
    g_x, g_w, g_a, *g_b = tape.gradient(loss, [x_in, fc.weight, backbone, *learned])
    return loss, acc, g_x, g_w, g_a, g_b[0] if g_b else tf.constant(0.0)


def main(out_dir: str) -> None:
    comm = cluster.init()
    assert cluster.init() is comm
    r, n = comm.rank, comm.size
    results = {"world_size": n}
    for num_classes in class_counts(n):
        inputs, labels, backbone = global_batch(num_classes, n)
        sl = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        a_var = tf.Variable(backbone)
        for name, margin in MARGINS.items():
            fc = partitioned_fc.PartitionedFC(num_classes, backbone.shape[1], margin, comm, seed=11)
            key = f"{num_classes}/{name}"
            results[key + "/range"] = np.array(fc.class_range)
            results[key + "/w0"] = fc.weight.numpy()
            label_dtype = tf.int32 if name == "arcface" else tf.int64  # both dtypes accepted
            outs = step(fc, inputs[sl], tf.constant(labels[sl], label_dtype), a_var)
            for tag, v in zip(("loss", "acc", "gx", "gw", "ga", "gb"), outs):
                results[f"{key}/{tag}"] = np.asarray(v)
            for stat, var in margin.state().items():  # after the call: advanced once
                results[f"{key}/state/{stat}"] = var.numpy()
            if name in GRAPH_MARGINS:
                g = tf.function(step)(fc, inputs[sl], tf.constant(labels[sl]), a_var)
                for tag, v in zip(("loss", "acc", "gx", "gw", "ga", "gb"), g):
                    results[f"{key}/graph_{tag}"] = np.asarray(v)
        # Partial FC: the sampled index is left on the layer so the test can rebuild the dense problem.
        for name in SAMPLED_MARGINS:
            fc = partitioned_fc.PartitionedFC(
                num_classes, backbone.shape[1], MARGINS[name], comm, seed=11, sample_rate=SAMPLE_RATE
            )
            outs = step(fc, inputs[sl], tf.constant(labels[sl]), a_var)
            key = f"{num_classes}/sampled_{name}"
            for tag, v in zip(("loss", "acc", "gx", "gw", "ga", "gb"), outs):
                results[f"{key}/{tag}"] = np.asarray(tf.convert_to_tensor(v))
            results[key + "/index"] = fc.sampled_index.numpy()
        # Accuracy across shards: embeddings equal to the label's row for even samples and to another
        # class's row for odd ones -> exactly half are right, wherever the rows live.
        w_full = tf.concat(comm.allgather(fc.weight), axis=0)
        b = len(labels)
        pred = np.where(np.arange(b) % 2 == 0, labels, (labels + 1) % num_classes)
        emb = tf.gather(w_full, pred)[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]
        fc_cos = partitioned_fc.PartitionedFC(num_classes, backbone.shape[1], MARGINS["cosface"], comm, seed=11)
        _, acc = fc_cos(emb, labels[sl], return_accuracy=True)
        results[f"{num_classes}/acc_half"] = np.asarray(acc)
        results[f"{num_classes}/acc_half_expected"] = np.mean(pred == labels)
    np.savez(os.path.join(out_dir, f"rank{r}.npz"), **results)


if __name__ == "__main__":
    main(sys.argv[1])
