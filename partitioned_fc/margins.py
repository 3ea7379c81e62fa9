"""The margin family of docs/margins.md: what each loss does to the target ("label") logit.

A margin is a small, immutable description: whether class weights and embeddings are
L2-normalized, the scale `s`, and a pure function that maps the target's `cos θ_y` (and the
factor `k` with plain target logit `f_y = k·cos θ_y`) to the margin logit `f'_y`. Non-target
logits are never touched. All functions are elementwise on `[B]` tensors and keep finite
gradients at cos θ = ±1; no `acos` sits in a gradient path except through `_acos`, whose
derivative is floored the same way as `_sin_from_cos`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import tensorflow as tf


# --------------------------------------------------------------------------------------------
# Safe trigonometry on c = cos θ
# --------------------------------------------------------------------------------------------
def _sin_floor(dtype: tf.DType) -> float:
    """Smallest sin θ used in a derivative.

    Half of sqrt(eps) lies below the smallest non-zero sin θ that any representable cos θ < 1
    produces, so the floor changes no derivative except at exactly |cos θ| = 1, where the true one
    is infinite. Margins are evaluated in float32 or float64 only.
    """
    eps = 2.0**-52 if dtype == tf.float64 else 2.0**-23
    return 0.5 * math.sqrt(eps)


def _floored_sin(c: tf.Tensor) -> tf.Tensor:
    """max(sin θ, floor): the denominator of every d/dc through sin θ or acos."""
    return tf.maximum(tf.sqrt(tf.maximum(1.0 - c * c, 0.0)), _sin_floor(c.dtype))


@tf.custom_gradient
def _sin_from_cos(c: tf.Tensor) -> tf.Tensor:
    """sin θ = sqrt(1 - c²) for θ in [0, π]; exact value, derivative -c / max(sin θ, floor)."""

    def grad(dy):
        return dy * (-c / _floored_sin(c))

    return tf.sqrt(tf.maximum(1.0 - c * c, 0.0)), grad


@tf.custom_gradient
def _acos(c: tf.Tensor) -> tf.Tensor:
    """θ = acos(c); derivative -1 / max(sin θ, floor) (finite at c = +-1)."""

    def grad(dy):
        return dy * (-1.0 / _floored_sin(c))

    return tf.acos(c), grad


def _ipow(t: tf.Tensor, n: int) -> tf.Tensor:
    """t**n for an integer n >= 0 by multiplication: no 0·inf in the gradient at t = 0."""
    out = tf.ones_like(t)
    for _ in range(n):
        out = out * t
    return out


def cos_multiple_angle(c: tf.Tensor, m: int) -> tf.Tensor:
    """cos(mθ) from c = cos θ by the multiple-angle expansion (a polynomial: finite gradients).

    cos(mθ) = Σ_{n=0}^{⌊m/2⌋} (−1)^n C(m, 2n) c^{m−2n} (1−c²)^n
    """
    one_minus = 1.0 - c * c
    out = tf.zeros_like(c)
    for n in range(m // 2 + 1):
        out += ((-1) ** n) * math.comb(m, 2 * n) * _ipow(c, m - 2 * n) * _ipow(one_minus, n)
    return out


def psi(c: tf.Tensor, m: int) -> tf.Tensor:
    """ψ(θ) = (−1)^k cos(mθ) − 2k on θ ∈ [kπ/m, (k+1)π/m]: continuous, decreasing on [0, π].

    k (piecewise constant, no gradient) counts the thresholds cos(jπ/m), j = 1..m-1, above c.
    """
    k = tf.zeros_like(c)
    for j in range(1, m):
        k += tf.cast(c < math.cos(j * math.pi / m), c.dtype)
    k = tf.stop_gradient(k)
    sign = 1.0 - 2.0 * tf.math.floormod(k, 2.0)  # (−1)^k
    return sign * cos_multiple_angle(c, m) - 2.0 * k


# --------------------------------------------------------------------------------------------
# λ annealing (L-Softmax, A-Softmax)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LambdaSchedule:
    """SphereFace's schedule λ_t = max(minimum, base · (1 + gamma·t)^(−power))."""

    base: float = 1000.0
    gamma: float = 0.12
    power: float = 1.0
    minimum: float = 5.0

    def __post_init__(self):
        if self.base < 0 or self.minimum < 0 or self.gamma < 0 or self.power < 0:
            raise ValueError(f"LambdaSchedule parameters must be >= 0, got {self}")

    def __call__(self, step) -> tf.Tensor:
        t = tf.cast(step, tf.float32)
        return tf.maximum(self.minimum, self.base * tf.pow(1.0 + self.gamma * t, -self.power))


