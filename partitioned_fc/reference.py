"""The dense single-device reference: the same math with the whole `[B, C]` logits in memory."""

from __future__ import annotations

import tensorflow as tf

from partitioned_fc import margins as margins_lib


def _dense(embeddings, labels, full_weight, margin: margins_lib.Margin, step=0):
    """-> plain logits [B, C], margin logits [B, C] (f'_y in each label's entry), f'_y [B], the
    margin's extra loss term [B] or None."""
    x = tf.convert_to_tensor(embeddings)
    w = tf.cast(tf.convert_to_tensor(full_weight), x.dtype)
    y = tf.cast(labels, tf.int64)
    x_feat = tf.math.l2_normalize(x, axis=1) if margin.normalize_embeddings else x
    w_feat = tf.math.l2_normalize(w, axis=1) if margin.normalize_weights else w
    z = _class_max(margin.logit_scale * tf.matmul(x_feat, w_feat, transpose_b=True), margin.rows_per_class)
    w_y = _label_rows(x_feat, w, y, margin.rows_per_class)
    context = margin.batch_context(tf.norm(x, axis=1))
    target = margins_lib.target_logit_from_rows(margin, x, w_y, step, context)
    logits = _negatives(margin, z, x, w_y)
    idx = tf.stack([tf.range(tf.shape(y, out_type=tf.int64)[0]), y], axis=1)
    extra = margin.extra_loss(context)
    return z, tf.tensor_scatter_nd_update(logits, idx, target), target, extra


def _class_max(z, g: int):
    """[B, g·C] row logits -> [B, C]: each class's largest (Sub-center ArcFace; g = 1: as is)."""
    return z if g == 1 else tf.reduce_max(tf.reshape(z, [tf.shape(z)[0], -1, g]), axis=2)


def _label_rows(x, w, y, g: int):
    """[B, D], [g·C, D], [B] -> [B, D] each label's row nearest to x in angle (its only row if g = 1)."""
    if g == 1:
        return tf.gather(w, y)
    rows = tf.gather(tf.reshape(w, [-1, g, tf.shape(w)[1]]), y)  # [B, g, D]
    cos = tf.reduce_sum(tf.math.l2_normalize(x, axis=1)[:, None] * tf.math.l2_normalize(rows, axis=2), axis=2)
    return tf.gather(rows, tf.argmax(cos, axis=1), batch_dims=1)


def _negatives(margin: margins_lib.Margin, z, x, w_y):
    """[B, C] plain logits -> the margin's non-target logits (its running statistics advanced)."""
    rule = margin.negative_rule()
    if rule is None:
        return z
    cos = tf.cast(tf.stop_gradient(margins_lib.target_cos(x, w_y)), tf.float32)
    k = tf.cast(tf.stop_gradient(margins_lib.logit_factor(margin, x)), tf.float32)
    ctx = margin.negative_context(cos, k)
    ctx = margins_lib.NegativeContext(*(tf.cast(v, z.dtype) for v in ctx))
    return rule(z, ctx)[0]


def dense_logits(embeddings, labels, full_weight, margin: margins_lib.Margin, step=0):
    """[B, D], [B], [C, D] -> [B, C] logits with the margin target f'_y in each label's entry, f'_y [B]."""
    _, logits, target, _ = _dense(embeddings, labels, full_weight, margin, step)
    return logits, target


def _dense_binary(embeddings, labels, full_weight, margin: margins_lib.SphereFace2):
    """-> cos [B, C], the per-sample one-vs-all loss [B] (differentiable in x, W and margin.bias)."""
    x = tf.convert_to_tensor(embeddings)
    w = tf.cast(tf.convert_to_tensor(full_weight), x.dtype)
    y = tf.cast(labels, tf.int64)
    cos = tf.matmul(tf.math.l2_normalize(x, axis=1), tf.math.l2_normalize(w, axis=1), transpose_b=True)
    b = tf.cast(margin.bias, x.dtype)
    terms, _, _ = margin.negative_loss(cos, b)
    negatives = tf.reduce_sum(tf.where(tf.one_hot(y, tf.shape(w)[0]) > 0, tf.zeros_like(terms), terms), axis=1)
    return cos, margin.positive_loss(margins_lib.target_cos(x, tf.gather(w, y)), b) + negatives


def dense_loss(embeddings, labels, full_weight, margin: margins_lib.Margin, step=0, return_accuracy: bool = False):
    """Mean margin softmax (or SphereFace2's binary) loss over the batch: [B, D], [B], [g·C, D]
    -> scalar (, accuracy)."""
    if margin.binary:
        plain, per_sample = _dense_binary(embeddings, labels, full_weight, margin)
        loss = tf.reduce_mean(per_sample)
    else:
        plain, logits, target, extra = _dense(embeddings, labels, full_weight, margin, step)
        per_sample = tf.reduce_logsumexp(logits, axis=1) - target
        loss = tf.reduce_mean(per_sample if extra is None else per_sample + extra)
    if not return_accuracy:
        return loss
    correct = tf.equal(tf.argmax(plain, axis=1), tf.cast(labels, tf.int64))
    return loss, tf.reduce_mean(tf.cast(correct, loss.dtype))
