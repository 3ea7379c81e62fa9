"""The exact softmax cross-entropy over class-sharded logits (MARGINS.md, "Model-parallel form").

One custom-gradient function does the heavy `[B, C_r]` part on each worker: the local logits,
the margin target written into its entry before any reduction, the partial logsumexp statistics
exchanged with two small allreduces, and a backward that needs no collective. Autodiff of the
same computation would keep several `[B, C_r]` temporaries; this keeps one (the exponentials),
and the backward reuses them instead of recomputing `exp`.
"""
from __future__ import annotations

import tensorflow as tf

from cluster import Cluster


def sharded_cross_entropy(comm: Cluster, x_feat: tf.Tensor, weight: tf.Tensor, target: tf.Tensor,
                          local_label: tf.Tensor, *, scale: float, normalize_weights: bool):
    """Per-sample loss and top-1 correctness over all C classes, this worker holding C_r of them.

    x_feat:      [B, D] the global batch, already normalized if the margin wants it (replicated).
    weight:      [C_r, D] this worker's raw class rows.
    target:      [B] margin target logit f'_y; only meaningful where this worker owns the label.
    local_label: [B] int32 label index into this shard, -1 where another worker owns it.
    Returns (loss [B] = logsumexp_j f'_ij − f'_{i,y_i}, identical on every worker;
             correct [B] float 0/1: the label has the largest plain logit over all C classes).
    Gradients flow to x_feat (this shard's share), weight (exact) and target (exact, owner only).
    """
    owned = local_label >= 0
    rows = tf.cast(tf.where(owned)[:, 0], tf.int32)            # [B_o] batch rows owned here
    idx = tf.stack([rows, tf.gather(local_label, rows)], axis=1)  # [B_o, 2] their target entries

    @tf.custom_gradient
    def _ce(x, w, t):
        w_feat, inv_norm = _maybe_normalize(w, normalize_weights)
        z = tf.matmul(x, w_feat, transpose_b=True)                 # [B, C_r]
        del w_feat  # [C_r, D]: recomputed in the backward rather than kept
        if scale != 1.0:
            z = z * scale
        plain_t = tf.gather_nd(z, idx)
        plain_max = tf.reduce_max(z, axis=1)
        t_owned = tf.gather(t, rows)
        z = tf.tensor_scatter_nd_update(z, idx, t_owned)        # f' : margin on the target entry
        maxes = comm.allreduce_max(tf.stack([tf.reduce_max(z, axis=1), plain_max]))
        m = maxes[0]
        e = tf.exp(z - m[:, None])                               # [B, C_r], kept for backward
        del z
        zero = tf.zeros_like(m)
        sums = comm._allreduce(tf.stack([
            tf.reduce_sum(e, axis=1),
            tf.tensor_scatter_nd_update(zero, rows[:, None], t_owned),
            tf.tensor_scatter_nd_update(zero, rows[:, None], plain_t),
        ]), "sum")
        s, t_all, plain_t_all = sums[0], sums[1], sums[2]
        loss = m + tf.math.log(s) - t_all
        correct = tf.cast(plain_t_all >= maxes[1], x.dtype)

        def grad(d_loss, d_correct):
            del d_correct  # correctness is a step function: no gradient
            coeff = d_loss / s                                   # [B]
            dz = e * coeff[:, None]                              # dL/df' = softmax · upstream
            p_t = tf.gather_nd(dz, idx)
            # The target entry came from `t`, not from the matmul: its share goes to `t`, and the
            # −1 of "− f'_y" (an allreduced sum, identity for the owner's share) with it.
            dz = tf.tensor_scatter_nd_update(dz, idx, tf.zeros_like(p_t))
            d_t = tf.scatter_nd(rows[:, None], p_t - tf.gather(d_loss, rows), tf.shape(t))
            if scale != 1.0:
                dz = dz * scale
            wf = w if inv_norm is None else w * inv_norm[:, None]
            dx = tf.matmul(dz, wf)                               # [B, D]   this shard's share
            dwf = tf.matmul(dz, x, transpose_a=True)             # [C_r, D]
            if inv_norm is None:
                dw = dwf
            else:                                                # through w / |w|
                dw = (dwf - wf * tf.reduce_sum(dwf * wf, axis=1, keepdims=True)) * inv_norm[:, None]
            return dx, dw, d_t

        return (loss, correct), grad

    return _ce(x_feat, weight, target)


def _maybe_normalize(w: tf.Tensor, normalize: bool):
    """w -> (w / |w| row-wise, 1/|w|) or (w, None)."""
    if not normalize:
        return w, None
    inv_norm = tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(w), axis=1), 1e-12))
    return w * inv_norm[:, None], inv_norm