def _lambda_at(lambda_, step) -> tf.Tensor:
    if isinstance(lambda_, LambdaSchedule):
        return lambda_(step)
    return tf.constant(float(lambda_), tf.float32)


def current_lambda(margin: Margin, step) -> float:
    """The annealing weight λ a margin uses at `step` (0 for margins without one)."""
    lambda_ = getattr(margin, "lambda_", None)
    return 0.0 if lambda_ is None else float(_lambda_at(lambda_, step))


def _parse_lambda(value: Any) -> float | LambdaSchedule:
    if isinstance(value, LambdaSchedule):
        return value
    if isinstance(value, dict):
        return LambdaSchedule(**value)
    if isinstance(value, (tuple, list)):
        return LambdaSchedule(*value)
    value = float(value)
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"lambda_ must be a finite number >= 0 or a LambdaSchedule, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------
class Margin:
    """Base class. Subclasses are frozen dataclasses.

    normalize_weights / normalize_embeddings: which side is L2-normalized before the dot product.
    scale: multiplies every logit (None: no scale). Non-target logit f_j = scale·(a(x)·b(W_j)).
    """

    name: ClassVar[str] = "margin"
    normalize_weights: ClassVar[bool] = True
    normalize_embeddings: ClassVar[bool] = True

    @property
    def logit_scale(self) -> float:
        return 1.0

    # A field on every normalized margin (docs/margins.md, "Inter-class filtering"); 0 = off.
    interclass_filtering_threshold: ClassVar[float] = 0.0
    # True where the negatives' rule needs every sample's cos θ_y (one [B] exchange).
    needs_target_cos: ClassVar[bool] = False
    # True for a one-vs-all binary loss (SphereFace2): no softmax, a sum of per-class terms.
    binary: ClassVar[bool] = False

    def bind(self, num_classes: int) -> None:
        """Called by the layer with C: a margin whose start depends on it (SphereFace2's bias)
        sets it here. Nothing for the others."""

    @property
    def rows_per_class(self) -> int:
        """Weight rows per class: k sub-centers (Sub-center ArcFace), adjacent; 1 elsewhere."""
        return 1

    def target_logit(self, cos: tf.Tensor, k: tf.Tensor, step=0, context=None) -> tf.Tensor:
        """[B] cos θ_y, [B] factor k (plain f_y = k·cos θ_y), `batch_context`'s value -> [B] f'_y."""
        raise NotImplementedError

    def batch_context(self, x_norm: tf.Tensor) -> tf.Tensor | None:
        """[B] |x| of the whole global batch (differentiable) -> a per-sample input of
        `target_logit` and `extra_loss` ([B]), or None. A margin with running statistics
        advances them here: once per training call."""
        return None

    def extra_loss(self, context) -> tf.Tensor | None:
        """A per-sample term [B] added to the loss (MagFace's regularizer), or None."""
        return None

    def negative_rule(self) -> NegativeRule | None:
        """What this margin does to non-target logits (None: nothing)."""
        if self.interclass_filtering_threshold > 0:
            return NegativeRule(filter_above=float(self.interclass_filtering_threshold))
        return None

    def negative_context(self, target_cos: tf.Tensor, k: tf.Tensor) -> NegativeContext:
        """[B] every sample's cos θ_y (zeros unless `needs_target_cos`), [B] k -> the rule's inputs.
        A margin with running statistics advances them here: once per training call."""
        return NegativeContext(k, tf.zeros_like(k), tf.zeros([], k.dtype))

    def state(self) -> dict[str, tf.Variable]:
        """Running statistics by name (the same on every worker; checkpointed). None here."""
        return {}

    def get_config(self) -> dict:
        return {
            "name": self.name,
            **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init},
        }


