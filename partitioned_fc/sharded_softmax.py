"""The exact softmax cross-entropy over class-sharded logits (docs/margins.md, "Model-parallel form").

Each worker does the heavy `[B, C_r]` part against the rows it holds: the local logits with the
margin target written into its entry before any reduction, partial logsumexp statistics exchanged
with two small allreduces of `[B]` vectors, and a backward that needs no collective.

Two ways to keep the logits between forward and backward, same numbers (`KeptLogits`,
`KeptPlainLogits`, `StreamedLogits`):
- kept (`chunk_size=None`): the exponentials `[B, C_r]` are kept and reused (no recompute);
  memory O(B·C_r). Where the margin rewrites negatives (`margins.NegativeRule`: CurricularFace,
  inter-class filtering) the plain logits are kept instead, since the backward needs the rule's
  derivative at them.
- streamed (`chunk_size=K`): the forward keeps a streaming max / sum-exp per sample over blocks of
  K rows; the backward recomputes each block's logits from the global logsumexp. Nothing
  `[B, C_r]` exists.
Either way the backward walks the rows in blocks and hands each block's logit-side gradient to a
sink (`RowGradients` for autodiff tapes, `RowUpdates` to apply an optimizer to those rows at
once), so no weight-sized gradient or optimizer temporary exists.

Passes over the shard are what costs beyond the matmuls, so every read of it happens inside an
XLA kernel that takes the variable itself (a dense read of a variable once updated sparsely
copies all of it; a gather outside a kernel copies the block), and each block's radial
correction, label-row gradient and optimizer update are one kernel over the block's rows.
Normalized weights are never materialized: z = (s·x) Wᵀ scaled per column by 1/|W_j|. Matmuls
run in `compute_dtype`; logits, softmax statistics and gradients are float32.

A class may own g adjacent rows (Sub-center ArcFace's sub-centers): the kernels take each
class's largest row logit and send its gradient to that row alone; blocks hold whole classes.

The target logit f'_y goes through the margin on the autodiff tape (any margin, its exact
derivative; with the margin's batch context and extra loss term, AdaFace and MagFace);
everything `[B, C_r]` is differentiated by hand. The tape form with kept logits runs its backward
as one block without a loop (`backward_whole`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from cluster import Cluster
from partitioned_fc import margins as margins_lib

# Rows per block of the backward when the logits were kept: the weight gradient and the
# optimizer's temporaries are O(BACKWARD_BLOCK · D), never the size of the shard.
BACKWARD_BLOCK = 16384


class RowSource:
    """The rows a step works on: all of the shard, or a sampled subset (Partial FC).

    weight: [g·C_r, D] the shard (a variable or a tensor, any float dtype), g rows per class
            (the margin's `rows_per_class`: Sub-center ArcFace's sub-centers, adjacent).
    index:  [g·K] sorted local rows taking part (whole classes), or None for all of them.
    Positions 0..n-1 address the rows taking part; `rows(pos)` maps them to shard rows.
    """

    def __init__(self, weight, index: tf.Tensor | None = None, group: int = 1):
        self.weight = weight
        self.index = index
        self.group = int(group)
        self.n = tf.shape(index)[0] if index is not None else tf.shape(weight)[0]

    def rows(self, pos: tf.Tensor) -> tf.Tensor:
        """[k] positions -> [k] shard rows."""
        return pos if self.index is None else tf.gather(self.index, pos)

    def gather(self, pos: tf.Tensor) -> tf.Tensor:
        """[k] positions -> [k, D] rows (a gather: never a reference to the whole shard)."""
        return tf.gather(self.weight, self.rows(pos))


@dataclasses.dataclass(frozen=True)
class TargetPath:
    """The margin's part of the graph, differentiated by `tape`. All [B] unless noted."""

    value: tf.Tensor  # f'_y where this worker owns the label, else 0
    local_label: tf.Tensor  # the label's position among the classes taking part, -1 elsewhere
    row_label: tf.Tensor  # the position of the label's (dominant) row, -1 elsewhere
    x: tf.Tensor  # [B, D] the raw global batch
    x_feat: tf.Tensor  # [B, D] normalized or raw, as the margin wants
    w_rows: tf.Tensor  # [B, D] the label rows (float32)
    cos: tf.Tensor  # cos θ_y where this worker owns the label, else 0
    extra: tf.Tensor | None  # the margin's extra loss term where owned, else 0 (MagFace)
    tape: tf.GradientTape  # persistent: the backward asks it twice


