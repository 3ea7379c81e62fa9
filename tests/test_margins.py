"""margins: each formula against its closed form, gradients, λ schedule, edge cases."""

import math

import numpy as np
import pytest
import tensorflow as tf

from partitioned_fc import margins as M

GRID = np.linspace(-1.0, 1.0, 2001)
INTERIOR = np.linspace(-0.999, 0.999, 401)


def value_and_grad(margin, c, k=1.0, step=0, dtype=tf.float64):
    c = tf.constant(c, dtype)
    with tf.GradientTape() as tape:
        tape.watch(c)
        f = margin.target_logit(c, tf.fill(tf.shape(c), tf.constant(k, dtype)), step)
    return f.numpy(), tape.gradient(f, c).numpy()


def psi_closed_form(c, m):
    theta = np.arccos(np.clip(c, -1, 1))
    k = np.minimum(np.floor(theta * m / np.pi), m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2 * k


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_matches_definition_and_is_monotone(m):
    got = M.psi(tf.constant(GRID), m).numpy()
    np.testing.assert_allclose(got, psi_closed_form(GRID, m), atol=1e-9)
    # continuous and decreasing in θ, i.e. increasing in cos θ
    assert np.all(np.diff(got) >= -1e-12)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_cos_multiple_angle_polynomials(m):
    expected = {2: 2 * GRID**2 - 1, 3: 4 * GRID**3 - 3 * GRID, 4: 8 * GRID**4 - 8 * GRID**2 + 1}[m]
    np.testing.assert_allclose(M.cos_multiple_angle(tf.constant(GRID), m).numpy(), expected, atol=1e-12)


def test_psi_m4_sign_form():
    c = GRID
    s0 = np.sign(c)
    s3 = np.sign(2 * c**2 - 1) * s0
    s4 = 2 * s0 + s3 - 3
    sign_form = s3 * (8 * c**4 - 8 * c**2 + 1) + s4
    away = np.abs(np.abs(c) - np.sqrt(0.5)) > 1e-6  # sign() is 0 exactly on the thresholds
    away &= c != 0
    np.testing.assert_allclose(M.psi(tf.constant(c), 4).numpy()[away], sign_form[away], atol=1e-9)


def test_arcface_value_and_exact_derivative():
    s, m = 64.0, 0.5
    f, g = value_and_grad(M.ArcFace(scale=s, margin=m), INTERIOR, k=s)
    theta = np.arccos(INTERIOR)
    inside = INTERIOR > math.cos(math.pi - m)
    expected = np.where(inside, s * np.cos(theta + m), s * (INTERIOR - m * math.sin(math.pi - m)))
    np.testing.assert_allclose(f, expected, rtol=1e-10, atol=1e-9)
    exact = np.where(inside, s * (math.cos(m) + INTERIOR * math.sin(m) / np.sqrt(1 - INTERIOR**2)), s)
    np.testing.assert_allclose(g, exact, rtol=1e-9)


def test_combined_margin_value_and_derivative():
    s, m1, m2, m3 = 32.0, 1.35, 0.25, 0.1
    margin = M.CombinedMargin(scale=s, m1=m1, m2=m2, m3=m3)
    f, g = value_and_grad(margin, INTERIOR, k=s)
    theta = np.arccos(INTERIOR)
    inside = m1 * theta + m2 <= math.pi
    np.testing.assert_allclose(f[inside], s * (np.cos(m1 * theta[inside] + m2) - m3), rtol=1e-9, atol=1e-9)
    deriv = s * m1 * np.sin(m1 * theta + m2) / np.sin(theta)
    np.testing.assert_allclose(g[inside], deriv[inside], rtol=1e-8, atol=1e-8)
    # past the turning point the logit keeps decreasing with the angle
    assert np.all(np.diff(value_and_grad(margin, GRID, k=s)[0]) >= -1e-9)


def test_family_identities():
    c = tf.constant(INTERIOR)
    k = tf.fill(tf.shape(c), tf.constant(64.0, tf.float64))

    def f(margin):
        return margin.target_logit(c, k).numpy()

    np.testing.assert_allclose(f(M.CosFace()), f(M.AMSoftmax(scale=64.0, margin=0.4)))
    np.testing.assert_allclose(f(M.CombinedMargin(64.0, 1.0, 0.5, 0.0)), f(M.ArcFace(64.0, 0.5)))
    np.testing.assert_allclose(f(M.CombinedMargin(64.0, 1.0, 0.0, 0.35)), f(M.AMSoftmax(64.0, 0.35)), atol=1e-9)
    np.testing.assert_allclose(f(M.AMSoftmax(64.0, 0.35)), 64.0 * (INTERIOR - 0.35))
    np.testing.assert_allclose(f(M.Softmax()), 64.0 * INTERIOR)
    np.testing.assert_allclose(f(M.LSoftmax(margin=1)), 64.0 * INTERIOR)
    assert (M.CosFace().scale, M.CosFace().margin) == (64.0, 0.4)
    assert (M.AMSoftmax().scale, M.AMSoftmax().margin) == (30.0, 0.35)


def test_lambda_blend_and_schedule():
    sched = M.LambdaSchedule()  # SphereFace defaults
    assert (sched.base, sched.gamma, sched.power, sched.minimum) == (1000.0, 0.12, 1.0, 5.0)
    for t in [0, 1, 10, 1000, 10**6]:
        assert float(sched(t)) == pytest.approx(max(5.0, 1000.0 * (1 + 0.12 * t) ** -1.0), rel=1e-6)
    assert float(sched(10**6)) == 5.0
    c = INTERIOR
    plain, psi4 = 3.0 * c, 3.0 * psi_closed_form(c, 4)
    for lam in [0.0, 2.5]:
        f, _ = value_and_grad(M.ASoftmax(margin=4, lambda_=lam), c, k=3.0)
        np.testing.assert_allclose(f, (lam * plain + psi4) / (1 + lam), atol=1e-9)
    step = 50
    lam = max(5.0, 1000.0 / (1 + 0.12 * step))
    f, _ = value_and_grad(M.LSoftmax(margin=4, lambda_=(1000.0, 0.12, 1.0, 5.0)), c, k=3.0, step=step)
    np.testing.assert_allclose(f, (lam * plain + psi4) / (1 + lam), rtol=1e-6)


ALL = [
    M.Softmax(),
    M.NormFace(),
    M.NormFace(scale=8.0),
    M.LSoftmax(),
    M.ASoftmax(margin=3),
    M.AMSoftmax(),
    M.CosFace(),
    M.ArcFace(),
    M.CombinedMargin(m1=1.2, m2=0.3, m3=0.1),
    M.CombinedMargin(m1=0.9, m2=0.4),
]


@pytest.mark.parametrize("margin", ALL, ids=lambda m: repr(m))
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_gradients_finite_at_plus_minus_one(margin, dtype):
    f, g = value_and_grad(margin, [-1.0, 1.0, -0.9999999, 0.9999999], k=2.0, dtype=dtype)
    assert np.all(np.isfinite(f)) and np.all(np.isfinite(g)), (f, g)


def test_get_by_name_and_config_round_trip():
    for margin in ALL + [M.ASoftmax(lambda_=M.LambdaSchedule())]:
        assert M.from_config(margin.get_config()) == margin
    assert M.get("sphereface", margin=3) == M.ASoftmax(margin=3)
    assert M.get("ArcFace", scale=32.0).scale == 32.0
    with pytest.raises(ValueError, match="unknown margin 'arc'"):
        M.get("arc")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['m'\]"):
        M.get("arcface", m=0.5)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: M.LSoftmax(margin=2.5), "integer >= 1"),
        (lambda: M.ASoftmax(margin=0), "integer >= 1"),
        (lambda: M.ArcFace(scale=-1.0), "scale must be"),
        (lambda: M.AMSoftmax(margin=-0.1), "margin must be"),
        (lambda: M.CombinedMargin(m1=0.0), "m1 must be"),
        (lambda: M.LSoftmax(lambda_=-1.0), "lambda_ must be"),
        (lambda: M.NormFace(scale=float("nan")), "scale must be"),
    ],
)
def test_bad_parameters_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()