def _plain(value):
    """A LambdaSchedule becomes a dict; everything else is kept."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _threshold_field() -> Any:
    """`interclass_filtering_threshold` of a normalized margin: keyword-only, 0 = off."""
    return dataclasses.field(default=0.0, kw_only=True)


def _check_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"interclass_filtering_threshold must be a cosine in [0, 1) (0: off), got {value!r}")


# --------------------------------------------------------------------------------------------
# Negatives: rules applied to the non-target logits inside the FC kernels
# --------------------------------------------------------------------------------------------
class NegativeContext(NamedTuple):
    """Per-sample inputs of a `NegativeRule`, the same on every worker."""

    k: tf.Tensor  # [B] the logit factor: f_j = k·cos θ_j
    hard_above: tf.Tensor  # [B] CurricularFace: negatives with cos θ_j above this are hard
    t: tf.Tensor  # [] CurricularFace's running t


@dataclasses.dataclass(frozen=True)
class NegativeRule:
    """Elementwise rule on the non-target logits z = k·cos θ_j: [B, n] -> (f [B, n], df/dz [B, n]).

    curricular: hard negatives (cos θ_j > hard_above) become k·cos θ_j (t + cos θ_j) (CurricularFace).
    filter_above: negatives with cos θ_j > filter_above get logit 0 and no gradient (inter-class
    filtering; applied last, so it wins over the curricular rule). A pure function of its inputs.
    """

    curricular: bool = False
    filter_above: float | None = None

    def __call__(self, z: tf.Tensor, ctx: NegativeContext) -> tuple[tf.Tensor, tf.Tensor]:
        c = z / ctx.k[:, None]
        f, d = z, tf.ones_like(z)
        if self.curricular:
            hard = c > ctx.hard_above[:, None]
            f = tf.where(hard, z * (ctx.t + c), f)
            d = tf.where(hard, ctx.t + 2.0 * c, d)  # d/dz of k·c(t + c), t held fixed
        if self.filter_above is not None:
            dirty = c > self.filter_above
            f, d = tf.where(dirty, 0.0, f), tf.where(dirty, 0.0, d)
        return f, d


def _check_scale(scale: float, name: str = "scale") -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {scale!r}")


def _check_at_least(value: Any, name: str, low: float = 0.0) -> None:
    """A finite number >= low, or a ValueError naming the parameter."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number >= {low:g}, got {value!r}")


def _check_int_margin(m: Any) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"margin must be an integer >= 1 for L-Softmax / A-Softmax, got {m!r}")


@dataclasses.dataclass(frozen=True)
class Softmax(Margin):
    """Plain softmax: f_j = W_j·x, nothing normalized, no margin."""

    name: ClassVar[str] = "softmax"
    normalize_weights: ClassVar[bool] = False
    normalize_embeddings: ClassVar[bool] = False

    def target_logit(self, cos, k, step=0, context=None):
        return k * cos


@dataclasses.dataclass(frozen=True)
class NormFace(Margin):
    """Modified softmax / NormFace: W normalized. scale=None: f_j = |x| cos θ_j (x not normalized);
    scale=s: x normalized too and f_j = s cos θ_j."""

    name: ClassVar[str] = "normface"
    scale: float | None = None
    interclass_filtering_threshold: float = _threshold_field()

    def __post_init__(self):
        if self.scale is not None:
            _check_scale(self.scale)
        _check_threshold(self.interclass_filtering_threshold)

    @property
    def normalize_embeddings(self) -> bool:  # type: ignore[override]
        return self.scale is not None

    @property
    def logit_scale(self) -> float:
        return 1.0 if self.scale is None else float(self.scale)

    def target_logit(self, cos, k, step=0, context=None):
        return k * cos