@dataclasses.dataclass(frozen=True)
class Negatives:
    """The margin's rule for the non-target logits and its per-sample inputs (margins.NegativeRule)."""

    rule: margins_lib.NegativeRule
    ctx: margins_lib.NegativeContext


@dataclasses.dataclass(frozen=True)
class KeptLogits:
    """The forward's exponentials, kept: e [B, n] = exp(f' − m), m [B] the row max they used."""

    e: tf.Tensor
    m: tf.Tensor
    block: int = BACKWARD_BLOCK

    def grads(self, fwd: Forward, weight, rows, pos, block_label, d_loss, *, normalize: bool):
        """-> dL/dx_s [B, D] and the logits part of dL/dw [k, D] of the rows at `pos`."""
        coeff = d_loss * tf.exp(self.m - fwd.lse)  # e · coeff = softmax · d_loss
        return _kept_grads(self.e, pos, coeff, fwd.x_s, weight, rows, block_label, normalize=normalize)


@dataclasses.dataclass(frozen=True)
class KeptPlainLogits:
    """The forward's plain row logits z [B, n], kept where the margin rewrites negatives or a class
    has several rows: the backward needs df/dz of its rule at z (`Negatives`) or which row is a
    class's largest, which the exponentials no longer tell."""

    z: tf.Tensor
    block: int = BACKWARD_BLOCK

    def grads(self, fwd: Forward, weight, rows, pos, block_label, d_loss, *, normalize: bool):
        """-> dL/dx_s [B, D] and the logits part of dL/dw [k, D] of the rows at `pos`."""
        rule, ctx = _rule_and_ctx(fwd.negatives)
        return _kept_plain_grads(
            self.z,
            pos,
            fwd.lse,
            d_loss,
            fwd.x_s,
            weight,
            rows,
            block_label,
            normalize=normalize,
            rule=rule,
            ctx=ctx,
            group=fwd.group,
        )


@dataclasses.dataclass(frozen=True)
class StreamedLogits:
    """Nothing kept: each block of `block` rows recomputes its logits from the global lse."""

    block: int

    def grads(self, fwd: Forward, weight, rows, pos, block_label, d_loss, *, normalize: bool):
        """-> dL/dx_s [B, D] and the logits part of dL/dw [k, D] of the rows at `pos`."""
        del pos
        rule, ctx = _rule_and_ctx(fwd.negatives)
        return _streamed_grads(
            fwd.x_s,
            weight,
            rows,
            block_label,
            fwd.lse,
            d_loss,
            normalize=normalize,
            rule=rule,
            ctx=ctx,
            group=fwd.group,
        )


@dataclasses.dataclass(frozen=True)
class Forward:
    """What the backward needs from the forward. All [B] unless noted."""

    loss: tf.Tensor
    correct: tf.Tensor
    lse: tf.Tensor
    target: TargetPath
    x_s: tf.Tensor  # [B, D] scale · x_feat in compute dtype
    logits: KeptLogits | KeptPlainLogits | StreamedLogits
    negatives: Negatives | None  # the margin's rule for non-target logits, if any
    group: int = 1  # rows per class


