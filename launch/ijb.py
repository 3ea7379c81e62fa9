"""IJB-B / IJB-C template-based 1:1 verification, as InsightFace's IJB evaluation computes it.

The sets are licensed (users bring them); the layout under ROOT, NAME lower-case (ijbb, ijbc):

    ROOT/loose_crop/IMAGE                    face crops, not aligned
    ROOT/meta/NAME_name_5pts_score.txt       IMAGE x1 y1 ... x5 y5 SCORE  (5 landmarks, detector score)
    ROOT/meta/NAME_face_tid_mid.txt          IMAGE TEMPLATE_ID MEDIA_ID   (the same images in order)
    ROOT/meta/NAME_template_pair_label.txt   TEMPLATE1 TEMPLATE2 LABEL    (1 same identity, 0 not)

Each crop is warped to 112 x 112 by the least-squares similarity taking its landmarks onto
ArcFace's reference points; an image's feature is embed(image) + embed(mirror image), norm kept
(InsightFace's default; `normalize=True` drops it), times the detector score; a media's feature is
the mean of its images', a template's the L2-normalized sum of its medias'; a pair's score is the
dot product of its templates'. Unlike InsightFace's script, on purpose: the threshold at a FAR is
exact (at most FAR of the impostor pairs above it, as launch/verification.py) where InsightFace
takes the ROC point nearest the FAR, which may lie above it; a FAR below 1 / impostor pairs is None
(it would be the TAR at FAR 0); a pair naming a template without images is an error.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from launch import verification
from pipelines.schema import DataError

# ArcFace's 5 reference points in a 112 x 112 crop: left eye, right eye, nose, mouth corners.
REFERENCE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_PAIR_CHUNK = 100_000  # pairs scored at once: [chunk, D] float64 twice, not [P, D] (IJB-C: 15.7M)


@dataclasses.dataclass(frozen=True, eq=False)
class Protocol:
    """An IJB set's meta files, checked against each other and the crops: N images, P pairs."""

    images: tuple[str, ...]  # [N] paths of the crops
    landmarks: np.ndarray  # [N, 5, 2] float64 (x, y) in the crop's pixels
    scores: np.ndarray  # [N] float64 detector scores
    templates: np.ndarray  # [N] int64 template id of each image
    medias: np.ndarray  # [N] int64 media id of each image
    pairs: np.ndarray  # [P, 2] int64 template ids
    labels: np.ndarray  # [P] int64: 1 same identity, 0 different


def meta_path(root: str, name: str, kind: str) -> str:
    """'ROOT', 'IJBC', 'face_tid_mid' -> 'ROOT/meta/ijbc_face_tid_mid.txt'."""
    return os.path.join(root, "meta", f"{name.lower()}_{kind}.txt")


