"""Checkpoint files: atomic directories, pruning, re-splitting rows, and clear errors."""

import os

import numpy as np
import pytest
import tensorflow as tf

import cluster
from launch import checkpoint as ckpt


def fc_state(start, end, dim=4, dtype=tf.float32, fill=None):
    rows = end - start
    base = np.arange(start, end, dtype=np.float32)[:, None] * 10 + np.arange(dim)
    value = base if fill is None else np.full([rows, dim], fill, np.float32)
    return ckpt.FCState(
        (start, end),
        tf.Variable(tf.cast(value, dtype)),
        {"momentum": tf.Variable(tf.cast(-value, dtype)), "count": tf.Variable(tf.range(start, end, dtype=tf.int32))},
    )


def save(directory, step, state, keep=3, backbone=None):
    backbone = backbone or [tf.Variable(tf.ones([2, 3]) * step)]
    return ckpt.save(
        str(directory),
        step,
        cluster.init("local"),
        state,
        backbone,
        [tf.Variable(step)],
        {"num_classes": state.class_range[1], "embedding_dim": 4},
        keep=keep,
    )


def test_rows_are_re_split_to_any_range_and_dtype_cast(tmp_path):
    path = save(tmp_path, 1, fc_state(0, 10, dtype=tf.bfloat16))
    for start, end in [(0, 3), (3, 10), (7, 8)]:
        part = fc_state(start, end, fill=0.0)
        bb, opt = [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)]
        ckpt.restore(path, cluster.init("local"), part, bb, opt)
        want = fc_state(start, end)
        np.testing.assert_array_equal(part.weight.numpy(), want.weight.numpy())
        np.testing.assert_array_equal(part.slots["momentum"].numpy(), want.slots["momentum"].numpy())
        np.testing.assert_array_equal(part.slots["count"].numpy(), np.arange(start, end))
        assert bb[0].numpy().sum() == 6 and int(opt[0].numpy()) == 1


def test_interrupted_write_leaves_the_previous_checkpoint_and_is_cleaned_up(tmp_path):
    first = save(tmp_path, 2, fc_state(0, 5))
    crashed = tmp_path / "ckpt-000000004.tmp"
    (crashed / "fc").mkdir(parents=True)
    (crashed / "fc" / "weight.00000.bin").write_bytes(b"half")
    assert ckpt.latest(str(tmp_path)) == first  # a directory without a manifest is never loaded
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.read_manifest(str(crashed))
    save(tmp_path, 4, fc_state(0, 5))
    assert not crashed.exists()
    assert ckpt.latest(str(tmp_path)).endswith("ckpt-000000004")


def test_only_the_newest_are_kept(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, fc_state(0, 3), keep=2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["ckpt-000000004", "ckpt-000000005"]


def test_truncated_or_foreign_files_are_named(tmp_path):
    path = save(tmp_path, 1, fc_state(0, 6))
    shard = os.path.join(path, "fc", "momentum.00000.bin")
    with open(shard, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ckpt.CheckpointError, match=r"momentum\.00000\.bin: 10 bytes, expected 96"):
        ckpt.restore(path, cluster.init("local"), fc_state(0, 6), [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)])
    with pytest.raises(ckpt.CheckpointError, match=r"backbone\.npz: variable 0 .* shape \[2, 3\]"):
        ckpt.restore_backbone(path, [tf.Variable(tf.zeros([3, 2]))])
    with pytest.raises(ckpt.CheckpointError, match="optimizer state is"):
        state = fc_state(0, 6)
        state.slots.pop("count")
        ckpt.restore(path, cluster.init("local"), state, [], [])
    manifest = ckpt.read_manifest(path)
    with pytest.raises(ckpt.CheckpointError, match="embedding_dim=4 but the config says 8"):
        ckpt.check_compatible(path, manifest, 6, 8)


def test_rows_per_class_must_match(tmp_path):
    state = fc_state(0, 6)
    state.rows_per_class = 3  # two classes of three sub-centers
    path = save(tmp_path, 1, state)
    assert ckpt.rows_per_class(path) == 3
    with pytest.raises(ckpt.CheckpointError, match="3 row\\(s\\) per class .* this run's margin has 1"):
        ckpt.restore(path, cluster.init("local"), fc_state(0, 6), [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)])


def test_margin_statistics_are_kept_once_and_restored_at_any_range(tmp_path):
    state = fc_state(0, 10)
    state.margin_state["t"] = tf.Variable(0.375)
    path = save(tmp_path, 1, state)
    assert ckpt.read_manifest(path)["fc"]["margin_state"] == {"t": 0.375}
    for start, end in [(0, 4), (4, 10)]:  # two workers of another world size read the same value
        part = fc_state(start, end, fill=0.0)
        part.margin_state["t"] = tf.Variable(0.0)
        ckpt.restore(path, cluster.init("local"), part, [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)])
        assert float(part.margin_state["t"].numpy()) == 0.375