@dataclasses.dataclass(frozen=True)
class LSoftmax(Margin):
    """L-Softmax (Liu et al. 2016): f'_y = |W_y||x| ψ(θ_y), blended with λ."""

    name: ClassVar[str] = "lsoftmax"
    normalize_weights: ClassVar[bool] = False
    normalize_embeddings: ClassVar[bool] = False
    margin: int = 4
    lambda_: float | LambdaSchedule = 0.0

    def __post_init__(self):
        _check_int_margin(self.margin)
        object.__setattr__(self, "lambda_", _parse_lambda(self.lambda_))

    def target_logit(self, cos, k, step=0, context=None):
        lam = tf.cast(_lambda_at(self.lambda_, step), cos.dtype)
        return (lam * k * cos + k * psi(cos, self.margin)) / (1.0 + lam)


@dataclasses.dataclass(frozen=True)
class ASoftmax(LSoftmax):
    """A-Softmax / SphereFace (Liu et al. 2017): W normalized, f'_y = |x| ψ(θ_y), blended with λ."""

    name: ClassVar[str] = "asoftmax"
    normalize_weights: ClassVar[bool] = True
    normalize_embeddings: ClassVar[bool] = False
    interclass_filtering_threshold: float = _threshold_field()

    def __post_init__(self):
        super().__post_init__()
        _check_threshold(self.interclass_filtering_threshold)


@dataclasses.dataclass(frozen=True)
class AMSoftmax(Margin):
    """AM-Softmax (Wang et al. 2018) = CosFace: f'_y = s (cos θ_y − m)."""

    name: ClassVar[str] = "amsoftmax"
    scale: float = 30.0
    margin: float = 0.35
    interclass_filtering_threshold: float = _threshold_field()

    def __post_init__(self):
        _check_scale(self.scale)
        _check_threshold(self.interclass_filtering_threshold)
        _check_at_least(self.margin, "margin")

    @property
    def logit_scale(self) -> float:
        return float(self.scale)

    def target_logit(self, cos, k, step=0, context=None):
        return k * (cos - self.margin)


@dataclasses.dataclass(frozen=True)
class CosFace(AMSoftmax):
    """CosFace (Wang et al. 2018): the AM-Softmax formula with CosFace's defaults s=64, m=0.4."""

    name: ClassVar[str] = "cosface"
    scale: float = 64.0
    margin: float = 0.4


