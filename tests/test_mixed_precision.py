"""Backbone mixed precision (model.precision): a 16-bit step equals the float32 step to its
dtype's tolerance; a float16 overflow skips the backbone step and halves the loss scale; the scale
is checkpointed."""

import numpy as np
import pytest
from workers import train_worker

import cluster
from launch.config import ConfigError, from_dict
from launch.trainer import LossScale, Trainer


def _trainer(tmp_path, precision: str, batch_norm: bool = True, **model) -> Trainer:
    raw = train_worker.config(str(tmp_path / precision), 4, None)
    raw["model"].update(precision=precision, batch_norm=batch_norm, **model)
    raw["train"]["batch_size"] = train_worker.GLOBAL_BATCH
    raw["optim"]["warmup_steps"] = 0  # a full-size first step: its update is far above float32 rounding
    t = Trainer(from_dict(raw), cluster.init("local"), num_classes=train_worker.NUM_CLASSES)
    t.set_total_steps(10)
    return t


def _weights(t: Trainer) -> list[np.ndarray]:
    return [np.asarray(v.numpy(), np.float64) for v in t.model.trainable_variables]


@pytest.mark.parametrize("precision, tol", [("mixed_bfloat16", 3e-2), ("mixed_float16", 4e-3)])
def test_a_16_bit_step_equals_the_float32_step(tmp_path, precision, tol):
    ref, mixed = _trainer(tmp_path, "float32"), _trainer(tmp_path, precision)
    start = _weights(ref)
    for a, b in zip(start, _weights(mixed)):
        np.testing.assert_array_equal(a, b)  # same seed, same float32 variables
    assert mixed.model.layers[-1].compute_dtype == "float32"
    assert any(layer.compute_dtype == precision.split("_")[1] for layer in mixed.model.layers)
    if mixed.loss_scale is not None:
        mixed.loss_scale.value.assign(2.0**8)  # the default 2^15 overflows this model's first step
    images, labels = train_worker.global_batch(0)
    r, m = ref.train_step(images, labels), mixed.train_step(images, labels)
    assert r.applied and m.applied
    assert m.loss == pytest.approx(r.loss, rel=tol)
    # the update of all variables together: 16-bit rounding, not a different step
    step_ref = np.concatenate([(a - s).ravel() for s, a in zip(start, _weights(ref))])
    step_mixed = np.concatenate([(b - s).ravel() for s, b in zip(start, _weights(mixed))])
    assert np.linalg.norm(step_mixed - step_ref) <= 5 * tol * np.linalg.norm(step_ref)


def test_a_float16_overflow_skips_the_backbone_step_and_halves_the_scale(tmp_path):
    t = _trainer(tmp_path, "mixed_float16")
    t.loss_scale.value.assign(3e38)  # the scaled float16 backward overflows
    before = _weights(t)
    out = t.train_step(*train_worker.global_batch(0))
    assert not out.applied and out.overflow and t.step == 0
    assert t.position.overflows == 1 and t.position.skipped == 0  # not a data fault: no skip cap
    for a, b in zip(before, _weights(t)):
        np.testing.assert_array_equal(a, b)
    assert float(t.loss_scale.value) == pytest.approx(1.5e38)
    t.loss_scale.value.assign(2.0**10)
    assert t.train_step(*train_worker.global_batch(1)).applied and t.step == 1
    assert float(t.loss_scale.value) == 2.0**10 and int(t.loss_scale.good_steps) == 1


def test_the_loss_scale_grows_after_a_period_of_finite_steps():
    scale = LossScale(initial=4.0, period=3)
    for finite, expected in [(True, 4.0), (True, 4.0), (True, 8.0), (False, 4.0), (True, 4.0)]:
        scale.update(np.bool_(finite))
        assert float(scale.value) == expected
    assert int(scale.good_steps) == 1


def test_the_loss_scale_is_checkpointed(tmp_path):
    t = _trainer(tmp_path, "mixed_float16")
    t.loss_scale.value.assign(2.0**8)
    assert t.train_step(*train_worker.global_batch(0)).applied
    t.loss_scale.value.assign(123.0)
    path = t.save()
    other = _trainer(tmp_path, "mixed_float16")
    other.restore(path)
    assert float(other.loss_scale.value) == 123.0 and int(other.loss_scale.good_steps) == 1


def test_an_unknown_precision_names_the_key(tmp_path):
    raw = train_worker.config(str(tmp_path), 4, None)
    raw["model"]["precision"] = "float8"
    with pytest.raises(ConfigError, match="model.precision"):
        from_dict(raw)
