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
    cos_m = ct * math.cos(m) - np.sqrt(1 - ct ** 2) * math.sin(m)
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


@pytest.mark.parametrize("margin", [M.CurricularFace(), M.ArcFace(interclass_filtering_threshold=0.5),
                                    M.CurricularFace(interclass_filtering_threshold=0.2)], ids=repr)
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
    assert M.from_config(M.CurricularFace(interclass_filtering_threshold=0.3).get_config()) == \
        M.CurricularFace(interclass_filtering_threshold=0.3)
    raw = {"data": {"train": "data/synth", "num_classes": 10}, "train": {"steps": 10},
           "loss": {"name": "curricularface", "interclass_filtering_threshold": 0.4}}
    assert from_dict(raw).loss.margin() == M.CurricularFace(interclass_filtering_threshold=0.4)
    with pytest.raises(ConfigError, match="interclass_filtering_threshold"):
        from_dict({**raw, "loss": {"name": "arcface", "interclass_filtering_threshold": 1.5}})
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        M.NormFace(scale=8.0, interclass_filtering_threshold=-0.1)