def load_protocol(root: str, name: str) -> Protocol:
    """Read and cross-check the three meta files; a bad line or a missing crop is a DataError."""
    pts, tid, pair = (meta_path(root, name, k) for k in ("name_5pts_score", "face_tid_mid", "template_pair_label"))
    lines, images, values = _read_points(pts)
    templates, medias = _read_templates(tid, pts, lines, images)
    for line, image in zip(lines, images):
        if not os.path.isfile(os.path.join(root, "loose_crop", image)):
            raise DataError(f"{pts}:{line}: image {os.path.join(root, 'loose_crop', image)} not found")
    pairs, labels = _read_pairs(pair, tid, templates)
    if not (labels == 1).any() or not (labels == 0).any():
        raise DataError(
            f"{pair}: needs genuine (1) and impostor (0) pairs, has {int(labels.sum())} genuine of {len(labels)}"
        )
    return Protocol(
        tuple(os.path.join(root, "loose_crop", i) for i in images),
        values[:, :10].reshape(-1, 5, 2),
        values[:, 10],
        templates,
        medias,
        pairs,
        labels,
    )


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of the file's non-blank lines."""
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return ((i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip())


def _fields(path: str, i: int, line: str, form: str) -> list[str]:
    fields = line.split()
    if len(fields) != len(form.split()):
        raise DataError(f"{path}:{i}: expected '{form}', got {line.strip()!r}")
    return fields


def _number(path: str, i: int, text: str, kind: type = float):
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{path}:{i}: not a{'n integer' if kind is int else ' number'}: {text!r}")
    return value


def _read_points(path: str) -> tuple[list[int], list[str], np.ndarray]:
    """-> (line numbers, image names [N], [N, 11] landmarks x1 y1 ... y5 then the score)."""
    form = "IMAGE x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 SCORE"
    lines, names, values = [], [], []
    for i, line in _lines(path):
        fields = _fields(path, i, line, form)
        row = [_number(path, i, v) for v in fields[1:]]
        if np.ptp(np.reshape(row[:10], (5, 2)), axis=0).max() == 0:  # no transform fits one point
            raise DataError(f"{path}:{i}: the 5 landmarks of {fields[0]} coincide")
        lines.append(i)
        names.append(fields[0])
        values.append(row)
    if not names:
        raise DataError(f"{path}: no images")
    return lines, names, np.array(values, np.float64)


def _read_templates(path: str, pts: str, pts_lines: list[int], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """-> (template ids [N], media ids [N]); line k must name the 5pts file's k-th image."""
    rows = []
    for k, (i, line) in enumerate(_lines(path)):
        image, t, m = _fields(path, i, line, "IMAGE TEMPLATE_ID MEDIA_ID")
        if k >= len(names) or image != names[k]:
            other = f"line {pts_lines[k]} of {pts} names {names[k]}" if k < len(names) else f"{pts} ends"
            raise DataError(f"{path}:{i}: image {image}, but {other}")
        rows.append((_number(path, i, t, int), _number(path, i, m, int)))
    if len(rows) < len(names):
        raise DataError(f"{pts}:{pts_lines[len(rows)]}: image {names[len(rows)]} has no line in {path}")
    a = np.array(rows, np.int64)
    return a[:, 0], a[:, 1]


def _read_pairs(path: str, tid: str, templates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (template pairs [P, 2], labels [P]); numpy parses a good file fast (IJB-C has 15.7M
    lines), the line-by-line reader below finds and names what is wrong with a bad one."""
    try:
        a = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
        if a.shape[1] == 3 and len(a) and np.isin(a[:, 2], (0, 1)).all() and np.isin(a[:, :2], templates).all():
            return a[:, :2], a[:, 2]
    except (OSError, ValueError):
        pass
    known, rows = set(templates.tolist()), []
    for i, line in _lines(path):
        row = [_number(path, i, v, int) for v in _fields(path, i, line, "TEMPLATE1 TEMPLATE2 LABEL")]
        if row[2] not in (0, 1):
            raise DataError(f"{path}:{i}: label {row[2]}, expected 1 (same identity) or 0")
        for t in row[:2]:
            if t not in known:
                raise DataError(f"{path}:{i}: template {t} has no image in {tid}")
        rows.append(row)
    a = np.array(rows, np.int64).reshape(-1, 3)
    return a[:, :2], a[:, 2]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares rotation + uniform scale + translation taking src [K, 2] onto dst [K, 2]
    (Umeyama 1991) -> M [2, 3], dst ≈ M @ [x, y, 1]."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two [K, 2] point sets, K >= 2; got {src.shape} and {dst.shape}")
    s, d = src - src.mean(0), dst - dst.mean(0)
    u, sigma, vt = np.linalg.svd(d.T @ s / len(src))
    sign = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])  # rotation, never a mirror
    rotation = u @ np.diag(sign) @ vt
    scale = (sigma * sign).sum() / (s**2).sum(1).mean()
    shift = dst.mean(0) - scale * rotation @ src.mean(0)
    return np.hstack([scale * rotation, shift[:, None]])


def warp_affine(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C] with out(p) = image(M⁻¹ p): bilinear, black outside,
    pixel centres at integer coordinates (cv2.warpAffine's conventions)."""
    h, w = image.shape[:2]
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx, sy = (inv[r, 0] * xs + inv[r, 1] * ys + inv[r, 2] for r in (0, 1))
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]

    def at(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        return image[np.clip(y, 0, h - 1), np.clip(x, 0, w - 1)] * inside[..., None]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def align(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """A crop uint8 [H, W, 3] and its landmarks [5, 2] -> the aligned face uint8 [size, size, 3]
    (the reference points scaled by size / 112)."""
    return warp_affine(np.asarray(image), similarity_transform(landmarks, REFERENCE * (size / 112)), size)


def image_features(
    flip_sums: np.ndarray, scores: np.ndarray, *, detector_score: bool = True, normalize: bool = False
) -> np.ndarray:
    """embed(x) + embed(mirror x) [N, D] -> image features [N, D]: unit rows if `normalize`
    (InsightFace's default keeps the norm, which weighs poor crops less), times the detector
    scores [N] if `detector_score`."""
    f = verification.normalize(flip_sums) if normalize else np.asarray(flip_sums, np.float64)
    return f * np.asarray(scores, np.float64)[:, None] if detector_score else f


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image features [N, D] -> (sorted template ids [T], [T, D] unit rows): each template's
    L2-normalized sum over its medias of the mean of that media's images."""
    order = np.lexsort((medias, templates))
    t, m, f = np.asarray(templates)[order], np.asarray(medias)[order], np.asarray(features, np.float64)[order]
    if not len(f):
        raise ValueError("no image features")
    starts = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])])  # one per (template, media)
    means = np.add.reduceat(f, starts) / np.diff(np.r_[starts, len(f)])[:, None]
    firsts = np.flatnonzero(np.r_[True, t[starts][1:] != t[starts][:-1]])  # one per template
    return t[starts][firsts], verification.normalize(np.add.reduceat(means, firsts))


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Sorted template ids [T], their features [T, D], template-id pairs [P, 2] -> [P] dot products."""
    ids, pairs = np.asarray(template_ids), np.asarray(pairs)
    rows = np.minimum(np.searchsorted(ids, pairs), len(ids) - 1)
    if not (ids[rows] == pairs).all():
        raise ValueError(f"template {pairs[ids[rows] != pairs][0]} has no feature")
    feats = np.asarray(template_feats, np.float64)
    return np.concatenate(
        [
            np.einsum("pd,pd->p", feats[r[:, 0]], feats[r[:, 1]])
            for r in np.array_split(rows, max(1, -(-len(rows) // _PAIR_CHUNK)))
        ]
    )


def tar_at_fars(scores: np.ndarray, labels: np.ndarray, fars=FARS) -> dict[float, float | None]:
    """Pair scores [P] (higher: more alike), labels [P] (1 genuine) -> {far: TAR}: the threshold
    leaves the largest share of impostor pairs above it that is <= far, the TAR is the share of
    genuine pairs above it; None where far < 1 / impostor pairs (not measurable)."""
    same = np.asarray(labels) == 1
    # launch/verification counts distances below a threshold: a score above t is -score below -t.
    return {
        far: verification.tar_at_far(-np.asarray(scores, np.float64), same, far)[0]
        if verification.far_measurable(int((~same).sum()), far)
        else None
        for far in fars
    }


def aligned_batches(p: Protocol, batch_size: int) -> Iterator[np.ndarray]:
    """The protocol's crops, aligned, as uint8 [B, 112, 112, 3] batches in order (decoded and
    warped by a thread per core: that, not the model, is most of the time)."""
    from pipelines.images import decode

    def one(i: int) -> np.ndarray:
        with open(p.images[i], "rb") as f:
            return align(decode(f.read(), p.images[i]).numpy(), p.landmarks[i])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(p.images), batch_size):
            yield np.stack(list(pool.map(one, range(start, min(start + batch_size, len(p.images))))))


def evaluate_ijb(
    embed: Callable[[np.ndarray], np.ndarray],
    root: str,
    name: str,
    *,
    batch_size: int = 256,
    detector_score: bool = True,
    normalize: bool = False,
) -> dict:
    """embed: uint8 [B, 112, 112, 3] aligned faces -> [B, D]. -> {"name", "tar_at_far": {"1e-06":
    TAR or None, ...}, "images", "templates", "pairs", "genuine_pairs", "impostor_pairs"}."""
    p = load_protocol(root, name)
    sums = np.concatenate([verification.flip_sum(embed, b).astype(np.float32) for b in aligned_batches(p, batch_size)])
    ids, feats = template_features(
        image_features(sums, p.scores, detector_score=detector_score, normalize=normalize), p.templates, p.medias
    )
    tars = tar_at_fars(pair_scores(ids, feats, p.pairs), p.labels)
    return {
        "name": name.upper(),
        "tar_at_far": {f"{far:.0e}": tar for far, tar in tars.items()},
        "images": len(p.images),
        "templates": len(ids),
        "pairs": len(p.labels),
        "genuine_pairs": int(p.labels.sum()),
        "impostor_pairs": int((p.labels == 0).sum()),
    }


def summary_line(result: dict) -> str:
    """-> 'ijbc: TAR@FAR=1e-06 n/a  1e-05 0.8123  ...'."""
    cells = (f"{far} {'n/a' if tar is None else f'{tar:.4f}'}" for far, tar in result["tar_at_far"].items())
    return f"{result['name'].lower()}: TAR@FAR=" + "  ".join(cells)