def forward(
    comm: Cluster,
    x: tf.Tensor,
    source: RowSource,
    local_label: tf.Tensor,
    margin: margins_lib.Margin,
    step=0,
    *,
    chunk_size: int | None = None,
    compute_dtype: tf.DType = tf.float32,
) -> Forward:
    """Per-sample loss and top-1 correctness over all C classes, this worker holding some rows.

    x:           [B, D] float32, the global batch of raw embeddings (replicated on every worker).
    local_label: [B] int32 position of the label among `source`'s classes, -1 where another worker
                 owns it. Returns `Forward` with loss [B] = logsumexp_j f'_ij − f'_{i,y_i} (the same
                 on every worker) and correct [B] float 0/1 (the label has the largest plain logit).
    """
    target = _target_path(x, source, local_label, margin, step)
    x_s = tf.cast(target.x_feat * float(margin.logit_scale), compute_dtype)
    normalize, group = margin.normalize_weights, source.group
    negatives = _negatives(comm, margin, target)
    rule, ctx = _rule_and_ctx(negatives)
    with tf.name_scope("fc_forward"):  # names the kernels in a profile (bench/fc_profile.py)
        if chunk_size is None:
            s_loc, m_loc, plain_max, plain_t, kept = _kept_forward(
                x_s,
                source.weight,
                source.index,
                target.value,
                local_label,
                normalize=normalize,
                rule=rule,
                ctx=ctx,
                group=group,
            )
            logits = KeptLogits(kept, m_loc) if rule is None and group == 1 else KeptPlainLogits(kept)
        else:
            s_loc, m_loc, plain_max, plain_t = _streamed_forward(
                x_s, source, target.value, local_label, normalize=normalize, chunk_size=chunk_size, rule=rule, ctx=ctx
            )
            logits = StreamedLogits(chunk_size)
    maxes = comm.allreduce_max(tf.stack([m_loc, plain_max]))
    m = maxes[0]
    # Each worker exponentiated against its own max; rescale its partial sum to the global one.
    # target and plain_t are 0 where another worker owns the label: their sums are the owner's.
    extra = [] if target.extra is None else [target.extra]
    sums = comm.allreduce_sum(tf.stack([s_loc * tf.exp(m_loc - m), target.value, plain_t] + extra))
    lse = m + tf.math.log(sums[0])
    loss = lse - sums[1] + (sums[3] if extra else 0.0)
    return Forward(
        loss=loss,
        correct=tf.cast(sums[2] >= maxes[1], tf.float32),
        lse=lse,
        target=target,
        x_s=x_s,
        logits=logits,
        negatives=negatives,
        group=group,
    )


def _negatives(comm: Cluster, margin: margins_lib.Margin, target: TargetPath) -> Negatives | None:
    """The margin's negative rule with its inputs; where it needs every sample's cos θ_y, the
    owners' values are summed over workers first (one [B] allreduce, no gradient)."""
    rule = margin.negative_rule()
    if rule is None:
        return None
    cos = target.cos
    if margin.needs_target_cos:
        cos = comm.allreduce_sum(tf.stop_gradient(cos))
    k = tf.stop_gradient(margins_lib.logit_factor(margin, target.x))  # weights are normalized
    return Negatives(rule, margin.negative_context(cos, k))


def _rule_and_ctx(negatives: Negatives | None):
    return (None, None) if negatives is None else (negatives.rule, negatives.ctx)


def _target_path(x, source, local_label, margin, step) -> TargetPath:
    """f'_y of the labels this worker owns, on a tape that can differentiate it twice."""
    owned = local_label >= 0
    row_label = _dominant_row(x, source, local_label)
    w_rows = tf.cast(source.gather(tf.maximum(row_label, 0)), tf.float32)  # [B, D]
    # persistent: the backward asks it twice, and an outer persistent tape may run it again
    tape = tf.GradientTape(watch_accessed_variables=False, persistent=True)
    with tape:
        tape.watch([x, w_rows])
        x_feat = tf.math.l2_normalize(x, axis=1) if margin.normalize_embeddings else x
        cos = margins_lib.target_cos(x, w_rows)
        context = margin.batch_context(tf.norm(x, axis=1))  # the same on every worker
        value = margin.target_logit(cos, margins_lib.logit_factor(margin, x, w_rows), step, context)
        value = tf.where(owned, value, tf.zeros_like(value))
        # counted once: by the label's owner, whose gradient of it is summed with the others'
        extra = margin.extra_loss(context)
        extra = None if extra is None else tf.where(owned, extra, tf.zeros_like(extra))
    return TargetPath(value, local_label, row_label, x, x_feat, w_rows, tf.where(owned, cos, 0.0), extra, tape)


