"""The exact softmax cross-entropy over class-sharded logits (docs/margins.md, "Model-parallel form").

Each worker does the heavy `[B, C_r]` part against the rows it holds: the local logits with the
margin target written into its entry before any reduction, partial logsumexp statistics exchanged
with two small allreduces of `[B]` vectors, and a backward that needs no collective.

Two ways to walk the rows, same numbers:
- one block (`chunk_size=None`): the exponentials `[B, C_r]` are kept between forward and
  backward and reused (no recompute); memory O(B·C_r). The backward still walks them in blocks of
  BACKWARD_BLOCK rows, so no weight-sized gradient or optimizer temporary ever exists.
- blocks of K rows (`chunk_size=K`): the forward keeps a streaming max / sum-exp per sample, the
  backward recomputes each block's logits from the global logsumexp. Nothing `[B, C_r]` exists;
  each block's weight gradient is handed to a sink as soon as it is known (an optimizer applies it
  to those rows and drops it), so memory is O(B·K) on top of the weights.

The local work is XLA-compiled kernels around the collectives, so the elementwise work over
`[B, K]` and `[K, D]` is fused next to the matmuls; unfused, those passes cost about as much as
the matmuls on a CPU. Normalized weights are never materialized: z = (s·x) Wᵀ scaled per column
by 1/|W_j|. Matmuls run in `compute_dtype`; logits, softmax statistics and gradients are float32.

The target logit f'_y goes through the margin on the autodiff tape (any margin, its exact
derivative); everything `[B, C_r]` is differentiated by hand.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from cluster import Cluster
from partitioned_fc import margins as margins_lib

# sink(state, positions [K] int32, grad [K, D] float32) -> state: consumes one block's gradient.
# Rows per block of the backward when the forward was one block: the weight gradient and the
# optimizer's temporaries are O(BACKWARD_BLOCK · D), never the size of the shard.
BACKWARD_BLOCK = 16384
Sink = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


class RowSource:
    """The rows a step works on: all of the shard, or a sampled subset (Partial FC).

    weight: [C_r, D] the shard (a variable or a tensor, any float dtype).
    index:  [K] sorted local rows taking part, or None for all of them.
    Positions 0..n-1 address the rows taking part; `rows(pos)` maps them to shard rows.
    """

    def __init__(self, weight, index: tf.Tensor | None = None):
        self.weight = weight
        self.index = index
        self.n = tf.shape(index)[0] if index is not None else tf.shape(weight)[0]

    def rows(self, pos: tf.Tensor) -> tf.Tensor:
        """[k] positions -> [k] shard rows."""
        return pos if self.index is None else tf.gather(self.index, pos)

    def gather(self, pos: tf.Tensor) -> tf.Tensor:
        """[k] positions -> [k, D] rows (a gather: never a reference to the whole shard)."""
        return tf.gather(self.weight, self.rows(pos))

    def block(self) -> tf.Tensor:
        """All rows taking part, [n, D]."""
        if self.index is None:
            return tf.convert_to_tensor(self.weight)
        return tf.gather(self.weight, self.index)


@dataclasses.dataclass
class Forward:
    """What the backward needs from the forward. All [B] unless noted."""
    loss: tf.Tensor
    correct: tf.Tensor
    lse: tf.Tensor
    target: tf.Tensor          # f'_y where owned here, else 0
    local_label: tf.Tensor     # position of the label among the rows taking part, -1 elsewhere
    x: tf.Tensor               # [B, D] the raw global batch
    x_feat: tf.Tensor          # [B, D] normalized or raw, as the margin wants
    x_s: tf.Tensor             # [B, D] scale · x_feat in compute dtype
    w_rows: tf.Tensor          # [B, D] the label rows (float32), watched by `tape`
    tape: tf.GradientTape
    m_loc: tf.Tensor | None    # one block only: the row max the exponentials were taken against
    e: tf.Tensor | None        # one block only: [B, n] exp(f' - m_loc)
    inv: tf.Tensor | None      # one block only: [n] 1/|w_j| (normalized margins)


def forward(comm: Cluster, x: tf.Tensor, source: RowSource, local_label: tf.Tensor,
            margin: margins_lib.Margin, step=0, *, chunk_size: int | None = None,
            compute_dtype: tf.DType = tf.float32) -> Forward:
    """Per-sample loss and top-1 correctness over all C classes, this worker holding some rows.

    x:           [B, D] float32, the global batch of raw embeddings (replicated on every worker).
    local_label: [B] int32 position of the label among `source`'s rows, -1 where another worker
                 owns it. Returns `Forward` with loss [B] = logsumexp_j f'_ij − f'_{i,y_i} (the same
                 on every worker) and correct [B] float 0/1 (the label has the largest plain logit).
    """
    owned = local_label >= 0
    w_rows = tf.cast(source.gather(tf.maximum(local_label, 0)), tf.float32)  # [B, D]
    # persistent: the backward asks it twice, and an outer persistent tape may run it again
    tape = tf.GradientTape(watch_accessed_variables=False, persistent=True)
    with tape:
        tape.watch([x, w_rows])
        x_feat = tf.math.l2_normalize(x, axis=1) if margin.normalize_embeddings else x
        target = margins_lib.target_logit_from_rows(margin, x, w_rows, step)
        target = tf.where(owned, target, tf.zeros_like(target))
    x_s = tf.cast(x_feat * float(margin.logit_scale), compute_dtype)
    normalize = margin.normalize_weights
    e = inv = None
    if chunk_size is None:
        s_loc, m_loc, plain_max, plain_t, e, inv = _forward_block(
            x_s, source.block(), target, local_label, normalize, True)
    else:
        s_loc, m_loc, plain_max, plain_t = _forward_chunks(
            x_s, source, target, local_label, normalize, chunk_size)
    maxes = comm.allreduce_max(tf.stack([m_loc, plain_max]))
    m = maxes[0]
    # Each worker exponentiated against its own max; rescale its partial sum to the global one.
    # target and plain_t are 0 where another worker owns the label: their sums are the owner's.
    sums = comm.allreduce_sum(tf.stack([s_loc * tf.exp(m_loc - m), target, plain_t]))
    lse = m + tf.math.log(sums[0])
    return Forward(loss=lse - sums[1], correct=tf.cast(sums[2] >= maxes[1], tf.float32), lse=lse,
                   target=target, local_label=local_label, x=x, x_feat=x_feat, x_s=x_s,
                   w_rows=w_rows, tape=tape, m_loc=m_loc if e is not None else None, e=e, inv=inv)


def backward(fwd: Forward, source: RowSource, d_loss: tf.Tensor, sink: Sink, state,
             margin: margins_lib.Margin, *, chunk_size: int | None = None):
    """d_loss [B] -> (dL/dx [B, D] this shard's share, final sink state).

    Every row taking part gets its gradient [k, D] float32 through `sink`, once, in blocks.
    """
    owned = fwd.local_label >= 0
    # Softmax share of the target entry, exp(f'_y − lse), and the −f'_y term of the loss, both
    # held by the owner, go back through the margin to x and the label row.
    d_t = tf.where(owned, (tf.exp(fwd.target - fwd.lse) - 1.0) * d_loss, tf.zeros_like(d_loss))
    dw_rows = fwd.tape.gradient(fwd.target, fwd.w_rows, output_gradients=d_t)  # [B, D]
    normalize = margin.normalize_weights
    dx_s, state = _backward_blocks(fwd, source, d_loss, dw_rows, sink, state, normalize,
                                   chunk_size or BACKWARD_BLOCK)
    dx = fwd.tape.gradient([fwd.target, fwd.x_feat], fwd.x,
                           output_gradients=[d_t, dx_s * float(margin.logit_scale)])
    return dx, state


def sharded_cross_entropy(comm: Cluster, x: tf.Tensor, weight: tf.Tensor, local_label: tf.Tensor,
                          margin: margins_lib.Margin, step=0, *, chunk_size: int | None = None,
                          compute_dtype: tf.DType = tf.float32):
    """Differentiable form for autodiff tapes: [B, D], [C_r, D], [B] -> (loss [B], correct [B]).

    Gradients: w.r.t. weight exact (dense, in weight's dtype); w.r.t. x this shard's share (the
    allgather's gradient sums them over workers).
    """
    @tf.custom_gradient
    def _ce(x, w):
        source = RowSource(w)
        fwd = forward(comm, x, source, local_label, margin, step, chunk_size=chunk_size,
                      compute_dtype=compute_dtype)

        def grad(d_loss, d_correct):
            del d_correct  # correctness is a step function: no gradient
            blocks = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            dx, blocks = backward(fwd, source, d_loss, _collect, blocks, margin, chunk_size=chunk_size)
            return dx, tf.cast(blocks.concat(), w.dtype)

        return (fwd.loss, fwd.correct), grad

    return _ce(x, weight)


def _collect(blocks: tf.TensorArray, pos: tf.Tensor, dw: tf.Tensor) -> tf.TensorArray:
    """Sink for the tape form: blocks arrive in order, so concatenating them is the gradient."""
    del pos
    return blocks.write(blocks.size(), dw)


def _add_label_rows(dw, dw_rows, block_label):
    """Add the target path's [B, D] row gradients to the block's rows [k, D]; block_label [B] is
    each label's row in the block, -1 elsewhere (`_chunk_label`)."""
    hit = block_label >= 0
    return tf.tensor_scatter_nd_add(dw, tf.boolean_mask(block_label, hit)[:, None],
                                    tf.boolean_mask(dw_rows, hit))


def _chunk_bounds(source: RowSource, c, chunk_size: int):
    start = c * chunk_size
    pos = tf.range(start, tf.minimum(start + chunk_size, source.n))
    return start, pos


def _chunk_label(local_label, start, k):
    pos = local_label - start
    return tf.where((local_label >= 0) & (pos >= 0) & (pos < k), pos, -1)


def _num_chunks(source: RowSource, chunk_size: int):
    return (source.n + chunk_size - 1) // chunk_size


def _forward_chunks(x_s, source, target, local_label, normalize, chunk_size):
    """Streaming max / sum-exp over blocks of rows: the [B, n] logits never exist."""
    b = tf.shape(target)[0]
    neg_inf = tf.fill([b], float("-inf"))

    def body(c, s, m, pmax, pt):
        start, pos = _chunk_bounds(source, c, chunk_size)
        ll = _chunk_label(local_label, start, tf.shape(pos)[0])
        s_c, m_c, pmax_c, pt_c = _forward_block(x_s, source.gather(pos), target, ll, normalize, False)
        m_new = tf.maximum(m, m_c)
        s = s * tf.exp(m - m_new) + s_c * tf.exp(m_c - m_new)
        return c + 1, s, m_new, tf.maximum(pmax, pmax_c), pt + pt_c

    _, s, m, pmax, pt = tf.while_loop(
        lambda c, *_: c < _num_chunks(source, chunk_size), body,
        (tf.constant(0), tf.zeros([b]), neg_inf, neg_inf, tf.zeros([b])), parallel_iterations=1)
    return s, m, pmax, pt


def _backward_blocks(fwd, source, d_loss, dw_rows, sink, state, normalize, block):
    """The weight gradient block by block, each handed to the sink: the kept exponentials' columns
    when the forward was one block, else each block's logits recomputed from the global lse."""
    if fwd.e is not None:
        coeff = d_loss * tf.exp(fwd.m_loc - fwd.lse)  # e · coeff = softmax · d_loss

    def body(c, dx_s, state):
        start, pos = _chunk_bounds(source, c, block)
        k = tf.shape(pos)[0]
        w = source.gather(pos)
        ll = _chunk_label(fwd.local_label, start, k)
        if fwd.e is None:
            dx_c, dw, inv = _chunk_grads(fwd.x_s, w, fwd.target, ll, fwd.lse, d_loss, normalize)
        else:
            inv = None if fwd.inv is None else fwd.inv[start:start + k]
            dx_c, dw = _logit_grads(fwd.e[:, start:start + k], coeff, ll, fwd.x_s, w, inv)
        if normalize:
            dw = _remove_radial(dw, tf.cast(w, tf.float32), inv)
        dw = _add_label_rows(dw, dw_rows, ll)
        return c + 1, dx_s + dx_c, sink(state, pos, dw)

    _, dx_s, state = tf.while_loop(
        lambda c, *_: c < _num_chunks(source, block), body,
        (tf.constant(0), tf.zeros_like(fwd.x, tf.float32), state), parallel_iterations=1)
    return dx_s, state


def _logits(x_s, w, normalize: bool):
    """[B, D] (compute dtype), [k, D] (param dtype) -> float32 logits [B, k], 1/|w_j| [k] or None."""
    z = tf.cast(tf.matmul(x_s, tf.cast(w, x_s.dtype), transpose_b=True), tf.float32)
    if not normalize:
        return z, None
    w32 = tf.cast(w, tf.float32)
    inv = tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(w32), axis=1), 1e-12))
    return z * inv[None, :], inv


