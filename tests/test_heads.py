"""The heads that rewrite negatives: CurricularFace and inter-class filtering, against the papers'
formulas written out in NumPy float64 (independent of partitioned_fc's rule), their running
statistics, finite gradients at cos θ = ±1, configs. The model-parallel form is checked against
the dense reference at 1-3 workers in test_fc_distributed.py and test_fc_scale.py."""

import math

import numpy as np
import pytest
import tensorflow as tf

import partitioned_fc
from launch.config import ConfigError, from_dict
from partitioned_fc import margins as M


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _batch(seed=0, b=12, c=9, d=8):
    """Embeddings close to their label row and to one other row: hard negatives exist."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c, d))
    y = rng.integers(0, c, b)
    x = 0.8 * _unit(w[y]) + 0.6 * _unit(w[(y + 1) % c]) + 0.05 * rng.normal(size=(b, d))
    return x, y, w


def _ce(logits, y):
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float(np.mean(lse - logits[np.arange(len(y)), y]))


def curricular_numpy(x, y, w, s, m, t0, threshold=0.0):
    """CurricularFace as its paper's reference code computes it (cos clamped, t advanced with
    momentum 0.01 before use, hard = cos θ_j > cos(θ_y + m), ArcFace's fallback target), plus
    InsightFace's inter-class filtering (cos θ_j > threshold -> 0) where threshold > 0."""
    cos = np.clip(_unit(x) @ _unit(w).T, -1, 1)
    rows = np.arange(len(y))
    ct = cos[rows, y][:, None]
    cos_m = ct * math.cos(m) - np.sqrt(1 - ct**2) * math.sin(m)
    final = np.where(ct > math.cos(math.pi - m), cos_m, ct - math.sin(math.pi - m) * m)
    t = 0.01 * ct.mean() + 0.99 * t0
    out = np.where(cos > cos_m, cos * (t + cos), cos)
    if threshold > 0:
        out = np.where(cos > threshold, 0.0, out)
    out[rows, y] = final[:, 0]
    return _ce(s * out, y), t


def _dense(margin, x, y, w):
    xv, wv = tf.Variable(x), tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = partitioned_fc.dense_loss(xv, y, wv, margin)
    gx, gw = tape.gradient(loss, [xv, wv])
    return float(loss), gx.numpy(), gw.numpy()


def test_curricularface_is_the_papers_formula_and_advances_t_once_per_call():
    x, y, w = _batch()
    margin = M.CurricularFace(scale=64.0, margin=0.5)
    assert margin.state()["t"].numpy() == 0.0  # the paper's start
    t = 0.0
    for _ in range(3):
        want, t = curricular_numpy(x, y, w, 64.0, 0.5, t)
        got, _, _ = _dense(margin, x, y, w)
        assert got == pytest.approx(want, rel=1e-6)
        assert margin.state()["t"].numpy() == pytest.approx(t, rel=1e-6)
    # hard negatives exist in this batch, so the curriculum changed the loss
    assert got != pytest.approx(_dense(M.ArcFace(scale=64.0, margin=0.5), x, y, w)[0], rel=1e-3)


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_interclass_filtering_zeroes_dirty_negatives_and_their_push(threshold):
    x, y, w = _batch(seed=1)
    cos = _unit(x) @ _unit(w).T
    dirty = cos > threshold
    dirty[np.arange(len(y)), y] = False
    assert dirty.any() and not dirty.all()
    # AM-Softmax: s (cos − m) at the target; filtered negatives get logit 0
    s, m = 30.0, 0.35
    logits = s * np.where(dirty, 0.0, cos)
    logits[np.arange(len(y)), y] = s * (cos[np.arange(len(y)), y] - m)
    margin = M.AMSoftmax(scale=s, margin=m, interclass_filtering_threshold=threshold)
    got, _, gw = _dense(margin, x, y, w)
    assert got == pytest.approx(_ce(logits, y), rel=1e-9)
    # a class row that is a filtered negative for every sample and no sample's label gets no gradient
    for j in range(w.shape[0]):
        if j not in y and dirty[:, j].all():
            assert not np.any(gw[j])
    # CurricularFace with filtering: filtered wins over the curriculum
    want, _ = curricular_numpy(x, y, w, 32.0, 0.3, 0.25, threshold)
    cur = M.CurricularFace(scale=32.0, margin=0.3, interclass_filtering_threshold=threshold)
    cur.state()["t"].assign(0.25)
    assert _dense(cur, x, y, w)[0] == pytest.approx(want, rel=1e-6)