def _dominant_row(x, source: RowSource, local_label):
    """[B, D], [B] class positions -> [B] the position of each owned label's row nearest to x in
    angle (its dominant sub-center; the class's only row when g = 1), -1 elsewhere."""
    g = source.group
    if g == 1:
        return local_label
    first = tf.maximum(local_label, 0) * g
    candidates = first[:, None] + tf.range(g)[None, :]  # [B, g]
    w = tf.math.l2_normalize(tf.cast(source.gather(candidates), tf.float32), axis=2)  # [B, g, D]
    cos = tf.reduce_sum(tf.math.l2_normalize(x, axis=1)[:, None, :] * w, axis=2)
    best = first + tf.argmax(cos, axis=1, output_type=tf.int32)
    return tf.where(local_label >= 0, best, -1)


def backward(fwd: Forward, source: RowSource, d_loss: tf.Tensor, sink: RowSink, state, margin: margins_lib.Margin):
    """d_loss [B] -> (dL/dx [B, D] this shard's share, final sink state).

    Every row taking part gets its gradient through `sink`, once, in blocks.
    """
    target = fwd.target
    d_t, dw_rows = _target_grads(fwd, d_loss)
    normalize = margin.normalize_weights
    block = fwd.logits.block if sink.block is None else sink.block
    weight = source.weight

    def body(c, dx_s, state):
        start, pos = _chunk_bounds(source, c, block)
        rows = source.rows(pos)
        ll = _chunk_label(target.local_label, start, tf.shape(pos)[0] // source.group)
        rl = _chunk_label(target.row_label, start * source.group, tf.shape(pos)[0])
        with tf.name_scope("fc_grads"):
            dx_c, pw = fwd.logits.grads(fwd, weight, rows, pos, ll, d_loss, normalize=normalize)
        return c + 1, dx_s + dx_c, sink(state, rows, pw, rl, dw_rows, normalize=normalize)

    _, dx_s, state = tf.while_loop(
        lambda c, *_: c < _num_chunks(source, block),
        body,
        (tf.constant(0), tf.zeros_like(target.x, tf.float32), state),
        parallel_iterations=1,
    )
    return _dx(fwd, margin, d_t, dx_s, d_loss), state


def backward_whole(fwd: Forward, source: RowSource, d_loss: tf.Tensor, margin: margins_lib.Margin):
    """d_loss [B] -> (dL/dx [B, D] this shard's share, dL/dw [n, D] float32 of every row taking
    part): the kept logits in one block, without the loop and its TensorArray (the tape form)."""
    target = fwd.target
    d_t, dw_rows = _target_grads(fwd, d_loss)
    normalize = margin.normalize_weights
    with tf.name_scope("fc_grads"):
        dx_s, pw = fwd.logits.grads(
            fwd, source.weight, source.index, None, target.local_label, d_loss, normalize=normalize
        )
    with tf.name_scope("fc_row_grad"):
        g = _row_grad_kernel(pw, source.weight, source.index, target.row_label, dw_rows, normalize=normalize)
    return _dx(fwd, margin, d_t, dx_s, d_loss), g


def _target_grads(fwd: Forward, d_loss):
    """-> d_t [B], the gradient reaching f'_y, and dw_rows [B, D], its share of the label rows.

    Softmax share of the target entry, exp(f'_y − lse), and the −f'_y term of the loss, both held
    by the owner, go back through the margin to x and the label row."""
    target = fwd.target
    owned = target.local_label >= 0
    d_t = tf.where(owned, (tf.exp(target.value - fwd.lse) - 1.0) * d_loss, tf.zeros_like(d_loss))
    return d_t, target.tape.gradient(target.value, target.w_rows, output_gradients=d_t)


def _dx(fwd: Forward, margin, d_t, dx_s, d_loss):
    """The target path's and the logits' gradients [B, D] -> dL/dx [B, D] through the margin
    (and its extra loss term, where it has one)."""
    target = fwd.target
    sources = [target.value, target.x_feat]
    grads = [d_t, dx_s * float(margin.logit_scale)]
    if target.extra is not None:
        sources.append(target.extra)
        grads.append(tf.where(target.local_label >= 0, d_loss, tf.zeros_like(d_loss)))
    return target.tape.gradient(sources, target.x, output_gradients=grads)


# --------------------------------------------------------------------------------------------
# Sinks: where each block's row gradient goes
# --------------------------------------------------------------------------------------------
class RowSink:
    """Consumes one block: `sink(state, rows [k], pw [k, D], block_label [B], dw_rows [B, D],
    *, normalize) -> state`; pw is the gradient through the logits before the radial correction.
    `block`: rows per block it wants (None: the logits' own block size)."""

    block: int | None = None


class RowGradients(RowSink):
    """The exact row gradient of each block, in order (state: a TensorArray of [k, D] float32)."""

    def __init__(self, weight, block: int | None = None):
        self.weight = weight
        self.block = block

    def __call__(self, blocks, rows, pw, block_label, dw_rows, *, normalize: bool):
        with tf.name_scope("fc_row_grad"):
            g = _row_grad_kernel(pw, self.weight, rows, block_label, dw_rows, normalize=normalize)
        return blocks.write(blocks.size(), g)


# update(w [k, D], g [k, D], slots [k, ...] float32, lr) -> (new w, new slots): a pure optimizer rule.
RowRule = Callable[[tf.Tensor, tf.Tensor, Sequence[tf.Tensor], tf.Tensor], tuple]


class RowUpdates(RowSink):
    """Applies an optimizer rule to each block's rows as soon as their gradient is known.

    weight: the shard variable; slots: its row-aligned state variables ([C_r, ...]); rule: the
    optimizer's pure update; state: a counter threading the writes into the loop.
    """

    def __init__(self, weight: tf.Variable, slots: Sequence[tf.Variable], rule: RowRule, lr):
        self.weight, self.slots, self.rule, self.lr = weight, tuple(slots), rule, lr

    def __call__(self, count, rows, pw, block_label, dw_rows, *, normalize: bool):
        with tf.name_scope("fc_update"):
            return _update_kernel(
                count, pw, self.weight, self.slots, rows, block_label, dw_rows, self.lr, self.rule, normalize=normalize
            )


def _scatter(var: tf.Variable, rows, values):
    # ResourceScatterUpdate writes in place: no copy of the (possibly multi-GB) shard.
    return var.scatter_update(tf.IndexedSlices(tf.cast(values, var.dtype), rows))


# --------------------------------------------------------------------------------------------
# The tape form
# --------------------------------------------------------------------------------------------
def sharded_cross_entropy(
    comm: Cluster,
    x: tf.Tensor,
    weight: tf.Tensor,
    local_label: tf.Tensor,
    margin: margins_lib.Margin,
    step=0,
    *,
    chunk_size: int | None = None,
    compute_dtype: tf.DType = tf.float32,
):
    """Differentiable form for autodiff tapes: [B, D], [g·C_r, D], [B] -> (loss [B], correct [B]).

    Gradients: w.r.t. weight exact (dense, in weight's dtype); w.r.t. x this shard's share (the
    allgather's gradient sums them over workers).
    """

    @tf.custom_gradient
    def _ce(x, w):
        source = RowSource(w, group=margin.rows_per_class)
        fwd = forward(comm, x, source, local_label, margin, step, chunk_size=chunk_size, compute_dtype=compute_dtype)

        def grad(d_loss, d_correct):
            del d_correct  # correctness is a step function: no gradient
            if chunk_size is None:  # the whole gradient is returned anyway: one block
                dx, g = backward_whole(fwd, source, d_loss, margin)
                return dx, tf.cast(g, w.dtype)
            sink = RowGradients(w, block=chunk_size)
            blocks = tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)
            dx, blocks = backward(fwd, source, d_loss, sink, blocks, margin)
            return dx, tf.cast(blocks.concat(), w.dtype)

        return (fwd.loss, fwd.correct), grad

    return _ce(x, weight)


