"""Horovod (Gloo on CPU, NCCL on GPU) as the cluster backend. The only module importing horovod."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import horovod.tensorflow as hvd  # cluster.init() turns an ImportError here into a clear error
import tensorflow as tf

from cluster.base import Cluster

_PEER_LOST = (
    "Horovod has been shut down",
    "HorovodInternalError",
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "gloo::IoException",
    "gloo/transport",
)


class HorovodCluster(Cluster):
    """Workers started by `horovodrun` (or `mpirun` with an MPI-enabled Horovod)."""

    backend = "horovod"

    def __init__(self) -> None:
        hvd.init()
        self._hvd = hvd
        self._barriers = itertools.count()

    rank = property(lambda self: self._hvd.rank())
    size = property(lambda self: self._hvd.size())
    local_rank = property(lambda self: self._hvd.local_rank())
    local_size = property(lambda self: self._hvd.local_size())

    def _allgather(self, x):
        return self._hvd.allgather(x)

    def _allreduce(self, x, op):
        ops = {"sum": self._hvd.Sum, "max": self._hvd.Max}
        if op not in ops:
            raise ValueError(f"unknown reduction {op!r}; expected one of {sorted(ops)}")
        return self._hvd.allreduce(x, op=ops[op])

    def _reduce_scatter(self, x):
        # Horovod's default reduction here is Average: ask for Sum explicitly.
        return self._hvd.reducescatter(x, op=self._hvd.Sum)

    def broadcast_variables(self, variables: Sequence[tf.Variable], root: int = 0) -> None:
        self._hvd.broadcast_variables(list(variables), root_rank=root)

    def barrier(self) -> None:
        # Horovod's TensorFlow binding has no barrier; a named scalar allreduce is one.
        self._hvd.allreduce(tf.zeros([1]), op=self._hvd.Sum, name=f"pfc_barrier_{next(self._barriers)}")

    def peer_lost(self, error: BaseException) -> bool:
        """Horovod's words when a peer's process ends or its connection drops mid-collective
        (Gloo's transport errors, then Horovod's background loop shutting down)."""
        text = str(error)
        return any(sign in text for sign in _PEER_LOST)

    def shutdown(self) -> None:
        self._hvd.shutdown()
