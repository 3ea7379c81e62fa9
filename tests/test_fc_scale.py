"""Chunked logits, the fused train step with sparse shard optimizers, and 16-bit storage, at world
sizes 1, 2, 3 (real horovodrun) against a dense single-device reference."""

import numpy as np
import pytest
import tensorflow as tf
from cases import (
    LOCAL_BATCH,
    MARGINS,
    STEP,
    TAPE_CHUNK_MARGINS,
    TRAIN_CASES,
    class_counts,
    class_rows,
    global_batch,
    reset_state,
    row_range,
    train_class_counts,
)
from helpers import horovodrun
from test_fc_distributed import GRAD_RTOL, LOSS_RTOL, dense, rel

import partitioned_fc
from partitioned_fc.sharding import all_shard_ranges, full_matrix

pytestmark = pytest.mark.slow  # every test reads the results of horovodrun workers

LR = 0.5  # as in workers/scale_worker.py


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"np{n}")
def scale_results(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"scale_np{n}")
    horovodrun(n, "tests/workers/scale_worker.py", str(out))
    return n, [dict(np.load(out / f"rank{r}.npz")) for r in range(n)]


@pytest.mark.parametrize("name", TAPE_CHUNK_MARGINS)
def test_chunked_tape_matches_dense(scale_results, name):
    n, ranks = scale_results
    for num_classes in class_counts(n):
        ref = dense(num_classes, name, n)
        for r, classes in enumerate(all_shard_ranges(num_classes, n)):
            start, end = row_range(classes, MARGINS[name].rows_per_class)
            rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
            for chunk in (1, 3):
                key = f"{num_classes}/tape/{name}/{chunk}"
                where = f"{key} rank {r}/{n}"
                loss = ranks[r][key + "/loss"]
                assert abs(loss - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), where
                assert ranks[r][key + "/acc"] == pytest.approx(ref["acc"]), where
                assert rel(ranks[r][key + "/gw"], ref["gw"][start:end]) <= GRAD_RTOL, where
                # gx is w.r.t. the linear backbone's inputs here: dense() differentiates the same.
                assert rel(ranks[r][key + "/gx"], ref["gx"][rows]) <= GRAD_RTOL, where