# --------------------------------------------------------------------------------------------
# Blocks of rows
# --------------------------------------------------------------------------------------------
def _chunk_bounds(source: RowSource, c, chunk_size):
    """Block c of `chunk_size` classes -> (its first class position, its row positions [g·k])."""
    start = c * chunk_size
    g = source.group
    return start, tf.range(start * g, tf.minimum((start + chunk_size) * g, source.n))


def _chunk_label(local_label, start, k):
    pos = local_label - start
    return tf.where((local_label >= 0) & (pos >= 0) & (pos < k), pos, -1)


def _num_chunks(source: RowSource, chunk_size):
    return (source.n // source.group + chunk_size - 1) // chunk_size


def _streamed_forward(x_s, source, target, local_label, *, normalize: bool, chunk_size: int, rule, ctx):
    """Streaming max / sum-exp over blocks of rows: the [B, n] logits never exist."""
    b = tf.shape(target)[0]
    neg_inf = tf.fill([b], float("-inf"))

    def body(c, s, m, pmax, pt):
        start, pos = _chunk_bounds(source, c, chunk_size)
        ll = _chunk_label(local_label, start, tf.shape(pos)[0] // source.group)
        s_c, m_c, pmax_c, pt_c = _streamed_stats(
            x_s,
            source.weight,
            source.rows(pos),
            target,
            ll,
            normalize=normalize,
            rule=rule,
            ctx=ctx,
            group=source.group,
        )
        m_new = tf.maximum(m, m_c)
        s = s * tf.exp(m - m_new) + s_c * tf.exp(m_c - m_new)
        return c + 1, s, m_new, tf.maximum(pmax, pmax_c), pt + pt_c

    _, s, m, pmax, pt = tf.while_loop(
        lambda c, *_: c < _num_chunks(source, chunk_size),
        body,
        (tf.constant(0), tf.zeros([b]), neg_inf, neg_inf, tf.zeros([b])),
        parallel_iterations=1,
    )
    return s, m, pmax, pt


# --------------------------------------------------------------------------------------------
# Kernels (XLA). Each reads the shard rows it needs itself: `weight` is the variable (or tensor)
# and `rows` [k] the shard rows, or None for all of them.
# --------------------------------------------------------------------------------------------
def _read_rows(weight, rows):
    """[C_r, D] any dtype, [k] or None -> [k, D] (inside a kernel: no copy outside it)."""
    return tf.convert_to_tensor(weight) if rows is None else tf.gather(weight, rows)


def _inv_norm(w32):
    """[k, D] float32 -> [k] 1/|w_j| (floored)."""
    return tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.square(w32), axis=1), 1e-12))


