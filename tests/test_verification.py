"""launch.verification: hand-made cases with known answers."""

import numpy as np
import pytest

from launch import verification as v


def unit(angles_deg):
    a = np.radians(np.asarray(angles_deg, np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_pair_distances_are_squared_l2_of_normalized_embeddings():
    e1 = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 0.0]])
    e2 = np.array([[7.0, 0.0], [0.0, -1.0], [2.0, 2.0], [0.0, 0.5]])
    np.testing.assert_allclose(v.pair_distances(e1, e2), [0.0, 4.0, 0.0, 2.0], atol=1e-12)
    # At 60 degrees: |a − b|² = 2 − 2 cos 60° = 1.
    assert v.pair_distances(unit([0]), unit([60]))[0] == pytest.approx(1.0)


def test_best_threshold_by_hand():
    # Sorted: 0.1 same, 0.4 diff, 0.5 same, 0.9 same, 1.2 diff, 1.5 diff. Below 1.05 we accept the
    # three same pairs and one different pair (0.4): 5 of 6 right; no threshold does better.
    d = np.array([0.1, 0.5, 0.9, 0.4, 1.2, 1.5])
    same = np.array([True, True, True, False, False, False])
    th, acc = v.best_threshold(d, same)
    assert th == pytest.approx(1.05) and acc == pytest.approx(5 / 6)
    assert v.accuracy_at(d, same, 0.45) == pytest.approx(3 / 6)
    # On a grid the best grid point wins (ties: the smallest).
    th, acc = v.best_threshold(d, same, thresholds=np.arange(0, 4, 0.01))
    assert th == pytest.approx(0.91) and acc == pytest.approx(5 / 6)


def test_kfold_by_hand():
    # Fold A (pairs 0-3): same 0.2, 0.3; diff 0.55, 1.1 -> its best threshold 0.425.
    # Fold B (pairs 4-7): same 0.5, 0.6; diff 0.7, 0.8 -> its best threshold 0.65.
    # Testing A at 0.65: 0.55 is a false accept -> 3/4. Testing B at 0.425: both same pairs
    # rejected -> 2/4. Mean 0.625, std 0.125, mean threshold (0.425 + 0.65) / 2.
    d = np.array([0.2, 0.3, 0.55, 1.1, 0.5, 0.6, 0.7, 0.8])
    same = np.array([True, True, False, False, True, True, False, False])
    mean, std, th = v.kfold_accuracy(d, same, folds=2)
    assert (mean, std, th) == pytest.approx((0.625, 0.125, 0.5375))


def test_tar_at_far_by_hand():
    same_d = np.array([0.1, 0.3, 0.6, 0.7])
    diff_d = np.array([1.4, 0.2, 1.0, 0.6])  # sorted: 0.2, 0.6, 1.0, 1.4
    d = np.concatenate([same_d, diff_d])
    same = np.array([True] * 4 + [False] * 4)
    # FAR 0.25 of 4 different pairs: one may be accepted -> threshold 0.6 (the 2nd smallest);
    # same pairs strictly below 0.6: 0.1 and 0.3 (0.6 itself ties and is rejected).
    assert v.tar_at_far(d, same, far=0.25) == pytest.approx((0.5, 0.25, 0.6))
    # FAR 0.1: none may be accepted -> threshold 0.2, only 0.1 accepted.
    assert v.tar_at_far(d, same, far=0.1) == pytest.approx((0.25, 0.0, 0.2))
    # FAR 0.999 of 4 is 3.99 -> 3 accepted -> threshold 1.4: every same pair accepted.
    assert v.tar_at_far(d, same, far=0.999) == pytest.approx((1.0, 0.75, 1.4))


def test_tar_at_far_with_ties_never_exceeds_the_target():
    d = np.array([0.5, 0.5, 0.5, 0.5, 0.1])
    same = np.array([False, False, False, False, True])
    tar, far, th = v.tar_at_far(d, same, far=0.5)  # 2 of 4 allowed, but all four tie at 0.5
    assert (tar, far, th) == (1.0, 0.0, 0.5)


def test_perfectly_separable_pairs():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(600, 16))
    same = np.arange(600) % 2 == 0
    other = np.where(same[:, None], base + 0.01 * rng.normal(size=base.shape), -base)
    result = v.evaluate_pairs(base, other, same, far=1e-2)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0 and result.tar == 1.0
    assert 0.0 < result.threshold < 4.0 and result.far <= 1e-2 and result.num_pairs == 600
    # 300 different pairs cannot measure a FAR of 1e-3: no number rather than the TAR at FAR 0
    assert v.evaluate_pairs(base, other, same, far=1e-3).tar is None
    assert v.far_measurable(1000, 1e-3) and not v.far_measurable(999, 1e-3)


def test_random_embeddings_are_at_chance():
    rng = np.random.default_rng(1)
    e1, e2 = rng.normal(size=(2, 3000, 32))
    same = rng.random(3000) < 0.5
    result = v.evaluate_pairs(e1, e2, same)
    assert 0.45 < result.accuracy < 0.56
    assert result.tar < 0.02  # at FAR 1e-3, chance TAR is about 1e-3


def test_split_pairs_and_flip_sum():
    images = np.arange(4 * 2 * 3 * 1, dtype=np.float64).reshape(4, 2, 3, 1)
    calls = []

    def embed(batch):
        calls.append(len(batch))
        return batch[:, 0, :, 0] * np.array([1.0, 10.0, 100.0])  # weights break the flip symmetry

    out = v.flip_sum(embed, images, batch_size=3)
    row = images[:, 0, :, 0]
    np.testing.assert_allclose(out, row * [1, 10, 100] + row[:, ::-1] * [1, 10, 100])
    assert calls == [3, 3, 1, 1]  # image and flip per batch of at most 3
    np.testing.assert_allclose(v.flip_sum(embed, images), out)
    a, b = v.split_pairs(out)
    np.testing.assert_allclose(a, out[[0, 2]])
    np.testing.assert_allclose(b, out[[1, 3]])


def test_bad_input():
    with pytest.raises(ValueError, match="booleans"):
        v.tar_at_far(np.array([0.1, 0.2]), np.array([1, 0]))
    with pytest.raises(ValueError, match="both be \\[N\\]"):
        v.kfold_accuracy(np.zeros(4), np.zeros(3, bool))
    with pytest.raises(ValueError, match="not finite"):
        v.best_threshold(np.array([0.1, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="far must be in"):
        v.tar_at_far(np.array([0.1, 0.2]), np.array([True, False]), far=0.0)
    with pytest.raises(ValueError, match="same and different"):
        v.tar_at_far(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="folds must be"):
        v.kfold_accuracy(np.zeros(3), np.array([True, False, True]), folds=10)
    with pytest.raises(ValueError, match="consecutive pairs"):
        v.split_pairs(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="\\[N, D\\]"):
        v.pair_distances(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="\\[N, H, W, C\\]"):
        v.flip_sum(lambda b: b, np.zeros((2, 3)))
