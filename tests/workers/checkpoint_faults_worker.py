"""Run by tests/test_checkpoint_faults.py under horovodrun -np 2: a full disk on worker 1 fails the
save on both workers, and both pick the same fallback past a shard only worker 1 reads.
Prints OK on success."""

import builtins
import errno
import os
import sys

import numpy as np
import tensorflow as tf

import cluster
from launch import checkpoint as ckpt

DIRECTORY = sys.argv[1]
comm = cluster.init("horovod")
RANGE = [(0, 5), (5, 10)][comm.rank]
BAD = os.path.join(DIRECTORY, "ckpt-000000002", "fc", "momentum.00001.bin")


def state(fill=None):
    v = np.arange(*RANGE, dtype=np.float32)[:, None] * 10 + np.arange(4)
    v = v if fill is None else np.full_like(v, fill)
    return ckpt.FCState(RANGE, tf.Variable(v), {"momentum": tf.Variable(-v)})


def save(step):
    return ckpt.save(
        DIRECTORY,
        step,
        comm,
        state(),
        [tf.Variable(tf.ones([2, 3]))],
        [tf.Variable(step)],
        {"num_classes": 10, "embedding_dim": 4},
    )


def full_disk(file, mode="r", *args, **kwargs):
    if comm.rank == 1 and "w" in mode and "momentum" in str(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
    return builtins.open(file, mode, *args, **kwargs)


def expect_error(fn, text):
    try:
        fn()
    except ckpt.CheckpointError as e:
        assert text in str(e), str(e)
        return
    raise AssertionError(f"rank {comm.rank}: no error")


save(1)
save(2)
ckpt.open = full_disk
expect_error(lambda: save(3), "No space left on device" if comm.rank == 1 else "worker 1 failed writing")
del ckpt.open
if comm.rank == 1:
    with open(BAD, "r+b") as f:
        f.write(b"\x00\x01")
comm.barrier()
path, notes = ckpt.choose_resume(DIRECTORY, comm, RANGE)
assert path.endswith("ckpt-000000001"), path
assert (BAD if comm.rank == 1 else "worker 1 found") in notes[0], notes
restored = state(fill=0.0)
ckpt.restore(path, comm, restored, [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)], verified=True)
np.testing.assert_array_equal(restored.weight.numpy(), state().weight.numpy())
expect_error(
    lambda: ckpt.restore(
        os.path.dirname(os.path.dirname(BAD)), comm, state(), [tf.Variable(tf.zeros([2, 3]))], [tf.Variable(0)]
    ),
    "checksum mismatch" if comm.rank == 1 else "worker 1 cannot restore it",
)
assert sorted(os.listdir(DIRECTORY)) == ["ckpt-000000001", "ckpt-000000002"]
print(f"OK rank {comm.rank}", flush=True)