@tf.function(jit_compile=True)
def _forward_block(x_s, w, t, local_label, normalize: bool, keep: bool):
    """One block's logits with the target entry replaced, and its row statistics.

    -> Σ_j exp(f' − m) [B], m [B], max plain logit [B], plain target logit [B] (0 where not
    owned); with `keep` also e [B, k] = exp(f' − m) and 1/|w_j| [k] (or None) for the backward.
    """
    z, inv = _logits(x_s, w, normalize)
    is_t = _target_mask(local_label, tf.shape(w)[0])
    plain_max = tf.reduce_max(z, axis=1)
    plain_t = tf.reduce_sum(tf.where(is_t, z, tf.zeros_like(z)), axis=1)
    z = tf.where(is_t, t[:, None], z)
    m = tf.reduce_max(z, axis=1)
    e = tf.exp(z - m[:, None])
    stats = (tf.reduce_sum(e, axis=1), m, plain_max, plain_t)
    return stats + (e, inv) if keep else stats


@tf.function(jit_compile=True)
def _chunk_grads(x_s, w, t, local_label, lse, d_loss, normalize: bool):
    """Recompute one block's softmax from the global lse -> dL/dx_s [B, D], logits part of dL/dw
    [k, D] (before the radial correction), 1/|w_j| [k] (or None)."""
    z, inv = _logits(x_s, w, normalize)
    is_t = _target_mask(local_label, tf.shape(w)[0])
    p = tf.exp(z - lse[:, None]) * d_loss[:, None]
    dz = tf.where(is_t, tf.zeros_like(p), p)      # the target entry's gradient goes to f'_y
    if inv is not None:
        dz = dz * inv[None, :]
    dz = tf.cast(dz, x_s.dtype)
    dx = tf.matmul(dz, tf.cast(w, x_s.dtype))
    dw = tf.matmul(dz, x_s, transpose_a=True)
    return tf.cast(dx, tf.float32), tf.cast(dw, tf.float32), inv