@dataclasses.dataclass(frozen=True)
class CombinedMargin(Margin):
    """InsightFace's combined margin: f'_y = s (cos(m1 θ_y + m2) − m3).

    Beyond the point where m1·θ + m2 reaches π the cosine would turn back up; there the logit
    continues monotonically. For m1 = 1 the rule is ArcFace's (docs/margins.md): cos θ − m2·sin(π − m2).
    For m1 ≠ 1 it is the continuous extension −1 − (cos θ_t − cos θ) from the turning point θ_t.
    """

    name: ClassVar[str] = "combined"
    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    interclass_filtering_threshold: float = _threshold_field()

    def __post_init__(self):
        _check_scale(self.scale)
        _check_threshold(self.interclass_filtering_threshold)
        for key in ("m1", "m2", "m3"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{key} must be a finite number, got {v!r}")
        if self.m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {self.m1!r}")
        if not 0 <= self.m2 < math.pi:
            raise ValueError(f"m2 must be in [0, π), got {self.m2!r}")

    @property
    def logit_scale(self) -> float:
        return float(self.scale)

    def _angular(self, c):
        """cos(m1 θ + m2) with the monotone continuation past π."""
        m1, m2 = float(self.m1), float(self.m2)
        if m1 == 1.0:
            sin_t = _sin_from_cos(c)
            cos_tm = c * math.cos(m2) - sin_t * math.sin(m2)
            threshold = math.cos(math.pi - m2)
            return tf.where(c > threshold, cos_tm, c - m2 * math.sin(math.pi - m2))
        theta = _acos(c)
        cos_tm = tf.cos(m1 * theta + m2)
        theta_t = (math.pi - m2) / m1
        if theta_t >= math.pi:
            return cos_tm
        c_t = math.cos(theta_t)
        return tf.where(c > c_t, cos_tm, -1.0 - (c_t - c))

    def target_logit(self, cos, k, step=0, context=None):
        return k * (self._angular(cos) - self.m3)


@dataclasses.dataclass(frozen=True)
class ArcFace(CombinedMargin):
    """ArcFace (Deng et al. 2019): f'_y = s cos(θ_y + m); exact derivative
    cos m + cos θ·sin m / sin θ (finite at cos θ = ±1, see _sin_from_cos)."""

    name: ClassVar[str] = "arcface"
    scale: float = 64.0
    margin: float = 0.5
    m1: float = dataclasses.field(default=1.0, init=False, repr=False)
    m2: float = dataclasses.field(default=0.5, init=False, repr=False)
    m3: float = dataclasses.field(default=0.0, init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "m2", self.margin)
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class CurricularFace(ArcFace):
    """CurricularFace (Huang et al. 2020): ArcFace's target f'_y = s cos(θ_y + m); a negative
    harder than it, cos θ_j > cos(θ_y + m), becomes s cos θ_j (t + cos θ_j), where t, a running
    mean of the batch's cos θ_y (momentum 0.01, from 0), grows as training goes: easy negatives
    first, hard ones later. t is advanced once per training call, before it is used."""

    name: ClassVar[str] = "curricularface"
    needs_target_cos: ClassVar[bool] = True
    t_momentum: ClassVar[float] = 0.01
    _t: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        with tf.init_scope():  # a variable even when the margin is built inside a tf.function
            object.__setattr__(self, "_t", tf.Variable(0.0, trainable=False, name="curricular_t"))

    def negative_rule(self) -> NegativeRule:
        base = super().negative_rule()
        return NegativeRule(curricular=True, filter_above=base.filter_above if base else None)

    def negative_context(self, target_cos, k) -> NegativeContext:
        c = tf.stop_gradient(target_cos)
        t = self.t_momentum * tf.reduce_mean(c) + (1.0 - self.t_momentum) * self._t
        self._t.assign(t)
        m = float(self.margin)
        hard_above = c * math.cos(m) - tf.sqrt(tf.maximum(1.0 - c * c, 0.0)) * math.sin(m)  # cos(θ+m)
        return NegativeContext(k, hard_above, tf.identity(t))

    def state(self) -> dict[str, tf.Variable]:
        return {"t": self._t}


@dataclasses.dataclass(frozen=True)
class AdaFace(Margin):
    """AdaFace (Kim et al. 2022): a margin that adapts to image quality through the feature norm.

    ẑ = clip(h · (|x| − μ) / (σ + ε), −1, 1), with μ, σ running statistics of the batch's |x|
    (momentum 0.01, from 20 and 100; |x| clipped to [0.001, 100], no gradient), and
    f'_y = s (cos(clip(θ_y − m ẑ, ε, π − ε)) − m − m ẑ): high-norm (good) images get an angular
    margin like ArcFace, low-norm ones an additive margin like CosFace, ε = 1e-3.
    """

    name: ClassVar[str] = "adaface"
    t_alpha: ClassVar[float] = 0.01
    eps: ClassVar[float] = 1e-3
    scale: float = 64.0
    margin: float = 0.4
    h: float = 0.333
    interclass_filtering_threshold: float = _threshold_field()
    _stats: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_scale(self.scale)
        _check_threshold(self.interclass_filtering_threshold)
        for key in ("margin", "h"):
            _check_at_least(getattr(self, key), key)
        with tf.init_scope():
            object.__setattr__(
                self,
                "_stats",
                {
                    "batch_mean": tf.Variable(20.0, trainable=False, name="adaface_batch_mean"),
                    "batch_std": tf.Variable(100.0, trainable=False, name="adaface_batch_std"),
                },
            )

    @property
    def logit_scale(self) -> float:
        return float(self.scale)

    def state(self) -> dict[str, tf.Variable]:
        return dict(self._stats)

    def batch_context(self, x_norm):
        """-> ẑ [B], after advancing μ and σ with this batch (the paper's order)."""
        n = tf.clip_by_value(tf.stop_gradient(tf.cast(x_norm, tf.float32)), 0.001, 100.0)
        mean = tf.reduce_mean(n)
        count = tf.cast(tf.size(n), tf.float32)
        std = tf.sqrt(tf.reduce_sum(tf.square(n - mean)) / tf.maximum(count - 1.0, 1.0))  # unbiased
        a = self.t_alpha
        mu = self._stats["batch_mean"].assign(a * mean + (1.0 - a) * self._stats["batch_mean"])
        sigma = self._stats["batch_std"].assign(a * std + (1.0 - a) * self._stats["batch_std"])
        z_hat = tf.clip_by_value((n - mu) / (sigma + self.eps) * self.h, -1.0, 1.0)
        return tf.cast(z_hat, x_norm.dtype)

    def target_logit(self, cos, k, step=0, context=None):
        if context is None:
            raise ValueError("AdaFace needs the batch's feature norms: pass batch_context(|x|)")
        m, eps = float(self.margin), self.eps
        theta = _acos(tf.clip_by_value(cos, -1.0 + eps, 1.0 - eps))
        theta_m = tf.clip_by_value(theta - m * context, eps, math.pi - eps)
        return k * (tf.cos(theta_m) - (m + m * context))


@dataclasses.dataclass(frozen=True)
class MagFace(Margin):
    """MagFace (Meng et al. 2021): an angular margin that grows with the embedding's magnitude
    a = clip(|x|, l_a, u_a): m(a) = l_m + (u_m − l_m)(a − l_a)/(u_a − l_a), f'_y = s cos(θ_y + m(a))
    (ArcFace's continuation past π), plus the regularizer λ_g (a/u_a² + 1/a) added to each
    sample's loss, which pulls magnitudes up: high magnitude = a confident, high-quality face.
    Gradients flow through a (the margin and the regularizer) to |x|.
    """

    name: ClassVar[str] = "magface"
    scale: float = 64.0
    l_a: float = 10.0
    u_a: float = 110.0
    l_m: float = 0.45
    u_m: float = 0.8
    lambda_g: float = 35.0
    interclass_filtering_threshold: float = _threshold_field()

    def __post_init__(self):
        _check_scale(self.scale)
        _check_threshold(self.interclass_filtering_threshold)
        if not 0 < self.l_a < self.u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={self.l_a!r}, u_a={self.u_a!r}")
        if not 0 <= self.l_m <= self.u_m < math.pi:
            raise ValueError(f"need 0 <= l_m <= u_m < π, got l_m={self.l_m!r}, u_m={self.u_m!r}")
        _check_at_least(self.lambda_g, "lambda_g")

    @property
    def logit_scale(self) -> float:
        return float(self.scale)

    def batch_context(self, x_norm):
        """-> the clipped magnitudes a [B] (differentiable inside [l_a, u_a])."""
        return tf.clip_by_value(x_norm, self.l_a, self.u_a)

    def _margin_of(self, a):
        return self.l_m + (self.u_m - self.l_m) * (a - self.l_a) / (self.u_a - self.l_a)

    def target_logit(self, cos, k, step=0, context=None):
        if context is None:
            raise ValueError("MagFace needs the embeddings' magnitudes: pass batch_context(|x|)")
        m = self._margin_of(context)
        cos_tm = cos * tf.cos(m) - _sin_from_cos(cos) * tf.sin(m)
        past = cos - tf.sin(math.pi - m) * m  # beyond θ + m = π, as ArcFace
        return k * tf.where(cos > tf.cos(math.pi - m), cos_tm, past)

    def extra_loss(self, context):
        return self.lambda_g * (context / self.u_a**2 + 1.0 / context)


@dataclasses.dataclass(frozen=True)
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al. 2020): k sub-centers per class; a class's cos θ is the
    largest over its sub-centers, cos θ_j = max_i cos(x, W_{j,i}), then ArcFace's margin on the
    target, f'_y = s cos(θ_y + m). A noisy sample can settle on a non-dominant sub-center instead
    of pulling its class's dominant one (docs/margins.md; `pfc clean` lists such samples).
    The weight has k·C rows: class j's sub-centers are rows k·j .. k·j + k − 1."""

    name: ClassVar[str] = "subcenter_arcface"
    k: int = 3

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (sub-centers per class) must be an integer >= 1, got {self.k!r}")
        super().__post_init__()

    @property
    def rows_per_class(self) -> int:
        return int(self.k)