def test_layer_rule_gradient_matches_autodiff_of_the_dense_rule():
    """The kernels' hand-written df/dz (NegativeRule) equals autodiff of the same f(z)."""
    rule = M.NegativeRule(curricular=True, filter_above=0.7)
    k = tf.constant([64.0, 32.0], tf.float64)
    z = tf.constant(np.linspace(-0.95, 0.95, 20).reshape(2, 10), tf.float64) * k[:, None]
    ctx = M.NegativeContext(k, tf.constant([0.1, -0.2], tf.float64), tf.constant(0.3, tf.float64))
    with tf.GradientTape() as tape:
        tape.watch(z)
        f, d = rule(z, ctx)
    np.testing.assert_allclose(tape.gradient(f, z).numpy(), d.numpy(), rtol=1e-12)
    assert (d.numpy() == 0).any() and (d.numpy() == 1).any() and ((d.numpy() != 0) & (d.numpy() != 1)).any()


@pytest.mark.parametrize(
    "margin",
    [
        M.CurricularFace(),
        M.ArcFace(interclass_filtering_threshold=0.5),
        M.CurricularFace(interclass_filtering_threshold=0.2),
    ],
    ids=repr,
)
def test_finite_gradients_at_cos_plus_minus_one(margin):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 6))
    x = np.stack([w[0], -w[0], w[1], -w[2]])  # cos θ_y = 1, −1, and a negative at cos = −1
    y = np.array([0, 0, 1, 3])
    for v in margin.state().values():
        v.assign(0.5)
    loss, gx, gw = _dense(margin, x, y, w)
    assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gw).all()


def test_layer_and_state_in_graph_and_config():
    """The layer in a tf.function advances t once per call; pfc configs name the heads."""
    import cluster

    x, y, w = _batch(seed=2)
    fc = partitioned_fc.PartitionedFC(9, 8, M.CurricularFace(), cluster.init("local"), seed=0)
    step = tf.function(lambda a, b: fc(a, b))
    step(tf.constant(x, tf.float32), y)
    t1 = float(fc.margin.state()["t"].numpy())
    step(tf.constant(x, tf.float32), y)
    # the same batch and weights: t1 = 0.01 · mean cos θ_y, then t2 = 0.01 · mean + 0.99 · t1
    assert t1 != 0 and float(fc.margin.state()["t"].numpy()) == pytest.approx(1.99 * t1, rel=1e-5)
    assert M.get("curricularface", margin=0.4) == M.CurricularFace(margin=0.4)
    assert M.from_config(M.CurricularFace(interclass_filtering_threshold=0.3).get_config()) == M.CurricularFace(
        interclass_filtering_threshold=0.3
    )
    raw = {
        "data": {"train": "data/synth", "num_classes": 10},
        "train": {"steps": 10},
        "loss": {"name": "curricularface", "interclass_filtering_threshold": 0.4},
    }
    assert from_dict(raw).loss.margin() == M.CurricularFace(interclass_filtering_threshold=0.4)
    with pytest.raises(ConfigError, match="interclass_filtering_threshold"):
        from_dict({**raw, "loss": {"name": "arcface", "interclass_filtering_threshold": 1.5}})
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        M.NormFace(scale=8.0, interclass_filtering_threshold=-0.1)


def _scaled_batch(seed=4, b=16, c=9, d=8):
    """Embeddings of varied norms (image quality), near their label rows."""
    x, y, w = _batch(seed, b, c, d)
    norms = np.random.default_rng(seed).uniform(2.0, 30.0, (b, 1))
    return x * norms / np.linalg.norm(x, axis=1, keepdims=True), y, w


