"""PartitionedFC in the single-process cluster: contract, bad input, numerics, sharding."""

import numpy as np
import pytest
import tensorflow as tf

import cluster
import partitioned_fc
from partitioned_fc import margins as M
from partitioned_fc import optimizer as shard_opt
from partitioned_fc.sharding import all_shard_ranges, full_matrix, owner_of, shard_range

C, D = 23, 8


def make(margin=None, **kw):
    return partitioned_fc.PartitionedFC(
        num_classes=C, embedding_dim=D, margin=margin or M.ArcFace(), cluster=cluster.init(), **kw
    )


def batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.normal(size=(b, D)).astype(np.float32)), tf.constant(rng.integers(0, C, b)))


def test_contract_attributes():
    fc = make()
    assert fc.class_range == (0, C)
    assert isinstance(fc.weight, tf.Variable) and fc.weight.shape == (C, D)
    assert fc.weight in fc.trainable_variables
    np.testing.assert_array_equal(fc.weight.numpy(), full_matrix(C, D, seed=0).numpy())
    std = full_matrix(4000, 64, seed=1).numpy().std()
    assert 0.0095 < std < 0.0105  # N(0, 0.01)


@pytest.mark.parametrize("num_classes, n", [(10, 3), (37, 2), (37, 3), (7, 7), (100003, 8)])
def test_shard_split_formula(num_classes, n):
    ranges = all_shard_ranges(num_classes, n)
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    for r, (start, end) in enumerate(ranges):
        base, rem = divmod(num_classes, n)
        assert end - start == base + (r < rem)
        assert start == r * base + min(r, rem)
        if r:
            assert start == ranges[r - 1][1]
        assert owner_of(start, num_classes, n) == r and owner_of(end - 1, num_classes, n) == r


def test_shard_split_errors():
    with pytest.raises(ValueError, match="smaller than the world size"):
        shard_range(2, 3, 0)
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 3"):
        shard_range(10, 3, 3)


def test_label_dtypes_and_graph_mode_agree():
    fc = make()
    x, y = batch()
    eager = fc(x, y).numpy()
    assert fc(x, tf.cast(y, tf.int32)).numpy() == eager
    assert tf.function(lambda a, b: fc(a, b))(x, y).numpy() == pytest.approx(eager, rel=1e-6)


@pytest.mark.parametrize(
    "bad, match", [(-1, "label -1 at local batch position 2"), (C, f"label {C} at local batch position 2 is outside")]
)
def test_out_of_range_labels_are_named(bad, match):
    fc = make()
    x, y = batch()
    y = tf.tensor_scatter_nd_update(y, [[2]], tf.constant([bad], y.dtype))
    with pytest.raises(ValueError, match=match):
        fc(x, y)
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"offending values:.*{bad}"):
        tf.function(lambda a, b: fc(a, b))(x, y)


def test_other_bad_inputs():
    fc = make()
    x, y = batch()
    with pytest.raises(TypeError, match="labels must be int32 or int64.*float32"):
        fc(x, tf.cast(y, tf.float32))
    with pytest.raises(ValueError, match=rf"shape \[batch, {D}\], got \(6, 5\)"):
        fc(x[:, :5], y)
    with pytest.raises(ValueError, match="6 rows but labels have 5"):
        fc(x, y[:5])
    with pytest.raises(TypeError, match="embeddings must be a float tensor"):
        fc(tf.cast(x, tf.int32), y)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        partitioned_fc.PartitionedFC(0, D)


@pytest.mark.parametrize(
    "margin",
    [
        M.Softmax(),
        M.NormFace(),
        M.LSoftmax(),
        M.ASoftmax(),
        M.AMSoftmax(),
        M.ArcFace(),
        M.CombinedMargin(m1=1.3, m2=0.2),
    ],
    ids=lambda m: m.name,
)
def test_gradients_finite_when_embeddings_are_class_rows(margin):
    fc = make(margin)
    y = tf.constant([0, 1, 2, 3])
    rows = tf.gather(fc.weight, y)
    x = tf.concat([rows[:2] * 3.0, -rows[2:] * 3.0], axis=0)  # cos θ_y = +1 and -1 exactly
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = fc(x, y)
    gx, gw = tape.gradient(loss, [x, fc.weight])
    assert np.isfinite(loss.numpy())
    assert np.all(np.isfinite(gx.numpy())) and np.all(np.isfinite(gw.numpy()))


