"""What corrupt files, a full disk and crashed saves do to checkpoints: named errors, agreed by all
workers, a fallback to the previous checkpoint, nothing partial left behind."""

import builtins
import errno
import hashlib
import json
import os
import subprocess
import threading

import numpy as np
import pytest
import tensorflow as tf
from test_checkpoint import fc_state, save

import cluster
from cluster.base import Cluster
from launch import checkpoint as ckpt

LOCAL = cluster.init("local")


# --- a cluster of threads: several workers in one process, to test their agreement ----------


class _Group:
    def __init__(self, size: int):
        self.size, self.slots = size, [None] * size
        self.gate = threading.Barrier(size, timeout=20)  # a worker left waiting: BrokenBarrierError

    def exchange(self, rank: int, value):
        self.slots[rank] = value
        self.gate.wait()
        out = list(self.slots)
        self.gate.wait()
        return out


class ThreadCluster(Cluster):
    backend = "threads"

    def __init__(self, rank: int, group: _Group):
        self._rank, self.group = rank, group

    rank = property(lambda self: self._rank)
    size = property(lambda self: self.group.size)
    local_rank = property(lambda self: self._rank)
    local_size = property(lambda self: self.group.size)

    def _allgather(self, x):
        return tf.constant(np.concatenate(self.group.exchange(self._rank, x.numpy())))

    def barrier(self):
        self.group.exchange(self._rank, None)

    def _allreduce(self, x, op):
        raise NotImplementedError

    def _reduce_scatter(self, x):
        raise NotImplementedError

    def broadcast_variables(self, variables, root=0):
        raise NotImplementedError