def _sgd(w, g, state, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
    g = g + weight_decay * w
    m = momentum * state["momentum"] + g
    return w - lr * (g + momentum * m if nesterov else m), {"momentum": m}


def _adamw(w, g, state, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8, weight_decay=0.0):
    t = state["count"] + 1
    m = beta_1 * state["m"] + (1 - beta_1) * g
    v = beta_2 * state["v"] + (1 - beta_2) * g * g
    m_hat = m / (1 - beta_1**t)[:, None]
    v_hat = v / (1 - beta_2**t)[:, None]
    return w - lr * (m_hat / (np.sqrt(v_hat) + epsilon) + weight_decay * w), {"m": m, "v": v, "count": t}


def _dense_grads(emb, labels, w, margin, lr=0.0):
    """Loss, accuracy and gradients of the dense problem; a learned scalar of the margin
    (SphereFace2's bias) takes its gradient step with `lr`, as the fused step does."""
    w = tf.Variable(w)
    emb = tf.constant(emb)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        loss, acc = partitioned_fc.dense_loss(emb, labels, w, margin, step=STEP, return_accuracy=True)
    learned = [margin.bias] if margin.binary else []
    ge, gw, *gb = tape.gradient(loss, [emb, w, *learned])
    if gb:
        margin.bias.assign_sub(lr * gb[0])
    return float(loss), float(acc), ge.numpy(), gw.numpy()


@pytest.mark.parametrize("case", [c for c in TRAIN_CASES if "dtype" not in c], ids=lambda c: c["id"])
def test_train_step_sparse_update_matches_dense(scale_results, case):
    """Two fused steps equal two dense steps whose optimizer touches only the sampled rows; rows
    not sampled keep weight and state bit for bit; FC gradients are not reduced over workers."""
    n, ranks = scale_results
    update = {"sgd": _sgd, "adamw": _adamw}[case["opt"]]
    for num_classes in train_class_counts(case["id"], n):
        key = f"{num_classes}/train/{case['id']}"
        inputs, labels, backbone = global_batch(num_classes, n)
        emb = (inputs @ backbone).astype(np.float32)
        margin = MARGINS[case["margin"]]
        g = margin.rows_per_class
        ranges = [row_range(c, g) for c in all_shard_ranges(num_classes, n)]  # rows, g per class
        w = full_matrix(g * num_classes, backbone.shape[1], seed=11).numpy().astype(np.float64)
        for r, (start, end) in enumerate(ranges):
            np.testing.assert_array_equal(ranks[r][key + "/w0"], w[start:end])
        state = {
            "momentum": np.zeros_like(w),
            "m": np.zeros_like(w),
            "v": np.zeros_like(w),
            "count": np.zeros(g * num_classes),
        }
        prev = [(ranks[r][key + "/w0"], None) for r in range(n)]
        reset_state(margin)  # as the worker did before its two steps
        for s in range(2):
            unsampled = 0
            if case["rate"] < 1:
                rows = np.concatenate([start + ranks[r][f"{key}/{s}/index"] for r, (start, _) in enumerate(ranges)])
                classes = rows[::g] // g
                np.testing.assert_array_equal(rows, class_rows(classes, g))  # whole classes
                assert np.isin(labels, classes).all(), "a positive class was not sampled"
            else:
                classes = np.arange(num_classes)
            rows = class_rows(classes, g)
            loss, acc, ge, gw = _dense_grads(
                emb, np.searchsorted(classes, labels), w[rows].astype(np.float32), margin, lr=LR
            )
            sub = {k: v[rows] for k, v in state.items()}
            new_w, new_sub = update(w[rows], gw.astype(np.float64), sub, LR, **case["opt_params"])
            w[rows] = new_w
            for k, v in new_sub.items():
                state[k][rows] = v
            for r, (start, end) in enumerate(ranges):
                got = ranks[r]
                where = f"{key} step {s} rank {r}/{n}"
                assert got[f"{key}/{s}/applied"], where
                for stat, var in margin.state().items():  # running statistics: as the reference's
                    assert got[f"{key}/{s}/margin/{stat}"] == pytest.approx(var.numpy(), rel=1e-6), where
                assert abs(got[f"{key}/{s}/loss"] - loss) <= LOSS_RTOL * abs(loss), where
                assert got[f"{key}/{s}/acc"] == pytest.approx(acc), where
                w_prev, _ = prev[r]
                w_now = got[f"{key}/{s}/w"]
                # the update itself matches (relative to its own size, not to the weights')
                assert rel(w_now - w_prev, w[start:end] - w_prev) <= 1e-4, where
                local = (rows >= start) & (rows < end)
                untouched = np.setdiff1d(np.arange(end - start), rows[local] - start)
                unsampled += untouched.size
                np.testing.assert_array_equal(w_now[untouched], w_prev[untouched], err_msg=where)
                for slot in ("momentum", "m", "v", "count"):
                    name = f"{key}/{s}/state/{slot}"
                    if name not in got:
                        continue
                    ref_slot = state[slot][start:end]
                    if slot == "count":
                        np.testing.assert_array_equal(got[name], ref_slot, err_msg=where)
                    else:
                        assert rel(got[name], ref_slot) <= 1e-4, f"{where} {slot}"
                    before = got[f"{key}/{s - 1}/state/{slot}"] if s else np.zeros_like(got[name])
                    np.testing.assert_array_equal(got[name][untouched], before[untouched], err_msg=where)
                prev[r] = (w_now, None)
            # Over the whole batch: after an update one worker's samples can be fit so well that
            # their slice of the gradient is ~1e-3 of the batch's, below float32's relative reach.
            demb = np.concatenate([ranks[r][f"{key}/{s}/demb"] for r in range(n)])
            assert rel(demb, ge) <= GRAD_RTOL, f"{key} step {s}"
            if case["rate"] < 1 and num_classes > len(labels):
                assert unsampled, f"{key} step {s}: the case should leave some rows unsampled"


@pytest.mark.parametrize("case", [c for c in TRAIN_CASES if "dtype" in c], ids=lambda c: c["id"])
def test_16bit_storage_and_compute(scale_results, case):
    """16-bit shards and optimizer state: stored as asked, the step's numbers near float32's."""
    n, ranks = scale_results
    for num_classes in train_class_counts(case["id"], n):
        key = f"{num_classes}/train/{case['id']}"
        inputs, labels, backbone = global_batch(num_classes, n)
        emb = (inputs @ backbone).astype(np.float32)
        g = MARGINS[case["margin"]].rows_per_class
        w = full_matrix(g * num_classes, backbone.shape[1], seed=11).numpy()
        reset_state(MARGINS[case["margin"]])
        loss, _, ge, _ = _dense_grads(emb, labels, w, MARGINS[case["margin"]])
        for r, classes in enumerate(all_shard_ranges(num_classes, n)):
            start, end = row_range(classes, g)
            got = ranks[r]
            assert str(got[key + "/weight_dtype"]) == case["dtype"]
            assert set(got[key + "/state_dtypes"].tolist()) == {case["dtype"]}
            # the stored shard is the float32 init rounded once
            np.testing.assert_allclose(got[key + "/w0"], w[start:end], rtol=2**-7)
            if case["rate"] == 1.0:  # sampling changes the problem; the full layer is comparable
                assert abs(got[f"{key}/0/loss"] - loss) <= 2e-2 * abs(loss), key
                assert rel(got[f"{key}/0/demb"], ge[r * LOCAL_BATCH : (r + 1) * LOCAL_BATCH]) <= 5e-2, key
            assert np.isfinite(got[f"{key}/1/loss"]) and got[f"{key}/1/applied"]
            assert not np.array_equal(got[f"{key}/1/w"], got[key + "/w0"]), "the shard did not move"


def test_nonfinite_loss_updates_nothing(scale_results):
    n, ranks = scale_results
    for num_classes in class_counts(n):
        for r in range(n):
            assert not ranks[r][f"{num_classes}/nonfinite/applied"]
            assert ranks[r][f"{num_classes}/nonfinite/unchanged"]
