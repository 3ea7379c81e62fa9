"""cluster/: backend selection, the single-process cluster, and real Horovod collectives."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, horovodrun, worker_env

import cluster


def test_local_cluster_is_default_and_cached():
    comm = cluster.init()
    assert comm.backend == "local"
    assert (comm.rank, comm.size, comm.local_rank, comm.local_size) == (0, 1, 0, 1)
    assert cluster.init() is comm and cluster.init("auto") is comm


def test_local_collectives_are_identity_with_gradients():
    comm = cluster.init()
    x = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(comm.allgather(x) * 3.0) + tf.reduce_sum(comm.allreduce_sum(x))
    np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.full((2, 2), 4.0))
    np.testing.assert_array_equal(comm.allreduce_max(x).numpy(), x.numpy())
    np.testing.assert_array_equal(comm.reduce_scatter_sum(x).numpy(), x.numpy())
    comm.barrier()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown cluster backend 'mpi'"):
        cluster.init("mpi")


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3])
def test_horovod_collectives_and_gradients(n):
    proc = horovodrun(n, "tests/workers/collectives_worker.py", str(n))
    for r in range(n):
        assert f"OK rank {r} of {n}" in proc.stdout


@pytest.mark.slow
def test_launcher_without_horovod_is_a_clear_error():
    # Pretend horovodrun started us, but make `import horovod` fail.
    code = (
        "import sys; sys.modules['horovod'] = None\n"
        "import cluster\n"
        "try:\n    cluster.init()\nexcept RuntimeError as e:\n    print('ERR', e); sys.exit(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=worker_env(HOROVOD_RANK="0", HOROVOD_SIZE="2"),
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "started by a distributed launcher" in proc.stdout
    assert "HOROVOD_RANK" in proc.stdout and "Horovod cannot be imported" in proc.stdout


@pytest.mark.slow
def test_workers_with_different_batch_sizes_fail_loudly():
    proc = horovodrun(2, "tests/workers/uneven_batch_worker.py", check=False, timeout=180)
    assert proc.returncode != 0
    assert "NO ERROR" not in proc.stdout
    assert "workers disagree on the local batch size" in proc.stdout + proc.stderr
