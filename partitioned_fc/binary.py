"""The one-vs-all binary loss over class-sharded rows (SphereFace2; docs/margins.md,
"SphereFace2").

Each class's term depends on its own cos θ_j alone, so a worker sums the terms of the classes it
holds and one [B] allreduce (with the owner's target term) gives the loss: no logsumexp, no max
exchange. The backward needs no collective but the bias gradient's scalar allreduce: b is
replicated, and every worker's negatives contribute to it.

The same row machinery as the softmax (`sharded_softmax`): the rows taking part (`RowSource`),
kept cosines (`chunk_size=None`, [B, C_r]) or blocks of rows recomputed in the backward, each
block's logit-side gradient handed to a sink (`RowGradients`, `RowUpdates`). Weights and
embeddings are normalized; matmuls run in `compute_dtype`, the terms in float32.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from cluster import Cluster
from partitioned_fc import margins as margins_lib
from partitioned_fc import sharded_softmax as ss


@dataclasses.dataclass(frozen=True)
class Target:
    """The target term, on a tape. All [B] unless noted."""

    value: tf.Tensor  # the target's term where this worker owns the label, else 0
    local_label: tf.Tensor  # the label's position among the rows taking part, -1 elsewhere
    x: tf.Tensor  # [B, D] the raw global batch
    x_feat: tf.Tensor  # [B, D] unit embeddings
    w_rows: tf.Tensor  # [B, D] the label rows (float32)
    bias: tf.Tensor  # [] b
    tape: tf.GradientTape


@dataclasses.dataclass(frozen=True)
class Forward:
    """What the backward needs. loss, correct: [B]."""

    loss: tf.Tensor
    correct: tf.Tensor
    target: Target
    x_s: tf.Tensor  # [B, D] unit embeddings in compute dtype
    kept: tf.Tensor | None  # [B, n] the cosines (None: recomputed per block)
    block: int  # classes per block of the backward


def forward(
    comm: Cluster,
    x: tf.Tensor,
    source: ss.RowSource,
    local_label: tf.Tensor,
    margin: margins_lib.SphereFace2,
    bias: tf.Tensor,
    *,
    chunk_size: int | None = None,
    compute_dtype: tf.DType = tf.float32,
) -> Forward:
    """[B, D] global batch, this worker's rows, [B] label positions (-1: elsewhere), [] b ->
    `Forward` with loss [B] (the same on every worker) and correct [B] (the label's cos θ is the
    largest)."""
    target = _target(x, source, local_label, margin, bias)
    x_s = tf.cast(target.x_feat, compute_dtype)
    b = tf.stop_gradient(target.bias)
    with tf.name_scope("fc_forward"):
        if chunk_size is None:
            s_loc, c_max, c_t, kept = _kept_forward(x_s, source.weight, source.index, local_label, b, margin=margin)
        else:
            s_loc, c_max, c_t = _streamed_forward(x_s, source, local_label, b, margin, chunk_size)
            kept = None
    c_max = comm.allreduce_max(c_max)
    sums = comm.allreduce_sum(tf.stack([s_loc + target.value, c_t]))  # c_t, value: the owner's
    block = ss.BACKWARD_BLOCK if chunk_size is None else chunk_size
    return Forward(sums[0], tf.cast(sums[1] >= c_max, tf.float32), target, x_s, kept, block)


def _target(x, source, local_label, margin, bias) -> Target:
    owned = local_label >= 0
    w_rows = tf.cast(source.gather(tf.maximum(local_label, 0)), tf.float32)
    b = tf.cast(tf.convert_to_tensor(bias), tf.float32)
    tape = tf.GradientTape(watch_accessed_variables=False, persistent=True)
    with tape:
        tape.watch([x, w_rows, b])
        x_feat = tf.math.l2_normalize(x, axis=1)
        value = margin.positive_loss(margins_lib.target_cos(x, w_rows), b)
        value = tf.where(owned, value, tf.zeros_like(value))
    return Target(value, local_label, x, x_feat, w_rows, b, tape)


def backward(fwd: Forward, source: ss.RowSource, d_loss, sink: ss.RowSink, state, margin):
    """d_loss [B] -> (dL/dx [B, D] this shard's share, final sink state, this worker's share of
    dL/db []); every row taking part reaches `sink` once, in blocks."""
    target = fwd.target
    d_t, dw_rows, db_t = _target_grads(fwd, d_loss)
    block = fwd.block if sink.block is None else sink.block

    def body(c, dx_s, db, state):
        start, pos = ss._chunk_bounds(source, c, block)
        rows = source.rows(pos)
        ll = ss._chunk_label(target.local_label, start, tf.shape(pos)[0])
        with tf.name_scope("fc_grads"):
            dx_c, pw, db_c = _block_grads(fwd, source, rows, pos, ll, d_loss, margin)
        return c + 1, dx_s + dx_c, db + db_c, sink(state, rows, pw, ll, dw_rows, normalize=True)

    _, dx_s, db, state = tf.while_loop(
        lambda c, *_: c < ss._num_chunks(source, block),
        body,
        (tf.constant(0), tf.zeros_like(target.x), db_t, state),
        parallel_iterations=1,
    )
    return _dx(target, d_t, dx_s), state, db


def backward_whole(fwd: Forward, source: ss.RowSource, d_loss, margin):
    """d_loss [B] -> (dL/dx [B, D], dL/dw [n, D] float32 of every row taking part, this worker's
    share of dL/db []): the kept cosines in one block (the tape form)."""
    target = fwd.target
    d_t, dw_rows, db_t = _target_grads(fwd, d_loss)
    with tf.name_scope("fc_grads"):
        dx_s, pw, db = _block_grads(fwd, source, source.index, None, target.local_label, d_loss, margin)
    with tf.name_scope("fc_row_grad"):
        g = ss._row_grad_kernel(pw, source.weight, source.index, target.local_label, dw_rows, normalize=True)
    return _dx(target, d_t, dx_s), g, db_t + db


def _block_grads(fwd: Forward, source, rows, pos, block_label, d_loss, margin):
    """One block -> dL/dx_s [B, D], the logits part of dL/dw [k, D], dL/db [] of its negatives."""
    b = tf.stop_gradient(fwd.target.bias)
    if fwd.kept is None:
        return _streamed_grads(fwd.x_s, source.weight, rows, block_label, d_loss, b, margin=margin)
    return _kept_grads(fwd.kept, pos, fwd.x_s, source.weight, rows, block_label, d_loss, b, margin=margin)


def _target_grads(fwd: Forward, d_loss):
    """-> d_t [B] reaching the target term, its label-row gradient [B, D] and bias gradient []."""
    target = fwd.target
    d_t = tf.where(target.local_label >= 0, d_loss, tf.zeros_like(d_loss))
    dw_rows, db = target.tape.gradient(target.value, [target.w_rows, target.bias], output_gradients=d_t)
    return d_t, dw_rows, db


def _dx(target: Target, d_t, dx_s):
    """The target term's and the negatives' gradients -> dL/dx [B, D]."""
    return target.tape.gradient([target.value, target.x_feat], target.x, output_gradients=[d_t, dx_s])


def sharded_binary_loss(
    comm: Cluster,
    x: tf.Tensor,
    weight: tf.Tensor,
    bias,
    local_label: tf.Tensor,
    margin: margins_lib.SphereFace2,
    *,
    chunk_size: int | None = None,
    compute_dtype: tf.DType = tf.float32,
):
    """Differentiable form: [B, D], [C_r, D], b, [B] -> (loss [B], correct [B]). Gradients: w.r.t.
    weight exact; w.r.t. x this shard's share (the allgather sums them); w.r.t. b the whole,
    summed over workers here (b is replicated)."""

    @tf.custom_gradient
    def _loss(x, w, b):
        source = ss.RowSource(w)
        fwd = forward(comm, x, source, local_label, margin, b, chunk_size=chunk_size, compute_dtype=compute_dtype)

        def grad(d_loss, d_correct):
            del d_correct
            if chunk_size is None:
                dx, g, db = backward_whole(fwd, source, d_loss, margin)
                return dx, tf.cast(g, w.dtype), comm.allreduce_sum(db)
            sink = ss.RowGradients(w, block=chunk_size)
            blocks = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            dx, blocks, db = backward(fwd, source, d_loss, sink, blocks, margin)
            return dx, tf.cast(blocks.concat(), w.dtype), comm.allreduce_sum(db)

        return (fwd.loss, fwd.correct), grad

    return _loss(x, weight, tf.convert_to_tensor(bias))


# --------------------------------------------------------------------------------------------
# Kernels (XLA): each reads the rows it needs itself, as in sharded_softmax.
# --------------------------------------------------------------------------------------------
def _streamed_forward(x_s, source, local_label, b, margin, chunk_size):
    """Σ of the negatives' terms, max cos, the target's cos [B] over blocks of rows."""
    bsz = tf.shape(local_label)[0]

    def body(c, s, c_max, c_t):
        start, pos = ss._chunk_bounds(source, c, chunk_size)
        ll = ss._chunk_label(local_label, start, tf.shape(pos)[0])
        s_c, max_c, t_c = _streamed_stats(x_s, source.weight, source.rows(pos), ll, b, margin=margin)
        return c + 1, s + s_c, tf.maximum(c_max, max_c), c_t + t_c

    _, s, c_max, c_t = tf.while_loop(
        lambda c, *_: c < ss._num_chunks(source, chunk_size),
        body,
        (tf.constant(0), tf.zeros([bsz]), tf.fill([bsz], float("-inf")), tf.zeros([bsz])),
        parallel_iterations=1,
    )
    return s, c_max, c_t


def _stats(x_s, w, local_label, b, margin):
    """One block -> cos [B, k] and (Σ negatives' terms, max cos, target cos (0 where not here)) [B]."""
    cos, _ = ss._logits(x_s, w, normalize=True)
    is_t = ss._target_mask(local_label, tf.shape(cos)[1])
    term, _, _ = margin.negative_loss(cos, b)
    s = tf.reduce_sum(tf.where(is_t, tf.zeros_like(term), term), axis=1)
    c_t = tf.reduce_sum(tf.where(is_t, cos, tf.zeros_like(cos)), axis=1)
    return cos, (s, tf.reduce_max(cos, axis=1), c_t)


@tf.function(jit_compile=True)
def _kept_forward(x_s, weight, rows, local_label, b, *, margin):
    cos, stats = _stats(x_s, ss._read_rows(weight, rows), local_label, b, margin)
    return stats + (cos,)


@tf.function(jit_compile=True)
def _streamed_stats(x_s, weight, rows, local_label, b, *, margin):
    return _stats(x_s, ss._read_rows(weight, rows), local_label, b, margin)[1]


def _grads(cos, x_s, w, local_label, d_loss, b, margin):
    """A block's cos [B, k] and rows [k, D] -> dL/dx_s [B, D], logits part of dL/dw [k, D], dL/db []."""
    _, d_cos, d_b = margin.negative_loss(cos, b)
    is_t = ss._target_mask(local_label, tf.shape(cos)[1])
    db = tf.reduce_sum(tf.where(is_t, tf.zeros_like(d_b), d_b) * d_loss[:, None])
    dx, pw = ss._dz_matmuls(d_cos * d_loss[:, None], local_label, x_s, w, normalize=True)
    return dx, pw, db


@tf.function(jit_compile=True)
def _kept_grads(kept, pos, x_s, weight, rows, local_label, d_loss, b, *, margin):
    cos = ss._block_columns(kept, pos)
    return _grads(cos, x_s, ss._read_rows(weight, rows), local_label, d_loss, b, margin)


@tf.function(jit_compile=True)
def _streamed_grads(x_s, weight, rows, local_label, d_loss, b, *, margin):
    w = ss._read_rows(weight, rows)
    cos, _ = ss._logits(x_s, w, normalize=True)
    return _grads(cos, x_s, w, local_label, d_loss, b, margin)