@dataclasses.dataclass(frozen=True)
class SphereFace2(Margin):
    """SphereFace2 (Wen et al. 2022), its "C" (additive cosine) form: C one-vs-all binary
    classifiers instead of a softmax. With g(c) = 2((c + 1)/2)^t − 1 and a learned bias b (a
    scalar, the same for every class):

      ℓ = w/r · [λ log(1 + e^{−(r (g(cos θ_y) − m) + b)}) + (1 − λ) Σ_{j≠y} log(1 + e^{r (g(cos θ_j) + m) + b})]

    r = `scale`, m = `margin`, λ = `lam`, w = `loss_weight`. The paper's r = 40, m = 0.4, λ = 0.7,
    t = 3; w = 50 is its reference code's loss weight. Every class's term depends on its own
    cos θ_j only, so the sum over classes shards with one [B] allreduce and no logsumexp
    (docs/margins.md). b starts where the paper puts it for C classes (`bind`) and is learned:
    `bias` (a tf.Variable, in `state()`, checkpointed). Negatives above
    `interclass_filtering_threshold` add no term.
    """

    name: ClassVar[str] = "sphereface2"
    binary: ClassVar[bool] = True
    scale: float = 40.0
    margin: float = 0.4
    lam: float = 0.7
    t: float = 3.0
    loss_weight: float = 50.0
    interclass_filtering_threshold: float = _threshold_field()
    _bias: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_scale(self.scale)
        _check_scale(self.loss_weight, "loss_weight")
        _check_threshold(self.interclass_filtering_threshold)
        if not (isinstance(self.lam, (int, float)) and 0.0 < self.lam < 1.0):
            raise ValueError(f"lam must be in (0, 1), got {self.lam!r}")
        _check_at_least(self.t, "t", 1.0)
        _check_at_least(self.margin, "margin")
        with tf.init_scope():
            object.__setattr__(self, "_bias", tf.Variable(0.0, name="sphereface2_bias"))

    @property
    def bias(self) -> tf.Variable:
        return self._bias

    def state(self) -> dict[str, tf.Variable]:
        return {"bias": self._bias}

    def initial_bias(self, num_classes: int) -> float:
        """The paper's start for C classes: the b at which, for cos θ = 0 everywhere, the positive
        term's gradient balances the C − 1 negatives', λ σ(−f_y) = (1 − λ)(C − 1) σ(f_j)
        (0 when C = 1)."""
        if num_classes < 2:
            return 0.0
        lam, r, m = float(self.lam), float(self.scale), float(self.margin)
        z = lam / ((1.0 - lam) * (num_classes - 1))
        g0 = 2.0 * 0.5**self.t - 1.0
        a_pos, a_neg = r * (g0 - m), r * (g0 + m)
        # e^b is the positive root of e^{a_pos + a_neg} u² + e^{a_neg} (1 − z) u − z = 0, written
        # without the cancellation of its two terms (z > 1 only for C ≤ 1 + λ/(1 − λ)).
        root = math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_pos - a_neg))
        if z <= 1.0:
            return math.log(2.0 * z) - a_neg - math.log(1.0 - z + root)
        return math.log(root - (1.0 - z)) - math.log(2.0) - a_pos

    def bind(self, num_classes: int) -> None:
        self._bias.assign(self.initial_bias(num_classes))

    def _g(self, c):
        """[...] cos θ -> g(cos θ), and its derivative."""
        u = tf.maximum((c + 1.0) / 2.0, 0.0)
        return 2.0 * tf.pow(u, self.t) - 1.0, self.t * tf.pow(u, self.t - 1.0)

    def positive_loss(self, c, b):
        """[B] cos θ_y, [] b -> [B] the target's term (differentiable in both)."""
        g, _ = self._g(c)
        f = self.scale * (g - self.margin) + b
        return (self.loss_weight * self.lam / self.scale) * tf.nn.softplus(-f)

    def negative_loss(self, c, b):
        """[B, n] cos θ_j, [] b -> (terms [B, n], d/dcos [B, n], d/db [B, n]) of the negatives."""
        g, dg = self._g(c)
        f = self.scale * (g + self.margin) + b
        w = self.loss_weight * (1.0 - self.lam) / self.scale
        term, d_f = w * tf.nn.softplus(f), w * tf.sigmoid(f)
        if self.interclass_filtering_threshold > 0:
            keep = tf.cast(c <= self.interclass_filtering_threshold, c.dtype)
            term, d_f = term * keep, d_f * keep
        return term, d_f * self.scale * dg, d_f

    def target_logit(self, cos, k, step=0, context=None):
        raise TypeError("SphereFace2 is a binary loss: it has no softmax target logit (positive_loss)")


