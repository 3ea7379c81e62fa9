"""Sparse, shard-local optimizers for the class rows of a `PartitionedFC`.

Only the rows that took part in a step are read and written: their weight, their optimizer state
and their weight decay. A row that was not sampled stays bit for bit as it was (the truly sparse
update of PLSC and the first Partial FC; the second Partial FC moves every row through momentum and
decay). The shard and its state are this worker's alone and never enter the data-parallel
gradient reduction: gradients come straight from the layer's backward.

The update rules are pure functions of float32 tensors; the classes hold the state variables (in
the layer's `param_dtype`) and gather / scatter the rows.
"""

from __future__ import annotations

import tensorflow as tf


def sgd_update(w, g, m, lr, momentum: float, nesterov: bool, weight_decay: float):
    """SGD with coupled L2 decay (as InsightFace trains): rows [k, D] -> (new w, new m or None)."""
    g = g + weight_decay * w if weight_decay else g
    if m is None:
        return w - lr * g, None
    m = momentum * m + g
    step = g + momentum * m if nesterov else m
    return w - lr * step, m


def adamw_update(w, g, m, v, t, lr, beta_1: float, beta_2: float, epsilon: float, weight_decay: float):
    """AdamW (decoupled decay) with a per-row step count t [k] (float32, already incremented).

    Per-row bias correction: a row sampled for the first time at global step 10⁴ is corrected as
    the first step it is, not as step 10⁴ (which would make its first update √(1−β2)⁻¹ times too big).
    """
    m = beta_1 * m + (1.0 - beta_1) * g
    v = beta_2 * v + (1.0 - beta_2) * tf.square(g)
    m_hat = m / (1.0 - tf.pow(beta_1, t))[:, None]
    v_hat = v / (1.0 - tf.pow(beta_2, t))[:, None]
    w = w - lr * (m_hat / (tf.sqrt(v_hat) + epsilon) + weight_decay * w)
    return w, m, v


class ShardOptimizer(tf.Module):
    """Base: `apply_rows(rows, grad, lr)` updates the given shard rows only.

    weight: the layer's shard variable [C_r, D]; state variables have its shape and dtype.
    """

    def __init__(self, weight: tf.Variable, weight_decay: float = 0.0, name: str | None = None):
        super().__init__(name=name)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight = weight
        self.weight_decay = float(weight_decay)

    def _slot(self, name: str) -> tf.Variable:
        with self.name_scope:
            return tf.Variable(tf.zeros(self.weight.shape, self.weight.dtype), trainable=False, name=name)

    def slots(self) -> tuple[tf.Variable, ...]:
        """The row-aligned state variables ([C_r, ...]), in the order `rule` takes them."""
        raise NotImplementedError

    def rule(self, w, g, slots, lr):
        """The pure update of some rows: w, g [k, D], slots (their rows, float32), lr [] float32
        -> (new w, new slots). The fused training step runs it inside its row kernel."""
        raise NotImplementedError

    def apply_rows(self, rows: tf.Tensor | None, grad: tf.Tensor, lr):
        """rows [k] int32 unique shard rows (None: all, in order), grad [k, D], lr [] -> an op."""
        slots = self.slots()
        w, new = self.rule(
            _read(self.weight, rows),
            tf.cast(grad, tf.float32),
            tuple(_read(v, rows) for v in slots),
            tf.cast(lr, tf.float32),
        )
        return tf.group([_write(v, rows, x) for v, x in zip((self.weight, *slots), (w, *new))])

    def apply_gradient(self, grad, lr):
        """A gradient of the shard from an autodiff tape: dense [C_r, D] or IndexedSlices."""
        if isinstance(grad, tf.IndexedSlices):
            rows, pos = tf.unique(tf.cast(grad.indices, tf.int32))
            values = tf.math.unsorted_segment_sum(tf.cast(grad.values, tf.float32), pos, tf.shape(rows)[0])
        else:
            rows, values = None, tf.cast(grad, tf.float32)
        return self.apply_rows(rows, values, lr)

    def state(self) -> dict[str, tf.Variable]:
        """Name -> state variable, row-aligned with the shard (for checkpoints and re-sharding)."""
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError


def _read(var: tf.Variable, rows):
    if rows is None:
        return tf.cast(var, tf.float32)
    return tf.cast(tf.gather(var, rows), tf.float32)


def _write(var: tf.Variable, rows, values):
    if rows is None:  # every row: one dense assignment
        return var.assign(tf.cast(values, var.dtype))
    # ResourceScatterUpdate writes in place: no copy of the (possibly multi-GB) shard.
    return var.scatter_update(tf.IndexedSlices(tf.cast(values, var.dtype), rows))


class SGD(ShardOptimizer):
    """SGD with (optionally Nesterov) momentum and coupled weight decay, sparse over rows."""

    def __init__(
        self,
        weight: tf.Variable,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        name: str | None = None,
    ):
        super().__init__(weight, weight_decay, name=name or "shard_sgd")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocity = self._slot("momentum") if self.momentum else None

    def slots(self):
        return () if self.velocity is None else (self.velocity,)

    def rule(self, w, g, slots, lr):
        w, m = sgd_update(w, g, slots[0] if slots else None, lr, self.momentum, self.nesterov, self.weight_decay)
        return w, () if m is None else (m,)

    def state(self):
        return {"momentum": self.velocity} if self.velocity is not None else {}

    def get_config(self):
        return {"name": "sgd", "momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}


class AdamW(ShardOptimizer):
    """AdamW with per-row moments and per-row step counts, sparse over rows."""

    def __init__(
        self,
        weight: tf.Variable,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        name: str | None = None,
    ):
        super().__init__(weight, weight_decay, name=name or "shard_adamw")
        for key, b in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {b}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.m = self._slot("m")
        self.v = self._slot("v")
        with self.name_scope:
            self.count = tf.Variable(tf.zeros([self.weight.shape[0]], tf.int32), trainable=False, name="count")

    def slots(self):
        return self.m, self.v, self.count

    def rule(self, w, g, slots, lr):
        m, v, count = slots
        t = count + 1.0
        w, m, v = adamw_update(w, g, m, v, t, lr, self.beta_1, self.beta_2, self.epsilon, self.weight_decay)
        return w, (m, v, t)

    def state(self):
        return {"m": self.m, "v": self.v, "count": self.count}

    def get_config(self):
        return {
            "name": "adamw",
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "weight_decay": self.weight_decay,
        }


def get(name: str, weight: tf.Variable, **params) -> ShardOptimizer:
    """'sgd' | 'adamw' -> the optimizer for this shard."""
    kinds = {"sgd": SGD, "adamw": AdamW}
    if name not in kinds:
        raise ValueError(f"unknown shard optimizer {name!r}; choose from {sorted(kinds)}")
    return kinds[name](weight, **params)
