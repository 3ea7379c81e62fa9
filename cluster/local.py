"""The single-process cluster: world size 1, every collective is the identity."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from cluster.base import Cluster


class LocalCluster(Cluster):
    """One worker and no launcher: the single-node test mode. Needs nothing but TensorFlow."""

    backend = "local"

    rank = property(lambda self: 0)
    size = property(lambda self: 1)
    local_rank = property(lambda self: 0)
    local_size = property(lambda self: 1)

    def _allgather(self, x):
        return tf.identity(x)

    def _allreduce(self, x, op):
        if op not in ("sum", "max"):
            raise ValueError(f"unknown reduction {op!r}; expected 'sum' or 'max'")
        return tf.identity(x)

    def _reduce_scatter(self, x):
        return tf.identity(x)

    def broadcast_variables(self, variables: Sequence[tf.Variable], root: int = 0) -> None:
        if root != 0:
            raise ValueError(f"root={root} does not exist in a cluster of size 1")

    def barrier(self) -> None:
        return None