def run_workers(size: int, fn):
    """fn(comm) on `size` thread workers -> per rank its result or the exception it raised."""
    group, out = _Group(size), [None] * size

    def work(rank):
        try:
            out[rank] = fn(ThreadCluster(rank, group))
        except BaseException as e:  # noqa: B036 - handed to the test
            out[rank] = e

    threads = [threading.Thread(target=work, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker is still waiting"
    return out


def ranges(num_classes: int, size: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, num_classes, size + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def save_as(comm, directory, step, num_classes=10, keep=3):
    state = fc_state(*ranges(num_classes, comm.size)[comm.rank])
    return ckpt.save(
        str(directory),
        step,
        comm,
        state,
        [tf.Variable(tf.ones([2, 3]) * step)],
        [tf.Variable(step)],
        {"num_classes": num_classes, "embedding_dim": 4},
        keep=keep,
    )


# --- helpers ---------------------------------------------------------------------------------


def flip(file, offset, bit=0x01):
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def truncate(file):
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)


def make_legacy(path):
    """What a checkpoint written before checksums looks like: no "files", no manifest digest."""
    manifest = ckpt.read_manifest(path)
    manifest.pop("files", None)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    if os.path.exists(os.path.join(path, "manifest.sha256")):
        os.remove(os.path.join(path, "manifest.sha256"))


def restore(path, start=0, end=6):
    state = fc_state(start, end, fill=0.0)
    bb, opt = [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)]
    ckpt.restore(path, LOCAL, state, bb, opt)
    return state, bb, opt


def sha256(file):
    with open(file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- checksums -------------------------------------------------------------------------------


def test_every_file_has_its_checksum_in_the_manifest(tmp_path):
    path = save(tmp_path, 1, fc_state(0, 6, dtype=tf.bfloat16))
    manifest = ckpt.read_manifest(path)
    on_disk = {os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "manifest.sha256"}
    for rel, want in manifest["files"].items():
        file = os.path.join(path, rel)
        assert want == {"sha256": sha256(file), "bytes": os.path.getsize(file)}, rel
    with open(os.path.join(path, "manifest.sha256")) as f:
        assert f.read() == f"{sha256(os.path.join(path, 'manifest.json'))}  manifest.json\n"
    with open(os.path.join(path, "fc", "rank.00000.json")) as f:
        local = json.load(f)
    assert set(local["checksums"]) == {
        "fc/weight.00000.bin",
        "fc/momentum.00000.bin",
        "fc/count.00000.bin",
        "backbone.npz",
        "backbone_optimizer.npz",
    }


@pytest.mark.parametrize("offset, bit", [(0, 0x01), (3, 0x40)], ids=["low-byte", "exponent-byte"])
def test_a_flipped_byte_in_a_shard_is_named(tmp_path, offset, bit):
    path = save(tmp_path, 1, fc_state(0, 6))
    flip(os.path.join(path, "fc", "weight.00000.bin"), 16 + 4 + offset, bit)  # row 1, column 1 (11.0)
    digest = r"[0-9a-f]{16}\.\.\."
    error = rf"fc/weight\.00000\.bin: checksum mismatch \(sha256 {digest} expected {digest}\)"
    with pytest.raises(ckpt.CheckpointError, match=error + ": the file is corrupt"):
        restore(path)
    with pytest.raises(ckpt.CheckpointError, match=error):
        ckpt.verify(path, (0, 6))
    with pytest.raises(ckpt.CheckpointError, match=error):
        list(ckpt.class_blocks(path))
    ckpt.verify(path, (6, 6))  # an empty range reads no shard, only the backbone


@pytest.mark.parametrize(
    "damage", [truncate, lambda f: flip(f, os.path.getsize(f) // 3)], ids=["truncated", "flipped-byte"]
)
@pytest.mark.parametrize("name", ["backbone.npz", "backbone_optimizer.npz"])
@pytest.mark.parametrize("legacy", [False, True], ids=["checksums", "no-checksums"])
def test_a_corrupt_backbone_file_is_named(tmp_path, damage, name, legacy):
    path = save(tmp_path, 1, fc_state(0, 6))
    if legacy:
        make_legacy(path)
    damage(os.path.join(path, name))
    found = (
        r"unreadable \(\w+: .*\): the file is corrupt or truncated"
        if legacy
        else r"(checksum mismatch|\d+ bytes, expected \d+)"
    )
    with pytest.raises(ckpt.CheckpointError, match=rf"{name.replace('.', '[.]')}: {found}"):
        restore(path)
    if name == "backbone.npz":
        with pytest.raises(ckpt.CheckpointError, match=rf"backbone\.npz: {found}"):
            ckpt.restore_backbone(path, [tf.Variable(tf.zeros([2, 3]))])


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    path = save(tmp_path, 3, fc_state(0, 6))
    make_legacy(path)
    state, bb, opt = restore(path)
    np.testing.assert_array_equal(state.weight.numpy(), fc_state(0, 6).weight.numpy())
    assert int(opt[0].numpy()) == 3
    ckpt.verify(path, (0, 6))
    assert ckpt.choose_resume(str(tmp_path), LOCAL, (0, 6)) == (
        path,
        ["ckpt-000000003 has no checksums (written before they were recorded): not verified"],
    )


def test_an_altered_manifest_is_caught(tmp_path):
    path = save(tmp_path, 3, fc_state(0, 6))
    file = os.path.join(path, "manifest.json")
    with open(file) as f:
        text = f.read()
    with open(file, "w") as f:
        f.write(text.replace('"step": 3', '"step": 4'))
    with pytest.raises(ckpt.CheckpointError, match=r"manifest\.json: checksum mismatch"):
        ckpt.read_manifest(path)


# --- choosing the checkpoint to resume from ---------------------------------------------------


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path):
    assert ckpt.choose_resume(str(tmp_path), LOCAL, (0, 6)) == (None, [])
    first, second, third = (save(tmp_path, s, fc_state(0, 6)) for s in (1, 2, 3))
    flip(os.path.join(third, "fc", "momentum.00000.bin"), 7)
    path, notes = ckpt.choose_resume(str(tmp_path), LOCAL, (0, 6))
    assert path == second
    assert len(notes) == 1
    assert notes[0].startswith(f"ckpt-000000003 is corrupt: {third}/fc/momentum.00000.bin: checksum mismatch")
    assert notes[0].endswith("; falling back to ckpt-000000002")
    state = fc_state(0, 6, fill=0.0)  # checked by choose_resume: restore need not hash it again
    ckpt.restore(path, LOCAL, state, [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)], verified=True)
    np.testing.assert_array_equal(state.weight.numpy(), fc_state(0, 6).weight.numpy())
    with pytest.raises(ckpt.CheckpointError, match=r"momentum\.00000\.bin: checksum mismatch"):
        ckpt.verify(third, (0, 6))  # an explicit path never falls back
    os.remove(os.path.join(second, "backbone_optimizer.npz"))
    path, notes = ckpt.choose_resume(str(tmp_path), LOCAL, (0, 6))
    assert path == first and len(notes) == 2
    assert "backbone_optimizer.npz: missing or unreadable (No such file or directory (ENOENT))" in notes[1]
    assert notes[1].endswith("; falling back to ckpt-000000001")


def test_every_checkpoint_corrupt_is_an_error_listing_them(tmp_path):
    for step in (1, 2):
        flip(os.path.join(save(tmp_path, step, fc_state(0, 6)), "backbone.npz"), 100)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.choose_resume(str(tmp_path), LOCAL, (0, 6))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}: every checkpoint is corrupt: ckpt-000000002: ")
    assert "; ckpt-000000001: " in message and message.count("backbone.npz: checksum mismatch") == 2


def test_workers_agree_on_the_fallback(tmp_path):
    for step in (1, 2):
        assert (
            run_workers(2, lambda comm, step=step: save_as(comm, tmp_path, step))
            == [str(tmp_path / ckpt.checkpoint_name(step))] * 2
        )
    bad = tmp_path / "ckpt-000000002" / "fc" / "weight.00001.bin"
    flip(bad, 0)
    out = run_workers(2, lambda comm: ckpt.choose_resume(str(tmp_path), comm, ranges(10, 2)[comm.rank]))
    (path0, notes0), (path1, notes1) = out
    assert path0 == path1 == str(tmp_path / "ckpt-000000001")
    assert notes0 == [
        "ckpt-000000002 is corrupt: worker 1 found a corrupt or missing file (see its log); "
        "falling back to ckpt-000000001"
    ]
    assert notes1[0].startswith(f"ckpt-000000002 is corrupt: {bad}: checksum mismatch")
    # At another world size the worker whose classes are in that file finds it.
    path, notes = ckpt.choose_resume(str(tmp_path), LOCAL, (0, 10))
    assert path == str(tmp_path / "ckpt-000000001") and str(bad) in notes[0]

    # An explicit path, and restoring it: the worker that did not see the bad file fails too.
    def explicit(comm):
        ckpt.verify(str(tmp_path / "ckpt-000000002"), ranges(10, 2)[comm.rank], comm)

    errors = run_workers(2, explicit)
    assert "worker 1 found a corrupt or missing file" in str(errors[0])
    assert f"{bad}: checksum mismatch" in str(errors[1])

    def restore_as(comm):
        start, end = ranges(10, 2)[comm.rank]
        ckpt.restore(
            str(tmp_path / "ckpt-000000002"),
            comm,
            fc_state(start, end, fill=0.0),
            [tf.Variable(tf.zeros([2, 3]))],
            [tf.Variable(0)],
        )

    errors = run_workers(2, restore_as)
    assert isinstance(errors[0], ckpt.CheckpointError) and "worker 1 cannot restore it" in str(errors[0])
    assert isinstance(errors[1], ckpt.CheckpointError) and "checksum mismatch" in str(errors[1])


# --- a full disk -------------------------------------------------------------------------------


class _FullFile:
    """A file whose writes fail with ENOSPC, like one on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk(monkeypatch, full: str):
    """Writes to files whose path ends with `full` fail with ENOSPC (in launch.checkpoint only)."""

    def fake_open(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        return _FullFile(f) if "w" in mode and str(file).endswith(full) else f

    monkeypatch.setattr(ckpt, "open", fake_open, raising=False)


@pytest.mark.parametrize(
    "full", ["fc/weight.00000.bin", "fc/count.00000.bin", "backbone.npz", "fc/rank.00000.json", "manifest.json"]
)
def test_a_full_disk_raises_a_named_error_and_leaves_nothing_partial(tmp_path, monkeypatch, full):
    first = save(tmp_path, 1, fc_state(0, 6))
    full_disk(monkeypatch, full)
    with pytest.raises(ckpt.CheckpointError) as info:
        save(tmp_path, 2, fc_state(0, 6))
    assert str(info.value) == (
        f"{tmp_path}/ckpt-000000002.tmp/{full}: cannot write the checkpoint: No space left on device "
        "(ENOSPC); the partial ckpt-000000002.tmp is removed, the earlier checkpoints are intact"
    )
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000001"]
    monkeypatch.undo()
    ckpt.verify(first, (0, 6))
    assert int(restore(first)[2][0].numpy()) == 1


def test_a_full_disk_on_one_worker_fails_every_worker(tmp_path, monkeypatch):
    run_workers(2, lambda comm: save_as(comm, tmp_path, 1))
    full_disk(monkeypatch, "fc/momentum.00001.bin")
    errors = run_workers(2, lambda comm: save_as(comm, tmp_path, 2))
    assert all(isinstance(e, ckpt.CheckpointError) for e in errors), errors
    assert str(errors[0]) == (
        f"{tmp_path}/ckpt-000000002.tmp: cannot write the checkpoint: worker 1 failed writing its files "
        "(see its error); the partial ckpt-000000002.tmp is removed, the earlier checkpoints are intact"
    )
    assert str(errors[1]).startswith(
        f"{tmp_path}/ckpt-000000002.tmp/fc/momentum.00001.bin: cannot write "
        "the checkpoint: No space left on device (ENOSPC)"
    )
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000001"]
    monkeypatch.undo()
    assert (
        run_workers(2, lambda comm: ckpt.choose_resume(str(tmp_path), comm, ranges(10, 2)[comm.rank]))
        == [(str(tmp_path / "ckpt-000000001"), [])] * 2
    )


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root and mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip() or proc.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk(small_disk):
    first = save(small_disk, 1, fc_state(0, 10))
    big = fc_state(0, 40000)  # weight and momentum 640 KB each: more than the 1 MiB disk holds
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"^{small_disk}/ckpt-000000002\.tmp/fc/\w+\.00000\.bin: "
        r"cannot write the checkpoint: No space left on device \(ENOSPC\); the partial "
        r"ckpt-000000002\.tmp is removed, the earlier checkpoints are intact$",
    ):
        save(small_disk, 2, big)
    assert sorted(os.listdir(small_disk)) == ["ckpt-000000001"]
    assert ckpt.choose_resume(str(small_disk), LOCAL, (0, 10)) == (first, [])
    save(small_disk, 3, fc_state(0, 10))  # the space came back: saving works again


# --- partial directories -----------------------------------------------------------------------


def test_remove_partial_removes_only_crashed_saves(tmp_path):
    assert ckpt.remove_partial(str(tmp_path / "none")) == []
    complete = save(tmp_path, 2, fc_state(0, 3))
    for name in ("ckpt-000000004.tmp", "ckpt-000000003.tmp"):
        (tmp_path / name / "fc").mkdir(parents=True)
        (tmp_path / name / "fc" / "weight.00000.bin").write_bytes(b"half")
    (tmp_path / "ckpt-000000005.tmp").write_text("a file, not a crashed save")
    (tmp_path / "notes.tmp").mkdir()
    assert ckpt.remove_partial(str(tmp_path)) == [
        str(tmp_path / "ckpt-000000003.tmp"),
        str(tmp_path / "ckpt-000000004.tmp"),
    ]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000002", "ckpt-000000005.tmp", "notes.tmp"]
    ckpt.verify(complete, (0, 3))
    assert ckpt.remove_partial(str(tmp_path)) == []


@pytest.mark.slow
def test_horovod_workers_agree_on_a_full_disk_and_on_the_fallback(tmp_path):
    from helpers import horovodrun

    proc = horovodrun(2, "tests/workers/checkpoint_faults_worker.py", str(tmp_path / "ckpt"), timeout=240)
    assert proc.stdout.count("OK rank") == 2, proc.stdout[-2000:]
