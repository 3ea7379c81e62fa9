"""The exact softmax cross-entropy over class-sharded logits (MARGINS.md, "Model-parallel form").

One custom-gradient function does the heavy `[B, C_r]` part on each worker: the local logits,
the margin target written into its entry before any reduction, the partial logsumexp statistics
exchanged with two small allreduces of `[B]` vectors, and a backward that needs no collective.

The local work is two XLA-compiled kernels (forward, backward) around the collectives, so the
elementwise work over `[B, C_r]` and `[C_r, D]` is fused into few passes next to the matmuls;
unfused, those passes cost about as much as the matmuls themselves on a CPU. Only one `[B, C_r]`
tensor (the exponentials) is kept between forward and backward, and the backward reuses it.

Normalized weights are never materialized: z = (s·x) Wᵀ scaled per column by 1/|W_j|.
"""
from __future__ import annotations

import tensorflow as tf

from cluster import Cluster
from partitioned_fc import margins as margins_lib


def sharded_cross_entropy(comm: Cluster, x: tf.Tensor, weight: tf.Tensor, local_label: tf.Tensor,
                          margin: margins_lib.Margin, step=0):
    """Per-sample loss and top-1 correctness over all C classes, this worker holding C_r of them.

    x:           [B, D] the global batch of raw embeddings (replicated on every worker).
    weight:      [C_r, D] this worker's raw class rows.
    local_label: [B] int32 label index into this shard, -1 where another worker owns it.
    Returns (loss [B] = logsumexp_j f'_ij − f'_{i,y_i}, identical on every worker;
             correct [B] float 0/1: the label has the largest plain logit over all C classes).
    Gradients: w.r.t. weight exact; w.r.t. x this shard's share (the allgather's gradient sums them).
    """
    owned = local_label >= 0
    label_rows = tf.maximum(local_label, 0)[:, None]  # [B, 1]; rows not owned get zero gradient
    scale = float(margin.logit_scale)
    normalize_w = margin.normalize_weights

    @tf.custom_gradient
    def _ce(x, w):
        w_rows = tf.gather(w, label_rows[:, 0])                    # [B, D] the label rows held here
        # persistent: an outer persistent tape may run this backward more than once
        with tf.GradientTape(watch_accessed_variables=False, persistent=True) as tape:
            tape.watch([x, w_rows])
            x_feat = tf.math.l2_normalize(x, axis=1) if margin.normalize_embeddings else x
            target = margins_lib.target_logit_from_rows(margin, x, w_rows, step)
            target = tf.where(owned, target, tf.zeros_like(target))
        x_s = x_feat * scale
        e, s_loc, m_loc, plain_max, plain_t, inv = _forward(x_s, w, target, local_label, normalize_w)
        maxes = comm.allreduce_max(tf.stack([m_loc, plain_max]))
        m = maxes[0]
        # Each worker exponentiated against its own max; rescale its partial sum to the global one.
        # target and plain_t are 0 where another worker owns the label: their sums are the owner's.
        sums = comm.allreduce_sum(tf.stack([s_loc * tf.exp(m_loc - m), target, plain_t]))
        lse = m + tf.math.log(sums[0])
        loss = lse - sums[1]
        correct = tf.cast(sums[2] >= maxes[1], x.dtype)

        def grad(d_loss, d_correct):
            del d_correct  # correctness is a step function: no gradient
            # softmax_ij · upstream_i = e_ij · exp(m_loc_i − lse_i) · upstream_i
            coeff = d_loss * tf.exp(m_loc - lse)
            p_t = tf.gather_nd(e, tf.concat([tf.range(tf.shape(e)[0])[:, None], label_rows], 1)) * coeff
            # The target entry came from f'_y: its softmax share, and the −f'_y term of the loss (an
            # allreduced sum of which the owner holds the share), go back through the margin.
            d_t = tf.where(owned, p_t - d_loss, tf.zeros_like(p_t))
            dx_feat_s, dw = _backward(e, coeff, local_label, x_s, w, inv)
            dx, dw_rows = tape.gradient([target, x_feat], [x, w_rows],
                                        output_gradients=[d_t, dx_feat_s * scale])
            dw = tf.tensor_scatter_nd_add(dw, label_rows, dw_rows)
            return dx, dw

        return (loss, correct), grad

    return _ce(x, weight)


@tf.function(jit_compile=True)
def _forward(x_s, w, t, local_label, normalize: bool):
    """Local logits with the target entry replaced, their exponentials and row statistics.

    [B, D], [C_r, D], [B], [B] -> e [B, C_r] = exp(f' − m_loc), Σ_j e [B], m_loc [B],
    max plain logit [B], plain target logit [B] (0 where not owned), 1/|w_j| [C_r] (or None).
    """
    z = tf.matmul(x_s, w, transpose_b=True)
    inv = None
    if normalize:
        inv = tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(w), axis=1), 1e-12))
        z = z * inv[None, :]
    is_t = _target_mask(local_label, tf.shape(w)[0])
    plain_max = tf.reduce_max(z, axis=1)
    plain_t = tf.reduce_sum(tf.where(is_t, z, tf.zeros_like(z)), axis=1)
    z = tf.where(is_t, t[:, None], z)
    m_loc = tf.reduce_max(z, axis=1)
    e = tf.exp(z - m_loc[:, None])
    return e, tf.reduce_sum(e, axis=1), m_loc, plain_max, plain_t, inv


def _backward(e, coeff, local_label, x_s, w, inv):
    """[B, C_r] e, [B] coeff -> dL/dx_s [B, D] (this shard's share), dL/dw [C_r, D] (logits part).

    inv: the forward's 1/|w_j| [C_r] when weights are normalized, else None. Two kernels: XLA
    fuses a row reduction placed after a matmul into the matmul and loses the fast one (measured
    1.6x slower), so the normalization's radial term is compiled on its own.
    """
    dx_s, pw = _logit_grads(e, coeff, local_label, x_s, w, inv)
    return dx_s, (pw if inv is None else _remove_radial(pw, w, inv))


@tf.function(jit_compile=True)
def _logit_grads(e, coeff, local_label, x_s, w, inv):
    p = e * coeff[:, None]
    is_t = _target_mask(local_label, tf.shape(w)[0])
    dz = tf.where(is_t, tf.zeros_like(p), p)      # the target entry's gradient goes to f'_y
    if inv is not None:
        dz = dz * inv[None, :]                     # through z = (x_s·w_j) / |w_j|
    return tf.matmul(dz, w), tf.matmul(dz, x_s, transpose_a=True)


@tf.function(jit_compile=True)
def _remove_radial(pw, w, inv):
    """d/dw_j of (x·w_j)/|w_j| = (I − ŵ_j ŵ_jᵀ) · pw_j, pw_j being the part through x·w_j / |w_j|."""
    return pw - (tf.reduce_sum(pw * w, axis=1) * tf.square(inv))[:, None] * w


def _target_mask(local_label, rows):
    """[B, C_r] bool, True at each owned label's entry; fused by XLA, never materialized."""
    return tf.range(rows, dtype=local_label.dtype)[None, :] == local_label[:, None]