_REGISTRY: dict[str, type[Margin]] = {
    cls.name: cls
    for cls in (
        Softmax,
        NormFace,
        LSoftmax,
        ASoftmax,
        AMSoftmax,
        CosFace,
        ArcFace,
        CombinedMargin,
        CurricularFace,
        AdaFace,
        MagFace,
        SubCenterArcFace,
        SphereFace2,
    )
}
_ALIASES = {
    "sphereface": "asoftmax",
    "l-softmax": "lsoftmax",
    "a-softmax": "asoftmax",
    "am-softmax": "amsoftmax",
    "modified_softmax": "normface",
    "subcenter": "subcenter_arcface",
}


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, **params) -> Margin:
    """Build a margin by name ("arcface", "cosface", ...) with its parameters."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _REGISTRY:
        raise ValueError(f"unknown margin {name!r}; expected one of {available()}")
    cls = _REGISTRY[key]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for margin {key!r}; it takes {sorted(fields)}")
    return cls(**params)


def from_config(config: dict) -> Margin:
    config = dict(config)
    return get(config.pop("name"), **config)


# --------------------------------------------------------------------------------------------
# From embeddings and class rows to the target logit (shared by the layer and the reference)
# --------------------------------------------------------------------------------------------
def clip_cos(c: tf.Tensor) -> tf.Tensor:
    """Clip cos θ to [-1, 1] with a straight-through gradient: rounding that pushes a dot product
    of unit vectors past 1 must not zero its gradient."""
    return c + tf.stop_gradient(tf.clip_by_value(c, -1.0, 1.0) - c)


def logit_factor(margin: Margin, x: tf.Tensor, w_rows: tf.Tensor | None = None) -> tf.Tensor:
    """k [B] with f_j = k·cos θ_j: the scale, times |x| and |W_j| where they are not normalized
    (w_rows [B, D]: the label rows, needed only when weights are not normalized)."""
    k = tf.fill(tf.shape(x)[:1], tf.cast(margin.logit_scale, x.dtype))
    if not margin.normalize_embeddings:
        k = k * tf.norm(x, axis=1)
    if not margin.normalize_weights:
        k = k * tf.norm(w_rows, axis=1)
    return k


def target_cos(x: tf.Tensor, w_rows: tf.Tensor) -> tf.Tensor:
    """[B, D] embeddings, [B, D] their label rows -> [B] cos θ_y, clipped to [-1, 1]."""
    return clip_cos(tf.reduce_sum(tf.math.l2_normalize(x, axis=1) * tf.math.l2_normalize(w_rows, axis=1), axis=1))


def target_logit_from_rows(margin: Margin, x: tf.Tensor, w_rows: tf.Tensor, step=0, context=None) -> tf.Tensor:
    """[B, D] embeddings, [B, D] their label rows W_y (raw, unnormalized), the margin's
    `batch_context` of this batch (where it has one) -> [B] f'_y."""
    return margin.target_logit(target_cos(x, w_rows), logit_factor(margin, x, w_rows), step, context)
