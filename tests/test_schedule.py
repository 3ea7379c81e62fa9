"""launch.schedule: values at key steps against the closed forms, in and out of tf.function."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from launch.config import OptimConfig
from launch.schedule import LRSchedule, learning_rate

L, M, W, T = 0.4, 0.01, 10, 110  # peak, floor, warm-up steps, total steps


def closed_form(step: int, schedule: str, power: float = 2.0) -> float:
    if step < W:
        return L * (step + 1) / W
    p = min(max((step - W) / (T - W), 0.0), 1.0)
    if schedule == "constant":
        return L
    if schedule == "poly":
        return M + (L - M) * (1 - p) ** power
    return M + (L - M) * 0.5 * (1 + math.cos(math.pi * p))


KEY_STEPS = [0, 1, W - 1, W, W + 25, W + 50, W + 75, T - 1, T, T + 40]


@pytest.mark.parametrize("schedule", ["constant", "poly", "cosine"])
def test_values_at_key_steps(schedule):
    kwargs = dict(lr=L, total_steps=T, warmup_steps=W, schedule=schedule, power=2.0, min_lr=M)
    for step in KEY_STEPS:
        got = float(learning_rate(step, **kwargs))
        assert got == pytest.approx(closed_form(step, schedule), rel=1e-6, abs=1e-9), step


def test_landmarks():
    kw = dict(lr=L, total_steps=T, warmup_steps=W, min_lr=M)
    assert float(learning_rate(0, schedule="poly", **kw)) == pytest.approx(L / W)
    assert float(learning_rate(W - 1, schedule="poly", **kw)) == pytest.approx(L)  # peak at the end of warm-up
    assert float(learning_rate(W + 50, schedule="cosine", **kw)) == pytest.approx((L + M) / 2)  # halfway
    assert float(learning_rate(W + 50, schedule="poly", power=1.0, **kw)) == pytest.approx((L + M) / 2)
    assert float(learning_rate(T, schedule="poly", **kw)) == pytest.approx(M)
    assert float(learning_rate(10 * T, schedule="cosine", **kw)) == pytest.approx(M)
    assert float(learning_rate(5, lr=L, total_steps=T, schedule="poly")) == pytest.approx(L * (1 - 5 / T) ** 2)


def test_tensor_step_inside_tf_function():
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def lr_now():
        return learning_rate(step, lr=L, total_steps=T, warmup_steps=W, schedule="cosine", min_lr=M)

    got = []
    for s in KEY_STEPS:
        step.assign(s)
        got.append(float(lr_now()))
    np.testing.assert_allclose(got, [closed_form(s, "cosine") for s in KEY_STEPS], rtol=1e-6, atol=1e-9)
    assert lr_now.experimental_get_tracing_count() == 1  # one graph serves every step


def test_keras_schedule_drives_an_optimizer():
    optim = OptimConfig(lr=L, warmup_steps=W, schedule="poly", power=2.0, min_lr=M)
    schedule = LRSchedule.from_optim(optim, total_steps=T, scale=0.5)
    opt = keras.optimizers.SGD(learning_rate=schedule)
    var = keras.Variable([1.0])
    for _ in range(W + 3):
        opt.apply_gradients([(tf.constant([0.0]), var)])
    # After W + 3 updates the next update uses the rate of step W + 3, scaled by 0.5.
    assert float(opt.learning_rate) == pytest.approx(0.5 * closed_form(W + 3, "poly"), rel=1e-6)
    assert LRSchedule(**schedule.get_config()).get_config() == schedule.get_config()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(schedule="step"), "schedule must be one of"),
        (dict(lr=-0.1), "lr must be"),
        (dict(total_steps=0), "total_steps must be"),
        (dict(warmup_steps=T + 1), "warmup_steps must be"),
        (dict(power=0.0), "power must be > 0"),
        (dict(min_lr=2 * L, schedule="cosine"), "min_lr must be in"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(lr=L, total_steps=T, warmup_steps=W, schedule="poly", power=2.0, min_lr=M)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        learning_rate(0, **args)