def _logits(x_s, w, *, normalize: bool):
    """[B, D] (compute dtype), [k, D] (param dtype) -> float32 logits [B, k], 1/|w_j| [k] or None."""
    z = tf.cast(tf.matmul(x_s, tf.cast(w, x_s.dtype), transpose_b=True), tf.float32)
    if not normalize:
        return z, None
    inv = _inv_norm(tf.cast(w, tf.float32))
    return z * inv[None, :], inv


def _class_logits(z, group: int):
    """[B, g·k] row logits -> [B, k] class logits: the largest of each class's g adjacent rows."""
    if group == 1:
        return z
    return tf.reduce_max(tf.reshape(z, [tf.shape(z)[0], -1, group]), axis=2)


def _to_rows(dz, z, group: int):
    """[B, k] gradient w.r.t. the class logits, [B, g·k] row logits -> [B, g·k]: each class's
    gradient goes to its largest row (the first, on a tie), as the max's derivative does."""
    if group == 1:
        return dz
    z3 = tf.reshape(z, [tf.shape(z)[0], -1, group])
    hot = tf.one_hot(tf.argmax(z3, axis=2), group, dtype=dz.dtype)
    return tf.reshape(hot * dz[:, :, None], tf.shape(z))


def _block_stats(x_s, w, t, local_label, *, normalize: bool, rule=None, ctx=None, group: int = 1):
    """One block's logits, the negatives through `rule` (if any) and the target entry replaced
    -> (e [B, k] = exp(f' − m), or the plain row logits z [B, g·k] where there is a rule or
    g > 1) and the row statistics Σ_j e [B], m [B], max plain logit [B], plain target logit [B]
    (0 where not owned)."""
    z_rows, _ = _logits(x_s, w, normalize=normalize)
    z = _class_logits(z_rows, group)
    is_t = _target_mask(local_label, tf.shape(z)[1])
    plain_max = tf.reduce_max(z, axis=1)
    plain_t = tf.reduce_sum(tf.where(is_t, z, tf.zeros_like(z)), axis=1)
    f = tf.where(is_t, t[:, None], z if rule is None else rule(z, ctx)[0])
    m = tf.reduce_max(f, axis=1)
    e = tf.exp(f - m[:, None])
    kept = e if rule is None and group == 1 else z_rows
    return kept, (tf.reduce_sum(e, axis=1), m, plain_max, plain_t)