def adaface_numpy(x, y, w, s, m, h, mean0, std0):
    """AdaFace as its paper's reference code computes the target (t_alpha 0.01, unbiased std,
    norms clipped to [0.001, 100], cos clamped by eps = 1e-3, θ_m clipped to [eps, π − eps])."""
    eps, rows = 1e-3, np.arange(len(y))
    cos = _unit(x) @ _unit(w).T
    norms = np.clip(np.linalg.norm(x, axis=1), 0.001, 100)
    mean = 0.01 * norms.mean() + 0.99 * mean0
    std = 0.01 * norms.std(ddof=1) + 0.99 * std0
    z = np.clip((norms - mean) / (std + eps) * h, -1, 1)
    theta = np.arccos(np.clip(cos[rows, y], -1 + eps, 1 - eps))
    logits = s * cos
    logits[rows, y] = s * (np.cos(np.clip(theta - m * z, eps, np.pi - eps)) - (m + m * z))
    return _ce(logits, y), mean, std


def magface_numpy(x, y, w, s, l_a, u_a, l_m, u_m, lambda_g):
    """MagFace's loss (its reference code: cross-entropy + λ_g · mean g(a), non-easy margin)."""
    rows = np.arange(len(y))
    cos = np.clip(_unit(x) @ _unit(w).T, -1, 1)
    a = np.clip(np.linalg.norm(x, axis=1), l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    c = cos[rows, y]
    cos_m = c * np.cos(m) - np.sqrt(1 - c**2) * np.sin(m)
    logits = s * cos
    logits[rows, y] = s * np.where(c > np.cos(np.pi - m), cos_m, c - np.sin(np.pi - m) * m)
    return _ce(logits, y) + lambda_g * float(np.mean(a / u_a**2 + 1 / a))


def test_adaface_is_the_papers_formula_and_advances_its_statistics():
    x, y, w = _scaled_batch()
    margin = M.AdaFace(scale=64.0, margin=0.4, h=0.333)
    assert {k: float(v.numpy()) for k, v in margin.state().items()} == {"batch_mean": 20.0, "batch_std": 100.0}
    mean, std = 20.0, 100.0
    for _ in range(2):
        want, mean, std = adaface_numpy(x, y, w, 64.0, 0.4, 0.333, mean, std)
        assert _dense(margin, x, y, w)[0] == pytest.approx(want, rel=1e-6)
    assert float(margin.state()["batch_mean"].numpy()) == pytest.approx(mean, rel=1e-6)
    assert float(margin.state()["batch_std"].numpy()) == pytest.approx(std, rel=1e-6)
    # not saturated statistics: ẑ spans both signs, so both margin forms are exercised
    margin.state()["batch_mean"].assign(15.0)
    margin.state()["batch_std"].assign(8.0)
    want, _, _ = adaface_numpy(x, y, w, 64.0, 0.4, 0.333, 15.0, 8.0)
    assert _dense(margin, x, y, w)[0] == pytest.approx(want, rel=1e-6)


def test_magface_is_the_papers_loss_and_its_gradient_reaches_the_magnitude():
    x, y, w = _scaled_batch(seed=5)
    margin = M.MagFace(scale=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0)
    loss, gx, _ = _dense(margin, x, y, w)
    assert loss == pytest.approx(magface_numpy(x, y, w, 64.0, 10.0, 110.0, 0.45, 0.8, 35.0), rel=1e-9)
    radial = np.sum(gx * _unit(x), axis=1)  # the magnitude's share of the gradient
    inside = (np.linalg.norm(x, axis=1) > 10.0) & (np.linalg.norm(x, axis=1) < 110.0)
    assert inside.any() and np.all(np.abs(radial[inside]) > 1e-6)
    np.testing.assert_allclose(radial[~inside], 0.0, atol=1e-12)  # a clipped magnitude: no pull


@pytest.mark.parametrize("margin", [M.AdaFace(), M.MagFace(), M.MagFace(interclass_filtering_threshold=0.3)], ids=repr)
def test_quality_heads_are_finite_at_cos_plus_minus_one(margin):
    rng = np.random.default_rng(6)
    w = rng.normal(size=(5, 6))
    x = np.stack([w[0], -w[0], 20 * w[1] / np.linalg.norm(w[1]), -w[2]])
    loss, gx, gw = _dense(margin, x, np.array([0, 0, 1, 3]), w)
    assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gw).all()


def test_quality_heads_by_name_and_bad_parameters():
    assert M.get("adaface", h=0.5) == M.AdaFace(h=0.5)
    assert M.from_config(M.MagFace(lambda_g=20.0).get_config()) == M.MagFace(lambda_g=20.0)
    with pytest.raises(ValueError, match="l_a < u_a"):
        M.MagFace(l_a=120.0)
    with pytest.raises(ValueError, match="h must be"):
        M.AdaFace(h=-1.0)
    with pytest.raises(ValueError, match="batch's feature norms"):
        M.AdaFace().target_logit(tf.constant([0.5]), tf.constant([64.0]))


