"""Gradient checkpointing of the backbone (model.gradient_checkpointing, launch/recompute.py): the
same embeddings, gradients and batch-norm statistics as the plain model, with each unit's forward
run a second time in the backward, after its output gradient exists."""

import numpy as np
import pytest
import tensorflow as tf
from test_mixed_precision import _trainer, _weights
from workers import train_worker

from launch import backbones
from launch.recompute import CheckpointedBackbone

# 16-bit compute on the smallest backbone only: the rest compile for half a minute each.
CASES = [
    ("tiny", 16, "float32"),
    ("tiny", 16, "mixed_bfloat16"),
    ("mobilefacenet", 32, "float32"),
    ("iresnet50", 16, "float32"),
]


def _model(name, size, precision="float32"):
    return backbones.build_backbone(name, size, 16, seed=3, precision=precision)


def _step(forward, model, x, target):
    """One compiled forward + backward: -> (embeddings [B, D], gradients of the trainable variables)."""

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            emb = forward(x, training=True)
            loss = tf.reduce_sum(emb * target)
        return emb, tape.gradient(loss, model.trainable_variables)

    return run


def _stats(model):
    return [v.numpy().copy() for v in model.non_trainable_variables]


@pytest.mark.parametrize("name,size,precision", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_checkpointed_step_equals_the_plain_step(name, size, precision):
    model = _model(name, size, precision)
    x = tf.random.stateless_uniform([4, size, size, 3], [1, 2], -1.0, 1.0)
    target = tf.random.stateless_normal([4, 16], [3, 4])
    start = _stats(model)
    emb, grads = _step(model, model, x, target)()
    after_plain = _stats(model)
    for v, s in zip(model.non_trainable_variables, start):
        v.assign(s)
    emb_ck, grads_ck = _step(CheckpointedBackbone(model, backbones.unit_ends(model)), model, x, target)()
    np.testing.assert_allclose(emb_ck.numpy(), emb.numpy(), rtol=1e-6, atol=1e-7)
    for var, g, g_ck in zip(model.trainable_variables, grads, grads_ck):
        g, g_ck = tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(g_ck).numpy()
        assert np.any(g != 0), var.path
        np.testing.assert_allclose(g_ck, g, rtol=1e-5, atol=1e-6 * np.abs(g).max(), err_msg=var.path)
    moved = False
    for a, b, s in zip(_stats(model), after_plain, start):  # advanced once, not twice
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        moved |= not np.allclose(a, s)
    assert moved, "the step did not update the batch-norm statistics"


def _ancestors(op) -> set[str]:
    seen, stack = set(), [op]
    while stack:
        node = stack.pop()
        for parent in [t.op for t in node.inputs] + list(node.control_inputs):
            if parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return seen


def test_each_unit_is_recomputed_after_its_output_gradient():
    model = _model("tiny", 16)
    x, target = tf.zeros([2, 16, 16, 3]), tf.ones([2, 16])
    ck = CheckpointedBackbone(model, backbones.unit_ends(model))
    assert len(ck.units) == 3
    plain = _step(model, model, x, target).get_concrete_function().graph
    graph = _step(ck, model, x, target).get_concrete_function().graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert len(convs) == 2 * sum(op.type == "Conv2D" for op in plain.get_operations()) == 6
    forward, again = convs[:3], convs[3:]  # the graph is built in program order
    assert all(not any("gradient_tape" in n for n in _ancestors(op)) for op in forward)
    assert all(any("gradient_tape" in n for n in _ancestors(op)) for op in again)


def test_unit_ends_cover_every_backbone():
    for name in backbones.BACKBONES:
        model = backbones.build_backbone(name, 32, 8)
        ends = backbones.unit_ends(model)
        ck = CheckpointedBackbone(model, ends)
        assert len(ck.units) == len(ends) and len(ends) >= 3
        weights = {id(v) for unit in ck.units for v in unit.weights} | {id(v) for v in ck.head.weights}
        assert weights == {id(v) for v in model.weights}  # shared, nothing copied or left out


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_a_trainer_step_with_checkpointing_equals_one_without(tmp_path, precision):
    plain = _trainer(tmp_path / "plain", precision)
    ck = _trainer(tmp_path / "ck", precision, gradient_checkpointing=True)
    assert isinstance(ck.forward, CheckpointedBackbone) and plain.forward is plain.model
    for t in (plain, ck):
        if t.loss_scale is not None:
            t.loss_scale.value.assign(2.0**8)
    for step in range(2):
        batch = train_worker.global_batch(step)
        a, b = plain.train_step(*batch), ck.train_step(*batch)
        assert a.applied and b.applied
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
    for a, b in zip(_weights(plain), _weights(ck)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
