"""Face verification metrics in the InsightFace style, as pure numpy functions.

A verification set is N pairs of images and N booleans (same identity or not). Each image's
embedding is usually the SUM of the embeddings of the image and of its horizontal flip
(`flip_sum`); embeddings are L2-normalized and a pair is called "same" when the squared L2
distance of its two embeddings is BELOW a threshold (so distances lie in [0, 4]).

* `kfold_accuracy`: the pairs are split into k contiguous folds (the first N mod k folds one pair
  larger); for each fold the threshold that maximizes accuracy on the other k − 1 folds is applied
  to it. Reported: mean and std of the k test accuracies, and the mean of the chosen thresholds.
* `tar_at_far`: over all pairs, the largest threshold whose false accept rate (different pairs
  called same) is at most `far`, and the true accept rate (same pairs called same) there.

Differences from InsightFace's evaluation code, on purpose: the accuracy threshold is searched
exactly (every midpoint between observed distances) unless a grid is passed —
`thresholds=np.arange(0, 4, 0.01)` is InsightFace's grid; TAR at FAR is computed once over all
pairs with an exact threshold instead of per fold with an interpolated one, so the reported FAR
never exceeds the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean test accuracy over the folds
    accuracy_std: float  # their standard deviation (population, as numpy's default)
    threshold: float  # mean best threshold (squared L2 distance) over the folds
    tar: float | None  # true accept rate at the FAR threshold; None when the set has fewer
    # than 1 / far_target different pairs (that FAR cannot be measured)
    far: float  # the false accept rate actually reached there (<= far_target)
    far_target: float
    far_threshold: float  # the threshold of tar_at_far
    num_pairs: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def flip_sum(
    embed_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int | None = None
) -> np.ndarray:
    """[N, H, W, C] images -> [N, D] embed_fn(images) + embed_fn(images flipped left-right).

    `embed_fn` maps a batch [b, H, W, C] to [b, D]; it is called on batches of `batch_size`
    images (all at once when None). The sum is not normalized (`normalize` does that).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = batch_size or max(len(images), 1)
    out = []
    for start in range(0, len(images), step):
        batch = images[start : start + step]
        out.append(np.asarray(embed_fn(batch), np.float64) + np.asarray(embed_fn(batch[:, :, ::-1, :]), np.float64))
    if not out:
        raise ValueError("no images")
    return np.concatenate(out, axis=0)


def normalize(embeddings: np.ndarray) -> np.ndarray:
    """[N, D] -> rows scaled to unit L2 norm (a zero row stays zero)."""
    e = np.asarray(embeddings, np.float64)
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norm, np.finfo(np.float64).tiny)