# --- Sub-center ArcFace ------------------------------------------------------------------------
def subcenter_numpy(x, y, w, s, m, k):
    """Sub-center ArcFace as its paper writes it: W has k·C rows (class j: rows k·j .. k·j+k−1),
    cos θ_j = max over the class's sub-centers, ArcFace's s cos(θ_y + m) at the label (with its
    continuation past π)."""
    cos = np.clip(_unit(x) @ _unit(w).T, -1, 1).reshape(len(x), -1, k).max(axis=2)
    rows = np.arange(len(y))
    ct = cos[rows, y]
    target = np.where(ct > math.cos(math.pi - m), np.cos(np.arccos(ct) + m), ct - m * math.sin(math.pi - m))
    logits = s * cos
    logits[rows, y] = s * target
    return _ce(logits, y)


def test_subcenter_arcface_is_the_papers_formula_and_only_the_nearest_sub_center_learns():
    x, y, _ = _batch(seed=7, c=6)
    rng = np.random.default_rng(8)
    w = rng.normal(size=(3 * 6, x.shape[1]))
    margin = M.SubCenterArcFace(scale=64.0, margin=0.5, k=3)
    loss, gx, gw = _dense(margin, x, y, w)
    assert loss == pytest.approx(subcenter_numpy(x, y, w, 64.0, 0.5, 3), rel=1e-9)
    # each sample pulls (or pushes) only the nearest sub-center of each class: a row that is no
    # sample's nearest of its class gets no gradient
    cos = _unit(x) @ _unit(w).T
    nearest = cos.reshape(len(x), 6, 3).argmax(axis=2) + 3 * np.arange(6)
    unused = np.setdiff1d(np.arange(18), nearest)
    assert unused.size and not np.any(gw[unused])
    assert np.all(np.linalg.norm(gw[np.unique(nearest)], axis=1) > 0)
    # finite at cos θ = ±1 (a sample on a sub-center, and opposite one)
    x1 = np.stack([w[4], -w[4], w[0]])
    loss1, gx1, gw1 = _dense(margin, x1, np.array([1, 1, 0]), w)
    assert np.isfinite(loss1) and np.isfinite(gx1).all() and np.isfinite(gw1).all()
    # k = 1 is ArcFace
    one = _dense(M.SubCenterArcFace(scale=64.0, margin=0.5, k=1), x, y, w[:6])
    np.testing.assert_allclose(one[0], _dense(M.ArcFace(scale=64.0, margin=0.5), x, y, w[:6])[0], rtol=1e-12)


def test_subcenter_layer_weight_and_names():
    import cluster

    fc = partitioned_fc.PartitionedFC(7, 4, M.SubCenterArcFace(k=3), cluster.init("local"))
    assert fc.weight.shape == (21, 4) and fc.row_range == (0, 21) and fc.num_local_classes == 7
    from partitioned_fc.sharding import full_matrix

    np.testing.assert_array_equal(fc.weight.numpy(), full_matrix(21, 4, seed=0).numpy())
    assert M.get("subcenter", k=2) == M.SubCenterArcFace(k=2)
    assert M.from_config(M.SubCenterArcFace(k=4, margin=0.3).get_config()) == M.SubCenterArcFace(k=4, margin=0.3)
    with pytest.raises(ValueError, match="k \\(sub-centers per class\\) must be an integer >= 1"):
        M.SubCenterArcFace(k=0)


# --- SphereFace2 -------------------------------------------------------------------------------
def _softplus(f):
    return np.logaddexp(0.0, f)


def sphereface2_numpy(x, y, w, b, r=40.0, m=0.4, lam=0.7, t=3.0, lw=50.0, threshold=0.0):
    """SphereFace2-C (the paper's eq. with g(z) = 2((z + 1)/2)^t − 1), times the loss weight;
    mean over the batch."""
    cos = _unit(x) @ _unit(w).T
    g = 2.0 * ((cos + 1.0) / 2.0) ** t - 1.0
    rows = np.arange(len(y))
    pos = lam / r * _softplus(-(r * (g[rows, y] - m) + b))
    neg_terms = (1.0 - lam) / r * _softplus(r * (g + m) + b)
    if threshold > 0:
        neg_terms = np.where(cos > threshold, 0.0, neg_terms)
    neg_terms[rows, y] = 0.0
    return float(np.mean(lw * (pos + neg_terms.sum(axis=1))))