@tf.function(jit_compile=True)
def _kept_forward(x_s, weight, rows, t, local_label, *, normalize: bool, rule, ctx, group: int):
    """All rows taking part in one block -> (Σ e, m, plain max, plain target, kept [B, n])."""
    w = _read_rows(weight, rows)
    kept, stats = _block_stats(x_s, w, t, local_label, normalize=normalize, rule=rule, ctx=ctx, group=group)
    return stats + (kept,)


@tf.function(jit_compile=True)
def _streamed_stats(x_s, weight, rows, t, local_label, *, normalize: bool, rule, ctx, group: int):
    """One block of rows -> (Σ e, m, plain max, plain target); its logits are dropped."""
    w = _read_rows(weight, rows)
    return _block_stats(x_s, w, t, local_label, normalize=normalize, rule=rule, ctx=ctx, group=group)[1]


def _softmax_of_negatives(z, lse, d_loss, rule, ctx):
    """Plain logits z [B, k] -> softmax · d_loss of the negatives' rewritten logits, times their
    rule's df/dz: the gradient w.r.t. z (the target entries are dropped after)."""
    if rule is None:
        return tf.exp(z - lse[:, None]) * d_loss[:, None]
    f, dfdz = rule(z, ctx)
    return tf.exp(f - lse[:, None]) * d_loss[:, None] * dfdz


def _dz_matmuls(p, local_label, x_s, w, *, normalize: bool, z_rows=None, group: int = 1):
    """Softmax·d_loss p [B, k] of the classes -> dL/dx_s [B, D], logits part of dL/dw [g·k, D]
    (through each class's largest row of z_rows [B, g·k] where g > 1); the target entry's
    gradient goes to f'_y instead (`backward`)."""
    is_t = _target_mask(local_label, tf.shape(p)[1])
    dz = _to_rows(tf.where(is_t, tf.zeros_like(p), p), z_rows, group)
    if normalize:
        dz = dz * _inv_norm(tf.cast(w, tf.float32))[None, :]  # through z = (x_s·w_j) / |w_j|
    dz = tf.cast(dz, x_s.dtype)
    dx = tf.matmul(dz, tf.cast(w, x_s.dtype))
    dw = tf.matmul(dz, x_s, transpose_a=True)
    return tf.cast(dx, tf.float32), tf.cast(dw, tf.float32)


@tf.function(jit_compile=True)
def _kept_grads(e, pos, coeff, x_s, weight, rows, local_label, *, normalize: bool):
    """Kept exponentials e [B, n], this block's positions pos [k] (None: all), coeff [B] =
    d_loss·exp(m − lse)."""
    p = _block_columns(e, pos) * coeff[:, None]
    return _dz_matmuls(p, local_label, x_s, _read_rows(weight, rows), normalize=normalize)