def split_pairs(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[2N, D] embeddings in .bin order (pair i = images 2i and 2i+1) -> ([N, D], [N, D])."""
    e = np.asarray(embeddings)
    if e.ndim != 2 or len(e) % 2:
        raise ValueError(f"expected [2N, D] embeddings of consecutive pairs, got shape {e.shape}")
    return e[0::2], e[1::2]


def pair_distances(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """[N, D], [N, D] -> [N] squared L2 distance of the L2-normalized embeddings, in [0, 4]."""
    a, b = np.asarray(emb1), np.asarray(emb2)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair embeddings must both be [N, D], got {a.shape} and {b.shape}")
    return np.sum((normalize(a) - normalize(b)) ** 2, axis=1)


def _check(distances: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, np.float64)
    s = np.asarray(issame)
    if d.ndim != 1 or s.shape != d.shape:
        raise ValueError(f"distances and issame must both be [N], got {d.shape} and {s.shape}")
    if s.dtype != bool:
        raise ValueError(f"issame must be booleans, got dtype {s.dtype}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"{int(np.sum(~np.isfinite(d)))} distances are not finite")
    return d, s


def best_threshold(
    distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray | None = None
) -> tuple[float, float]:
    """The threshold maximizing accuracy of `distance < threshold` on these pairs -> (threshold, accuracy).

    thresholds=None searches exactly: every midpoint between consecutive distinct distances, and
    one below the smallest / above the largest. Ties go to the smallest threshold.
    """
    d, s = _check(distances, issame)
    if thresholds is None:
        u = np.unique(d)
        thresholds = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    thresholds = np.sort(np.asarray(thresholds, np.float64))
    # For each threshold: same pairs below it (accepted) + different pairs at or above (rejected).
    pos, neg = np.sort(d[s]), np.sort(d[~s])
    accepted_pos = np.searchsorted(pos, thresholds, side="left")
    rejected_neg = len(neg) - np.searchsorted(neg, thresholds, side="left")
    accuracy = (accepted_pos + rejected_neg) / len(d)
    i = int(np.argmax(accuracy))
    return float(thresholds[i]), float(accuracy[i])


def accuracy_at(distances: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    d, s = _check(distances, issame)
    return float(np.mean((d < threshold) == s))


def kfold_accuracy(
    distances: np.ndarray, issame: np.ndarray, folds: int = 10, thresholds: np.ndarray | None = None
) -> tuple[float, float, float]:
    """k-fold accuracy with the threshold chosen on the other folds -> (mean, std, mean threshold)."""
    d, s = _check(distances, issame)
    if not 2 <= folds <= len(d):
        raise ValueError(f"folds must be in [2, number of pairs={len(d)}], got {folds}")
    parts = np.array_split(np.arange(len(d)), folds)
    accs, ths = [], []
    for test in parts:
        train = np.setdiff1d(np.arange(len(d)), test, assume_unique=True)
        th, _ = best_threshold(d[train], s[train], thresholds)
        accs.append(accuracy_at(d[test], s[test], th))
        ths.append(th)
    return float(np.mean(accs)), float(np.std(accs)), float(np.mean(ths))


def tar_at_far(distances: np.ndarray, issame: np.ndarray, far: float = 1e-3) -> tuple[float, float, float]:
    """True accept rate at false accept rate <= far -> (tar, far reached, threshold).

    With the different-pair distances sorted, n_1 <= n_2 <= ..., at most k = floor(far · N_diff)
    of them may fall below the threshold: it is n_{k+1} (+inf when k >= N_diff), and a pair is
    accepted when its distance is strictly below it, so ties with n_{k+1} are rejected.
    """
    d, s = _check(distances, issame)
    if not 0.0 < far < 1.0:
        raise ValueError(f"far must be in (0, 1), got {far}")
    pos, neg = d[s], np.sort(d[~s])
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need both same and different pairs, got {len(pos)} same and {len(neg)} different")
    k = int(np.floor(far * len(neg) + 1e-9))  # the epsilon keeps e.g. 0.003 * 1000 from landing on 2.999...
    threshold = float(neg[k]) if k < len(neg) else float("inf")
    return float(np.mean(pos < threshold)), float(np.mean(neg < threshold)), threshold


def evaluate_pairs(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame: np.ndarray,
    folds: int = 10,
    far: float = 1e-3,
    thresholds: np.ndarray | None = None,
) -> VerificationResult:
    """Pair embeddings [N, D], [N, D] and [N] booleans -> all the metrics of a verification set."""
    d = pair_distances(emb1, emb2)
    issame = np.asarray(issame)
    acc, acc_std, th = kfold_accuracy(d, issame, folds, thresholds)
    tar, far_reached, far_th = tar_at_far(d, issame, far)
    if not far_measurable(int(np.sum(~issame.astype(bool))), far):
        tar = None
    return VerificationResult(
        accuracy=acc,
        accuracy_std=acc_std,
        threshold=th,
        tar=tar,
        far=far_reached,
        far_target=far,
        far_threshold=far_th,
        num_pairs=len(d),
    )


def far_measurable(different_pairs: int, far: float) -> bool:
    """A FAR of `far` needs at least 1 / far different pairs: with fewer, one false accept is
    already more than `far`, and the 'TAR' is the TAR at FAR 0."""
    return far * different_pairs >= 1 - 1e-9