@tf.function(jit_compile=True)
def _logit_grads(e, coeff, local_label, x_s, w, inv):
    """One block kept from the forward: e [B, n], coeff [B] = d_loss·exp(m_loc − lse) ->
    dL/dx_s [B, D], logits part of dL/dw [n, D]."""
    p = e * coeff[:, None]
    is_t = _target_mask(local_label, tf.shape(w)[0])
    dz = tf.where(is_t, tf.zeros_like(p), p)
    if inv is not None:
        dz = dz * inv[None, :]                     # through z = (x_s·w_j) / |w_j|
    dz = tf.cast(dz, x_s.dtype)
    dx = tf.matmul(dz, tf.cast(w, x_s.dtype))
    dw = tf.matmul(dz, x_s, transpose_a=True)
    return tf.cast(dx, tf.float32), tf.cast(dw, tf.float32)


@tf.function(jit_compile=True)
def _remove_radial(pw, w, inv):
    """d/dw_j of (x·w_j)/|w_j| = (I − ŵ_j ŵ_jᵀ) · pw_j, pw_j being the part through x·w_j / |w_j|.

    Its own kernel: XLA fuses a row reduction placed after a matmul into the matmul and loses the
    fast one (measured 1.6x slower)."""
    return pw - (tf.reduce_sum(pw * w, axis=1) * tf.square(inv))[:, None] * w


def _target_mask(local_label, rows):
    """[B, k] bool, True at each owned label's entry; fused by XLA, never materialized."""
    return tf.range(rows, dtype=local_label.dtype)[None, :] == local_label[:, None]
