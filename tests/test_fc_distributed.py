"""PartitionedFC at world sizes 1, 2, 3 (real horovodrun on localhost) vs the dense reference."""

import numpy as np
import pytest
import tensorflow as tf
from cases import (
    GRAPH_MARGINS,
    LEARNED,
    LOCAL_BATCH,
    MARGINS,
    SAMPLE_RATE,
    SAMPLED_MARGINS,
    STATE_START,
    STEP,
    class_counts,
    class_rows,
    global_batch,
    reset_state,
    row_range,
)
from helpers import horovodrun

import partitioned_fc
from partitioned_fc.sharding import all_shard_ranges, full_matrix

pytestmark = pytest.mark.slow  # every test reads the results of horovodrun workers

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def dense(num_classes, name, world_size, classes=None):
    """Dense reference; with `classes` (sorted class ids) restricted to those rows, labels remapped."""
    inputs, labels, backbone = global_batch(num_classes, world_size)
    g = MARGINS[name].rows_per_class
    w = full_matrix(g * num_classes, backbone.shape[1], seed=11)
    if classes is not None:
        w = tf.gather(w, class_rows(classes, g))
        assert np.isin(labels, classes).all(), "a positive class was not sampled"
        labels = np.searchsorted(classes, labels)
    w = tf.Variable(w)
    a = tf.Variable(backbone)
    x_in = tf.constant(inputs)
    reset_state(MARGINS[name])
    with tf.GradientTape() as tape:
        tape.watch(x_in)
        loss, acc = partitioned_fc.dense_loss(
            tf.matmul(x_in, a), labels, w, MARGINS[name], step=STEP, return_accuracy=True
        )
    learned = [MARGINS[name].bias] if MARGINS[name].binary else []
    gx, gw, ga, *gb = tape.gradient(loss, [x_in, w, a, *learned])
    gb = gb[0] if gb else tf.constant(0.0)
    return {
        "gb": gb.numpy(),
        "loss": loss.numpy(),
        "acc": acc.numpy(),
        "gx": gx.numpy(),
        "gw": gw.numpy(),
        "ga": ga.numpy(),
        "w": w.numpy(),
        "state": {k: v.numpy() for k, v in MARGINS[name].state().items()},
    }


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"np{n}")
def worker_results(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"fc_np{n}")
    horovodrun(n, "tests/workers/fc_worker.py", str(out))
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]
    assert all(int(r["world_size"]) == n for r in ranks)
    return n, ranks


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_matches_dense_reference(worker_results, name):
    n, ranks = worker_results
    for num_classes in class_counts(n):
        ref = dense(num_classes, name, n)
        key = f"{num_classes}/{name}"
        ranges = all_shard_ranges(num_classes, n)
        tags = ["loss", "acc", "gx", "gw", "ga", "gb"]
        variants = [""] + (["graph_"] if name in GRAPH_MARGINS else [])
        for r, res in enumerate(ranks):
            assert tuple(res[key + "/range"]) == ranges[r]
            start, end = row_range(ranges[r], MARGINS[name].rows_per_class)
            # the shard is the same rows of the same matrix at every world size
            np.testing.assert_array_equal(res[key + "/w0"], ref["w"][start:end])
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            for v in variants:
                got = {t: res[f"{key}/{v}{t}"] for t in tags}
                where = f"{key} rank {r}/{n} {v or 'eager'}"
                assert abs(got["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), where
                assert got["acc"] == pytest.approx(ref["acc"]), where
                assert rel(got["gx"], ref["gx"][rows]) <= GRAD_RTOL, where
                assert rel(got["gw"], ref["gw"][start:end]) <= GRAD_RTOL, where
                # a replicated learned scalar (SphereFace2's bias): its whole gradient on every worker
                assert got["gb"] == pytest.approx(ref["gb"], rel=GRAD_RTOL, abs=1e-12), where
        # the loss is identical on every worker, and so are the running statistics (advanced once,
        # as the reference advanced them)
        assert len({float(res[key + "/loss"]) for res in ranks}) == 1
        for stat, want in ref["state"].items():
            if stat not in LEARNED:  # a forward advances running statistics, not learned state
                assert want != pytest.approx(STATE_START[stat]), f"{key}: {stat} did not move"
            for res in ranks:
                assert res[f"{key}/state/{stat}"] == ranks[0][f"{key}/state/{stat}"], key
                assert res[f"{key}/state/{stat}"] == pytest.approx(want, rel=1e-6), key
        # backbone convention: the SUM over workers of the replicated backbone's gradients is the
        # single-device gradient of the global mean loss.
        ga = sum(res[key + "/ga"] for res in ranks)
        assert rel(ga, ref["ga"]) <= GRAD_RTOL, key


def test_accuracy_is_argmax_over_all_shards(worker_results):
    n, ranks = worker_results
    for num_classes in class_counts(n):
        for res in ranks:
            expected = float(res[f"{num_classes}/acc_half_expected"])
            assert 0.0 < expected < 1.0
            assert float(res[f"{num_classes}/acc_half"]) == pytest.approx(expected)


@pytest.mark.parametrize("name", SAMPLED_MARGINS)
def test_partial_fc_matches_dense_reference_on_sampled_classes(worker_results, name):
    n, ranks = worker_results
    for num_classes in class_counts(n):
        key = f"{num_classes}/sampled_{name}"
        g = MARGINS[name].rows_per_class
        ranges = all_shard_ranges(num_classes, n)
        sampled = [g * ranges[r][0] + res[key + "/index"] for r, res in enumerate(ranks)]  # rows
        classes = np.concatenate([rows[::g] // g for rows in sampled])
        assert np.all(np.diff(classes) > 0)
        np.testing.assert_array_equal(np.concatenate(sampled), class_rows(classes, g))  # whole classes
        inputs, labels, _ = global_batch(num_classes, n)
        for r, (start, end) in enumerate(ranges):
            owned_pos = np.unique(labels[(labels >= start) & (labels < end)])
            assert len(sampled[r]) == g * max(len(owned_pos), max(1, int(SAMPLE_RATE * (end - start))))
        ref = dense(num_classes, name, n, classes)
        pos = 0
        for r, res in enumerate(ranks):
            start, end = row_range(ranges[r], g)
            k = len(sampled[r])
            where = f"{key} rank {r}/{n}"
            assert abs(res[key + "/loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), where
            assert res[key + "/acc"] == pytest.approx(ref["acc"]), where
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            assert rel(res[key + "/gx"], ref["gx"][rows]) <= GRAD_RTOL, where
            assert res[key + "/gb"] == pytest.approx(ref["gb"], rel=GRAD_RTOL, abs=1e-12), where
            gw = res[key + "/gw"]
            assert rel(gw[sampled[r] - start], ref["gw"][pos : pos + k]) <= GRAD_RTOL, where
            untouched = np.setdiff1d(np.arange(end - start), sampled[r] - start)
            assert not np.any(gw[untouched]), where  # unsampled rows get exactly no gradient
            pos += k
        ga = sum(res[key + "/ga"] for res in ranks)
        assert rel(ga, ref["ga"]) <= GRAD_RTOL, key