@pytest.mark.parametrize("margin", [M.CosFace(scale=64.0), M.ArcFace(scale=64.0), M.LSoftmax()], ids=lambda m: m.name)
def test_large_logits_are_stable(margin):
    """Logits of hundreds (s=64; unnormalized L-Softmax with long vectors) overflow a naive exp."""
    fc = make(margin)
    x, y = batch(8, seed=3)
    fc.weight.assign(fc.weight * 3000.0)
    x = x * 30.0
    loss = fc(x, y)
    ref = partitioned_fc.dense_loss(tf.cast(x, tf.float64), y, tf.cast(fc.weight, tf.float64), margin)
    assert np.isfinite(loss.numpy())
    assert loss.numpy() == pytest.approx(ref.numpy(), rel=1e-5)


def test_accuracy_flag_and_step_driven_lambda():
    fc = make(M.ASoftmax(lambda_=M.LambdaSchedule()))
    x, y = batch()
    loss0 = fc(x, y).numpy()
    fc.step.assign(10_000)
    loss_late = fc(x, y).numpy()
    assert loss_late > loss0  # λ falls from 1000 to 5: the margin bites
    assert fc(x, y, step=0).numpy() == pytest.approx(loss0)
    x_right = tf.gather(fc.weight, y)
    loss, acc = fc(x_right, y, return_accuracy=True)
    assert acc.numpy() == 1.0 and loss.shape == ()


def test_get_config_round_trip():
    fc = make(M.CombinedMargin(scale=30.0, m1=1.1, m2=0.3, m3=0.05), seed=5)
    clone = partitioned_fc.PartitionedFC.from_config(fc.get_config(), cluster=cluster.init())
    assert clone.get_config() == fc.get_config()
    np.testing.assert_array_equal(clone.weight.numpy(), fc.weight.numpy())


