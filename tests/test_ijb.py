"""launch.ijb: alignment, template pooling, TAR at FAR, and the whole protocol on a synthetic set
written in the IJB layout."""

import argparse
import itertools
import os
import re

import numpy as np
import pytest
from PIL import Image

from launch import evaluate, ijb
from pipelines.schema import DataError

# Identity colours: corners of a cube around mid-grey, so after centring the cosine between two
# identities is 1/3 (one channel differs), -1/3 (two) or -1 (all three: identities 0 and 1).
SIGNS = [(1, -1, -1), (-1, 1, 1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (1, -1, 1)]
CROP = 40  # crop side: the aligned face is this crop scaled by 112 / 40


def rotation_scale(angle_deg: float, scale: float, shift) -> np.ndarray:
    a = np.radians(angle_deg)
    return np.hstack(
        [scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]), np.asarray(shift, np.float64)[:, None]]
    )


def apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:, :2].T + m[:, 2]


def test_similarity_transform_recovers_a_known_transform():
    m = rotation_scale(23.0, 1.7, (13.25, -4.5))
    np.testing.assert_allclose(ijb.similarity_transform(ijb.REFERENCE, apply(m, ijb.REFERENCE)), m, atol=1e-6)
    # A mirror image is not a similarity: its best fit must still be a rotation (det > 0).
    mirrored = ijb.REFERENCE * [-1, 1]
    assert np.linalg.det(ijb.similarity_transform(ijb.REFERENCE, mirrored)[:, :2]) > 0