def _dense_b(margin, x, y, w):
    xv, wv = tf.Variable(x), tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = partitioned_fc.dense_loss(xv, y, wv, margin)
    gx, gw, gb = tape.gradient(loss, [xv, wv, margin.bias])
    return float(loss), gx.numpy(), gw.numpy(), float(gb)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"scale": 16.0, "margin": 0.2, "lam": 0.6, "t": 2.0, "loss_weight": 1.0, "interclass_filtering_threshold": 0.4},
    ],
    ids=["paper", "other"],
)
def test_sphereface2_is_the_papers_loss_with_exact_gradients(params):
    x, y, w = _batch(seed=9)
    margin = M.SphereFace2(**params)
    margin.bias.assign(-2.0)
    kw = {"r": "scale", "m": "margin", "lam": "lam", "t": "t", "lw": "loss_weight"}
    np_kw = {k: params[v] for k, v in kw.items() if v in params}
    np_kw["threshold"] = params.get("interclass_filtering_threshold", 0.0)
    loss, gx, gw, gb = _dense_b(margin, x, y, w)
    assert loss == pytest.approx(sphereface2_numpy(x, y, w, -2.0, **np_kw), rel=1e-9)
    # gradients by central differences of the NumPy formula (float64)
    rng = np.random.default_rng(1)
    for arr, grad in ((x, gx), (w, gw)):
        for _ in range(4):
            i = tuple(rng.integers(0, n) for n in arr.shape)
            h = 1e-6
            arr[i] += h
            up = sphereface2_numpy(x, y, w, -2.0, **np_kw)
            arr[i] -= 2 * h
            down = sphereface2_numpy(x, y, w, -2.0, **np_kw)
            arr[i] += h
            assert grad[i] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-9)
    h = 1e-6
    fd = (sphereface2_numpy(x, y, w, -2.0 + h, **np_kw) - sphereface2_numpy(x, y, w, -2.0 - h, **np_kw)) / (2 * h)
    assert gb == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("num_classes", [2, 1000, 2_000_000])
def test_sphereface2_bias_starts_where_the_gradients_balance(num_classes):
    """At cos θ = 0 everywhere, the start b makes λ σ(−f_y) = (1 − λ)(C − 1) σ(f_j): the positive's
    pull equals the C − 1 negatives' push (the paper's initialization)."""
    margin = M.SphereFace2()
    b = margin.initial_bias(num_classes)
    g0 = 2 * 0.5**3 - 1
    f_pos, f_neg = 40 * (g0 - 0.4) + b, 40 * (g0 + 0.4) + b
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert 0.7 * sig(-f_pos) == pytest.approx(0.3 * (num_classes - 1) * sig(f_neg), rel=1e-9)
    import cluster

    partitioned_fc.PartitionedFC(num_classes if num_classes < 10**6 else 7, 4, margin, cluster.init("local"))
    assert float(margin.bias.numpy()) == pytest.approx(margin.initial_bias(num_classes if num_classes < 10**6 else 7))


def test_sphereface2_finite_at_cos_plus_minus_one_and_bad_parameters():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(5, 6))
    x = np.stack([w[0], -w[0], w[1], -w[2]])
    loss, gx, gw, gb = _dense_b(M.SphereFace2(), x, np.array([0, 0, 1, 3]), w)
    assert np.isfinite([loss, gb]).all() and np.isfinite(gx).all() and np.isfinite(gw).all()
    assert M.get("sphereface2", lam=0.5) == M.SphereFace2(lam=0.5)
    assert M.from_config(M.SphereFace2(t=2.0).get_config()) == M.SphereFace2(t=2.0)
    with pytest.raises(ValueError, match="lam must be in \\(0, 1\\)"):
        M.SphereFace2(lam=1.0)
    with pytest.raises(ValueError, match="t must be a finite number >= 1"):
        M.SphereFace2(t=0.5)
    with pytest.raises(TypeError, match="binary loss"):
        M.SphereFace2().target_logit(tf.constant([0.5]), tf.constant([1.0]))
