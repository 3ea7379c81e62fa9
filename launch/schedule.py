"""The learning rate as a pure function of the step: linear warm-up, then constant, poly or cosine.

`step` counts optimizer updates already applied (0 for the first update). With W warm-up steps,
T total steps, peak lr L, floor m and p = clip((step − W) / (T − W), 0, 1):

    step <  W:  L · (step + 1) / W                  (reaches L at the last warm-up step)
    constant:   L
    poly:       m + (L − m) · (1 − p)^power
    cosine:     m + (L − m) · (1 + cos(π p)) / 2

so poly and cosine reach m at step T and stay there. Works on Python numbers and on tensors
(a `tf.Variable` step inside `tf.function`), always returning a float32 scalar tensor.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

SCHEDULES = ("constant", "poly", "cosine")


def learning_rate(
    step,
    *,
    lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    power: float = 2.0,
    min_lr: float = 0.0,
) -> tf.Tensor:
    """The learning rate for update number `step` (int or integer/float tensor) -> float32 scalar."""
    check_schedule(
        lr=lr, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, power=power, min_lr=min_lr
    )
    t = tf.cast(step, tf.float32)
    peak = tf.constant(lr, tf.float32)
    if schedule == "constant":
        after = peak
    else:
        span = float(max(total_steps - warmup_steps, 1))
        p = tf.clip_by_value((t - warmup_steps) / span, 0.0, 1.0)
        if schedule == "poly":
            shape = tf.pow(1.0 - p, power)
        else:
            shape = 0.5 * (1.0 + tf.cos(math.pi * p))
        after = min_lr + (peak - min_lr) * shape
    if warmup_steps == 0:
        return after
    warm = peak * (t + 1.0) / float(warmup_steps)
    return tf.where(t < warmup_steps, warm, after)


def check_schedule(
    *, lr: float, total_steps: int, warmup_steps: int, schedule: str, power: float, min_lr: float
) -> None:
    """Raise ValueError naming the argument for an impossible schedule."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}], got {warmup_steps!r}")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"power must be > 0, got {power!r}")
    if not (math.isfinite(min_lr) and 0 <= min_lr) or (schedule != "constant" and min_lr > lr):
        raise ValueError(f"min_lr must be in [0, lr={lr}], got {min_lr!r}")


class LRSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`learning_rate` as a Keras schedule (the optimizer calls it with its iteration count)."""

    def __init__(
        self,
        lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        schedule: str = "constant",
        power: float = 2.0,
        min_lr: float = 0.0,
        scale: float = 1.0,
    ):
        check_schedule(
            lr=lr * scale,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            schedule=schedule,
            power=power,
            min_lr=min_lr * scale,
        )
        self.lr, self.total_steps, self.warmup_steps = lr, total_steps, warmup_steps
        self.schedule, self.power, self.min_lr, self.scale = schedule, power, min_lr, scale

    @classmethod
    def from_optim(cls, optim, total_steps: int, scale: float = 1.0) -> LRSchedule:
        """From a `launch.config.OptimConfig`; `scale` multiplies lr and min_lr (e.g. fc_lr_scale)."""
        return cls(
            lr=optim.lr,
            total_steps=total_steps,
            warmup_steps=optim.warmup_steps,
            schedule=optim.schedule,
            power=optim.power,
            min_lr=optim.min_lr,
            scale=scale,
        )

    def __call__(self, step):
        return learning_rate(
            step,
            lr=self.lr * self.scale,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            schedule=self.schedule,
            power=self.power,
            min_lr=self.min_lr * self.scale,
        )

    def get_config(self) -> dict:
        return {
            "lr": self.lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule,
            "power": self.power,
            "min_lr": self.min_lr,
            "scale": self.scale,
        }