def test_align_lands_the_landmarks_on_the_reference_points():
    # A dark crop with 5 bright Gaussian dots where a known transform puts the reference points.
    m = rotation_scale(-17.0, 1.35, (20.3, 11.7))
    landmarks = apply(m, ijb.REFERENCE)
    ys, xs = np.mgrid[0:170, 0:160]
    dots = sum(np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 1.6**2)) for x, y in landmarks)
    crop = np.repeat((10 + 240 * dots)[..., None], 3, axis=2).astype(np.uint8)
    aligned = ijb.align(crop, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    gray = aligned[..., 0].astype(np.float64)
    for x, y in ijb.REFERENCE:
        y0, x0 = int(round(y)) - 5, int(round(x)) - 5
        win = np.clip(gray[y0 : y0 + 11, x0 : x0 + 11] - 10, 0, None)
        assert win.max() > 150, (x, y)
        wy, wx = np.mgrid[y0 : y0 + 11, x0 : x0 + 11]
        centre = np.array([(win * wx).sum(), (win * wy).sum()]) / win.sum()
        assert np.hypot(*(centre - (x, y))) < 0.5, (centre, (x, y))
    # And nothing bright elsewhere: the five dots are the five brightest blobs.
    mask = np.ones_like(gray, bool)
    for x, y in ijb.REFERENCE:
        mask[int(round(y)) - 6 : int(round(y)) + 7, int(round(x)) - 6 : int(round(x)) + 7] = False
    assert gray[mask].max() < 40
    # Another size scales the reference points.
    assert ijb.align(crop, landmarks, size=56).shape == (56, 56, 3)


def test_template_is_the_normalized_sum_of_its_media_means():
    a = np.array([[3.0, 0.0], [0.0, 3.0], [3.0, 3.0]])  # template 7, media 3: mean (2, 2)
    b = np.array([0.0, 4.0])  # template 7, media 9
    c = np.array([5.0, 0.0])  # template 2, media 3 (another template)
    feats = np.stack([a[0], c, a[1], b, a[2]])
    ids, t = ijb.template_features(feats, np.array([7, 2, 7, 7, 7]), np.array([3, 3, 3, 9, 3]))
    np.testing.assert_array_equal(ids, [2, 7])
    np.testing.assert_allclose(t, [[1.0, 0.0], np.array([2.0, 6.0]) / np.sqrt(40)], atol=1e-12)
    scores = ijb.pair_scores(ids, t, np.array([[7, 2], [2, 2], [7, 7]]))
    np.testing.assert_allclose(scores, [2 / np.sqrt(40), 1.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="template 5"):
        ijb.pair_scores(ids, t, np.array([[7, 5]]))


def test_image_features_weigh_by_detector_score():
    sums = np.array([[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(ijb.image_features(sums, np.array([0.5, 2.0])), [[1.5, 2.0], [0.0, 4.0]])
    np.testing.assert_allclose(ijb.image_features(sums, np.array([0.5, 2.0]), normalize=True), [[0.3, 0.4], [0.0, 2.0]])
    np.testing.assert_allclose(ijb.image_features(sums, np.array([0.5, 2.0]), detector_score=False), sums)


def test_tar_at_fars_by_hand():
    impostors = np.arange(1000) / 1000  # 0.000 ... 0.999
    genuine = np.array([0.9995, 0.995, 0.9895, 0.989, 0.95, 0.5])
    scores, labels = np.r_[impostors, genuine], np.r_[np.zeros(1000, int), np.ones(6, int)]
    tars = ijb.tar_at_fars(scores, labels)
    # FAR 1e-3: 1 impostor may pass, the threshold is the 2nd highest (0.998); 1e-2: 10 pass, above
    # 0.989 (a genuine tie with it is rejected); 1e-1: 100 pass, above 0.899.
    assert tars == {
        1e-6: None,
        1e-5: None,
        1e-4: None,
        1e-3: pytest.approx(1 / 6),
        1e-2: pytest.approx(3 / 6),
        1e-1: pytest.approx(5 / 6),
    }


# --- the whole protocol on a synthetic set -----------------------------------------------------


def write_set(root, colour_of_template: dict[int, int], name: str = "IJBC", seed: int = 0) -> dict:
    """Templates t = 100 * identity + k (k = 0, 1, 2), each with media A (2 images) and media B
    (1 image); every crop a solid colour with noise; all template pairs. -> the files' paths."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "loose_crop")
    os.makedirs(root / "meta")
    lmk = " ".join(f"{v:.4f}" for v in (ijb.REFERENCE * CROP / 112).ravel())
    pts, tid = [], []
    for t, colour in colour_of_template.items():
        for j, media in enumerate((0, 0, 1)):
            image = f"{t}_{j}.png"
            pixels = 127.5 + 100 * np.array(SIGNS[colour]) + rng.integers(-20, 21, (CROP, CROP, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "loose_crop" / image)
            pts.append(f"{image} {lmk} {rng.uniform(0.5, 1.0):.3f}")
            tid.append(f"{image} {t} {10 * t + media}")
    pairs = [f"{a} {b} {int(a // 100 == b // 100)}" for a, b in itertools.combinations(colour_of_template, 2)]
    files = {}
    for kind, lines in (("name_5pts_score", pts), ("face_tid_mid", tid), ("template_pair_label", pairs)):
        files[kind] = ijb.meta_path(str(root), name, kind)
        with open(files[kind], "w") as f:
            f.write("\n".join(lines) + "\n")
    return files


def centre_colour(images: np.ndarray) -> np.ndarray:
    """A stub model: uint8 [B, 112, 112, 3] -> [B, 3] mean colour of the centre, centred on grey."""
    assert images.dtype == np.uint8 and images.shape[1:] == (112, 112, 3), images.shape
    return images[:, 40:72, 40:72].reshape(len(images), -1, 3).mean(1) - 127.5


TEMPLATES = {100 * i + k: i for i in range(6) for k in range(3)}


def test_end_to_end_separated_identities(tmp_path):
    write_set(tmp_path, TEMPLATES)
    r = ijb.evaluate_ijb(centre_colour, str(tmp_path), "IJBC", batch_size=7)
    # 18 templates -> 153 pairs: 6 x 3 genuine, 135 impostor: FAR >= 1/135 is measurable.
    assert (r["images"], r["templates"], r["pairs"], r["genuine_pairs"], r["impostor_pairs"]) == (54, 18, 153, 18, 135)
    assert r["tar_at_far"] == {"1e-06": None, "1e-05": None, "1e-04": None, "1e-03": None, "1e-02": 1.0, "1e-01": 1.0}
    assert ijb.summary_line(r) == "ijbc: TAR@FAR=1e-06 n/a  1e-05 n/a  1e-04 n/a  1e-03 n/a  1e-02 1.0000  1e-01 1.0000"


def test_end_to_end_a_template_in_another_identitys_colour(tmp_path):
    # Template 102 (identity 1) has identity 0's colour: its 3 pairs with identity 0 score like
    # genuines (3 of 135 impostors), its 2 genuine pairs score -1. At FAR 0.1, 13 impostors may
    # pass: the 3 and 10 of the 54 at cosine 1/3, so 16 of the 18 genuine pairs are accepted.
    write_set(tmp_path, {**TEMPLATES, 102: 0}, name="IJBB")
    r = ijb.evaluate_ijb(centre_colour, str(tmp_path), "ijbb", batch_size=64)
    assert r["name"] == "IJBB" and r["tar_at_far"]["1e-01"] == pytest.approx(16 / 18)
    assert r["tar_at_far"]["1e-02"] <= 16 / 18 and r["tar_at_far"]["1e-03"] is None


# --- bad input -----------------------------------------------------------------------------------

BAD = [
    ("name_5pts_score", 2, "2 3 4", r"expected 'IMAGE x1 y1 .* SCORE', got '2 3 4'"),
    ("name_5pts_score", 1, "0_0.png 1 2 3 4 5 6 7 8 9 x 0.9", r"not a number: 'x'"),
    ("name_5pts_score", 1, "0_0.png 1 1 1 1 1 1 1 1 1 1 0.9", r"the 5 landmarks of 0_0.png coincide"),
    ("face_tid_mid", 3, "1_0.png 0 1", r"image 1_0\.png, but line 3 of .*5pts_score\.txt names 0_2\.png$"),
    ("face_tid_mid", 1, "0_0.png zero 0", r"not an integer: 'zero'"),
    ("template_pair_label", 4, "0 1 2", r"label 2, expected 1"),
    ("template_pair_label", 5, "0 999 0", r"template 999 has no image in .*face_tid_mid.txt"),
    ("template_pair_label", 6, "0 1", r"expected 'TEMPLATE1 TEMPLATE2 LABEL', got '0 1'"),
]


@pytest.mark.parametrize("kind, line, text, message", BAD)
def test_a_bad_meta_line_is_a_data_error_naming_file_and_line(tmp_path, kind, line, text, message):
    files = write_set(tmp_path, {0: 0, 1: 0, 100: 1, 101: 1})
    with open(files[kind]) as f:
        lines = f.read().splitlines()
    lines[line - 1] = text
    with open(files[kind], "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(files[kind])}:{line}: {message}") as e:
        ijb.load_protocol(str(tmp_path), "IJBC")
    assert "\n" not in str(e.value)


def test_meta_files_must_agree_and_images_exist(tmp_path):
    files = write_set(tmp_path, {0: 0, 1: 0, 100: 1, 101: 1})
    os.remove(tmp_path / "loose_crop" / "1_2.png")
    with pytest.raises(
        DataError, match=rf"^{re.escape(files['name_5pts_score'])}:6: image .*loose_crop/1_2.png not found$"
    ):
        ijb.load_protocol(str(tmp_path), "IJBC")
    with open(files["face_tid_mid"]) as f:
        lines = f.read().splitlines()
    with open(files["face_tid_mid"], "w") as f:
        f.write("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(files['name_5pts_score'])}:12: image 101_2.png has no line in "):
        ijb.load_protocol(str(tmp_path), "IJBC")
    with pytest.raises(DataError, match=r"ijbb_name_5pts_score.txt: cannot read"):
        ijb.load_protocol(str(tmp_path), "IJBB")


# --- pfc eval --ijb ------------------------------------------------------------------------------


def test_pfc_eval_ijb_options_and_the_uint8_embedding():
    parser = argparse.ArgumentParser()
    evaluate.add_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--config", "c.yaml", "--ijb", "/data/IJB_release/IJBB", "--ijb-name", "ijbb"])
    assert (args.ijb, args.ijb_name) == ("/data/IJB_release/IJBB", "IJBB")
    assert parser.parse_args(["eval", "--config", "c.yaml"]).ijb_name == "IJBC"
    seen = []

    def model(x, training):
        seen.append((tuple(x.shape), float(x.numpy().min()), float(x.numpy().max()), training))
        return x[:, 0, 0, :1]

    faces = np.zeros((2, 112, 112, 3), np.uint8)
    faces[1] = 255
    out = evaluate.uint8_embed(model, 56)(faces)
    assert seen == [((2, 56, 56, 3), -1.0, 1.0, False)] and out.tolist() == [[-1.0], [1.0]]