def test_partial_fc_rate_one_is_the_full_layer_bit_for_bit():
    x, y = batch()
    full, sampled = make(), make(sample_rate=1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = full(x, y), sampled(x, y)
    assert a.numpy() == b.numpy()
    np.testing.assert_array_equal(tape.gradient(a, full.weight).numpy(), tape.gradient(b, sampled.weight).numpy())
    np.testing.assert_array_equal(tape.gradient(a, x).numpy(), tape.gradient(b, x).numpy())


def test_partial_fc_keeps_positives_and_is_seeded():
    x, y = batch(12, seed=4)
    # 12 labels but only int(0.05 * 23) = 1 sample slot: the positives alone are kept
    fc = make(sample_rate=0.05)
    fc(x, y)
    np.testing.assert_array_equal(fc.sampled_index.numpy(), np.unique(y.numpy()))
    a, b = make(sample_rate=0.5, seed=7), make(sample_rate=0.5, seed=7)
    runs = []
    for layer in (a, b):
        seq = []
        for _ in range(3):
            layer(x[:2], y[:2])
            seq.append(layer.sampled_index.numpy())
        runs.append(seq)
    for ia, ib in zip(*runs):
        np.testing.assert_array_equal(ia, ib)
        assert len(ia) == int(0.5 * C) and set(y.numpy()[:2]) <= set(ia)
    assert any(len(set(runs[0][0]) ^ set(s)) for s in runs[0][1:])  # negatives change per call


def test_partial_fc_gradient_is_sparse():
    fc = make(sample_rate=0.25)
    x, y = batch()
    with tf.GradientTape() as tape:
        loss = fc(x, y)
    g = tape.gradient(loss, fc.weight)
    assert isinstance(g, tf.IndexedSlices)
    np.testing.assert_array_equal(np.sort(g.indices.numpy()), fc.sampled_index.numpy())


@pytest.mark.parametrize("by_draws", [True, False], ids=["draws", "scores"])
def test_negative_sampler_draws_every_subset_of_negatives_equally_often(by_draws):
    """3 of the 7 negatives of 9 classes: each of the 35 subsets as often as the others
    (chi-square, p = 0.001), never a positive, never a repeat."""
    rows, positives, want, n = 9, tf.constant([2, 8]), tf.constant(3), 7000
    gen = tf.random.Generator.from_seed(3)
    draw = tf.function(lambda: partitioned_fc.layer.sample_negatives(gen, rows, positives, want, by_draws))
    counts: dict[tuple, int] = {}
    for _ in range(n):
        neg = tuple(sorted(draw().numpy().tolist()))
        assert len(set(neg)) == 3 and not set(neg) & {2, 8} and 0 <= min(neg) and max(neg) < rows, neg
        counts[neg] = counts.get(neg, 0) + 1
    assert len(counts) == 35
    expected = n / 35
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 65.2, (chi2, counts)  # 34 degrees of freedom


def test_negative_sampler_falls_back_when_draws_repeat_too_much():
    # 2064 draws over 1000 classes leave ~127 unseen: all 1000 come from the per-class scores
    gen = tf.random.Generator.from_seed(0)
    neg = partitioned_fc.layer.sample_negatives(gen, 1000, tf.zeros([0], tf.int32), tf.constant(1000), True)
    np.testing.assert_array_equal(np.sort(neg.numpy()), np.arange(1000))


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, "0.1"])
def test_bad_sample_rate(rate):
    with pytest.raises(ValueError, match="sample_rate must be in \\(0, 1\\]"):
        make(sample_rate=rate)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size must be None or a positive integer"),
        ({"chunk_size": 2.5}, "chunk_size must be None or a positive integer"),
        ({"compute_dtype": "float64"}, "compute_dtype must be one of"),
        ({"param_dtype": "int8"}, "param_dtype must be one of"),
    ],
)
def test_bad_chunk_and_dtype_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partitioned_fc.PartitionedFC(C, D, cluster=cluster.init("local"), **kwargs)


@pytest.mark.parametrize("margin", [M.CosFace(scale=64.0), M.ArcFace(scale=64.0), M.LSoftmax()], ids=lambda m: m.name)
def test_chunked_large_logits_are_stable(margin):
    """The streaming logsumexp rescales each block's sum to the running max: no overflow."""
    fc = partitioned_fc.PartitionedFC(C, D, margin, cluster.init("local"), seed=5, chunk_size=3)
    x, y = batch(8, seed=3)
    fc.weight.assign(fc.weight * 3000.0)
    x = x * 30.0
    ref = partitioned_fc.dense_loss(tf.cast(x, tf.float64), y, tf.cast(fc.weight, tf.float64), margin)
    assert fc(x, y).numpy() == pytest.approx(ref.numpy(), rel=1e-5)


def test_shard_optimizer_sums_duplicate_rows_and_checks_arguments():
    w = tf.Variable(tf.ones([4, 2]))
    opt = shard_opt.SGD(w, momentum=0.0)
    grad = tf.IndexedSlices(tf.constant([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]), tf.constant([3, 1, 3]))
    opt.apply_gradient(grad, 0.5)
    np.testing.assert_array_equal(w.numpy(), [[1, 1], [0, 0], [1, 1], [-1.5, -1.5]])
    assert opt.state() == {}
    with pytest.raises(ValueError, match="momentum must be in"):
        shard_opt.SGD(w, momentum=1.0)
    with pytest.raises(ValueError, match="beta_2 must be in"):
        shard_opt.AdamW(w, beta_2=1.5)
    with pytest.raises(ValueError, match="unknown shard optimizer 'lamb'"):
        shard_opt.get("lamb", w)
    fc = make(M.Softmax())
    with pytest.raises(ValueError, match="built for another layer"):
        fc.train_step(*batch(), opt, 0.1)