@tf.function(jit_compile=True)
def _kept_plain_grads(z, pos, lse, d_loss, x_s, weight, rows, local_label, *, normalize: bool, rule, ctx, group: int):
    """Kept plain row logits z [B, n], this block's row positions pos [g·k] -> as `_kept_grads`."""
    return _plain_grads(
        _block_columns(z, pos),
        lse,
        d_loss,
        x_s,
        _read_rows(weight, rows),
        local_label,
        normalize=normalize,
        rule=rule,
        ctx=ctx,
        group=group,
    )


@tf.function(jit_compile=True)
def _streamed_grads(x_s, weight, rows, local_label, lse, d_loss, *, normalize: bool, rule, ctx, group: int):
    """Recompute one block's softmax from the global lse, then as `_kept_grads` (the target
    entries' values do not matter: `_dz_matmuls` drops them)."""
    w = _read_rows(weight, rows)
    z, _ = _logits(x_s, w, normalize=normalize)
    return _plain_grads(z, lse, d_loss, x_s, w, local_label, normalize=normalize, rule=rule, ctx=ctx, group=group)


def _plain_grads(z_rows, lse, d_loss, x_s, w, local_label, *, normalize: bool, rule, ctx, group: int):
    """A block's plain row logits [B, g·k] and rows [g·k, D] -> as `_dz_matmuls`."""
    p = _softmax_of_negatives(_class_logits(z_rows, group), lse, d_loss, rule, ctx)
    return _dz_matmuls(p, local_label, x_s, w, normalize=normalize, z_rows=z_rows, group=group)


def _block_columns(kept, pos):
    """[B, n] kept logits, [k] positions or None (all) -> [B, k]."""
    return kept if pos is None else tf.gather(kept, pos, axis=1)


def _row_grad(pw, w, local_label, dw_rows, *, normalize: bool):
    """The block's exact row gradient [k, D]: the radial correction of the logits part (normalized
    rows) plus the target path's label-row gradients [B, D] (block_label [B]: -1 elsewhere)."""
    if normalize:
        # d/dw_j of (x·w_j)/|w_j| = (I − ŵ_j ŵ_jᵀ) · pw_j
        pw = pw - (tf.reduce_sum(pw * w, axis=1) * tf.square(_inv_norm(w)))[:, None] * w
    hit = local_label >= 0
    return tf.tensor_scatter_nd_add(pw, tf.where(hit, local_label, 0)[:, None], tf.where(hit[:, None], dw_rows, 0.0))


# Their own kernels: XLA fuses a row reduction placed after a matmul into the matmul and loses the
# fast one (measured 1.6x slower).
@tf.function(jit_compile=True)
def _row_grad_kernel(pw, weight, rows, local_label, dw_rows, *, normalize: bool):
    """-> the block's row gradient [k, D] float32."""
    w = tf.cast(_read_rows(weight, rows), tf.float32)
    return _row_grad(pw, w, local_label, dw_rows, normalize=normalize)


# The writes are in the kernel too: XLA updates the variables' buffers in place, without the
# [k, D] results that a scatter outside would copy once more (measured 22 vs 28 ms a block).
@tf.function(jit_compile=True)
def _update_kernel(count, pw, weight, slots, rows, local_label, dw_rows, lr, rule, *, normalize: bool):
    """The block's rows and slots after `rule`, written back -> count + 1."""
    w = tf.cast(_read_rows(weight, rows), tf.float32)
    g = _row_grad(pw, w, local_label, dw_rows, normalize=normalize)
    state = tuple(tf.cast(_read_rows(s, rows), tf.float32) for s in slots)
    w, state = rule(w, g, state, tf.cast(lr, tf.float32))
    for var, v in zip((weight, *slots), (w, *state)):
        _scatter(var, rows, v)
    return count + 1


def _target_mask(local_label, rows):
    """[B, k] bool, True at each owned label's entry; fused by XLA, never materialized."""
    return tf.range(rows, dtype=local_label.dtype)[None, :] == local_label[:, None]
