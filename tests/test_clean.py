"""`pfc clean` (Sub-center ArcFace's cleaning step): the dominant sub-center, the angle to it, and
the command on a real training run."""

import math
import subprocess

import numpy as np
import pytest
from helpers import BIN, ROOT, smoke_overrides, worker_env

from launch import clean


def unit(deg):
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_the_dominant_sub_center_is_the_one_most_samples_are_nearest_to():
    """Class 0's sub-centers at 0°, 90°, 180°; three samples near 0°, one at 100° (nearest to 90°)
    and one at 80° (nearest to 90° too): the dominant is the 0° one, and the angles are to it."""
    centers = np.stack([unit(0), unit(90), unit(180), unit(45), unit(135), unit(-90)])  # 2 classes x 3
    samples = np.stack([unit(10), unit(-5), unit(20), unit(100), unit(80), unit(130), unit(140)])
    labels = np.array([0, 0, 0, 0, 0, 1, 1])
    a = clean.angles(clean.label_cosines(samples * 3.0, labels, centers, 3), labels, num_classes=2)
    np.testing.assert_array_equal(a.dominant, [0, 0, 0, 0, 0, 1, 1])  # class 1: both nearest 135°
    np.testing.assert_array_equal(a.nearest, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(a.angle_deg, [10, 5, 20, 100, 80, 5, 5], atol=1e-9)


def test_a_tie_takes_the_lowest_sub_center_and_an_empty_class_is_harmless():
    dominant = clean.dominant_rows(np.array([1, 0, 2, 2]), np.array([0, 0, 2, 2]), g=3, num_classes=3)
    np.testing.assert_array_equal(dominant, [0, 0, 2])


def test_the_list_holds_only_samples_above_the_threshold(tmp_path):
    samples = [clean.Sample("s-00000-of-00001.tfrecord", i, f"img{i}", 0) for i in range(3)]
    a = clean.Angles(np.zeros((3, 1)), np.zeros(3, int), np.zeros(3, int), np.array([10.0, 80.0, 75.0]))
    out = tmp_path / "noisy.tsv"
    assert clean.write_list(str(out), samples, a, 75.0) == 1
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(clean.COLUMNS)
    assert lines[1].split("\t") == ["s-00000-of-00001.tfrecord", "1", "img1", "0", "80.00", "0", "0"]
    assert [p.name for p in tmp_path.iterdir()] == ["noisy.tsv"]  # no temporary left


def pfc(*argv, timeout=300):
    return subprocess.run(
        [str(BIN / "pfc"), *argv], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_clean_after_sub_center_training_lists_what_the_angles_say(synth_dataset, tmp_path):
    """Train Sub-center ArcFace (k = 2) briefly, then `pfc clean`: its angles equal the ones computed
    here from the exported model's embeddings and the checkpoint's rows; the threshold selects."""
    sets = smoke_overrides(synth_dataset, tmp_path / "run", 10, "loss.name=subcenter_arcface", "loss.k=2")
    proc = pfc("train", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpt_dir = tmp_path / "run" / "checkpoints" / "ckpt-000000010"
    out = tmp_path / "all.tsv"
    proc = pfc("clean", "--config", "configs/smoke.yaml", *sets, "--threshold", "0", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "400 samples, 2 row(s) per class" in proc.stdout and "400 (100.00%) above 0°" in proc.stdout
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    assert len(rows) == 400

    from launch import checkpoint as ckpt
    from launch.embed import embed
    from launch.export import export

    emb, _ = embed(export(str(ckpt_dir), str(tmp_path / "model")), str(synth_dataset))
    w = np.concatenate([r for _, r in ckpt.class_blocks(str(ckpt_dir))]).astype(np.float64)
    assert w.shape == (80, 128)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    labels = np.array([int(r[3]) for r in rows])
    cos = np.einsum("nd,ngd->ng", emb, w.reshape(40, 2, 128)[labels])
    nearest = cos.argmax(1)
    votes = np.zeros((40, 2), int)
    np.add.at(votes, (labels, nearest), 1)
    dominant = votes.argmax(1)[labels]
    want = np.degrees(np.arccos(np.clip(cos[np.arange(400), dominant], -1, 1)))
    np.testing.assert_allclose([float(r[4]) for r in rows], want, atol=0.02)
    np.testing.assert_array_equal([int(r[5]) for r in rows], dominant)

    ordered = np.sort(want)[150:251]
    i = int(np.argmax(np.diff(ordered)))  # a threshold well clear of every angle
    threshold = float(ordered[i] + ordered[i + 1]) / 2
    proc = pfc("clean", "--config", "configs/smoke.yaml", *sets, "--threshold", str(threshold), str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = out.read_text().splitlines()[1:]
    assert len(listed) == int(np.sum(want > threshold)) and 0 < len(listed) < 400

    proc = pfc("clean", "--config", "configs/smoke.yaml", *sets, "--threshold", "200", str(out))
    assert proc.returncode != 0 and "--threshold must be an angle in [0, 180]" in proc.stderr
