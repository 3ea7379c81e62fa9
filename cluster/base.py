"""The cluster interface: identity of this worker and the collectives, with gradients.

Gradient convention (used by every differentiable collective here): the gradient a worker
computes for a tensor is its *share*; the full gradient of a quantity is the sum of the shares
of all workers. Under it the adjoints are exact:

    allgather        <->  reduce_scatter_sum     (the rows of the summed shares)
    allreduce_sum    <->  allreduce_sum

Horovod's own registered allgather gradient averages instead of summing (1/N of the true
gradient, measured), so it is never used: every collective below carries its own gradient.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import tensorflow as tf


class Cluster(abc.ABC):
    """Who this worker is and how it talks to its peers.

    Every collective works eagerly and inside `tf.function`, and every worker must call the
    same collectives in the same order (as with any SPMD program).
    """

    backend: str = "abstract"

    @property
    @abc.abstractmethod
    def rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def size(self) -> int: ...

    @property
    @abc.abstractmethod
    def local_rank(self) -> int: ...

    @property
    @abc.abstractmethod
    def local_size(self) -> int: ...

    # -- raw collectives, no gradient; the backends implement these -------------------------
    @abc.abstractmethod
    def _allgather(self, x: tf.Tensor) -> tf.Tensor:
        """[b, ...] on every worker -> [size * b, ...], rank order."""

    @abc.abstractmethod
    def _allreduce(self, x: tf.Tensor, op: str) -> tf.Tensor:
        """Elementwise reduction over workers; op is "sum" or "max"."""

    @abc.abstractmethod
    def _reduce_scatter(self, x: tf.Tensor) -> tf.Tensor:
        """[size * b, ...] -> [b, ...]: this worker's rows of the sum over workers."""

    @abc.abstractmethod
    def broadcast_variables(self, variables: Sequence[tf.Variable], root: int = 0) -> None:
        """Assign the root worker's values to `variables` on every worker."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return only when every worker has reached this call (eager only)."""

    # -- differentiable collectives -----------------------------------------------------------
    def allgather(self, x: tf.Tensor) -> tf.Tensor:
        """[b, ...] -> [size * b, ...]; gradient: reduce-scatter of SUMS.

        Every worker must pass the same `b` (checked by the callers that need it).
        """
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            return self._allgather(x)

        @tf.custom_gradient
        def _gather(t):
            def grad(dy):
                return self._reduce_scatter(dy)

            return self._allgather(t), grad

        return _gather(x)

    def reduce_scatter_sum(self, x: tf.Tensor) -> tf.Tensor:
        """[size * b, ...] -> [b, ...]; gradient: allgather."""
        x = tf.convert_to_tensor(x)

        @tf.custom_gradient
        def _rs(t):
            def grad(dy):
                return self._allgather(dy)

            return self._reduce_scatter(t), grad

        return _rs(x)

    def allreduce_sum(self, x: tf.Tensor) -> tf.Tensor:
        """Sum over workers; gradient: the sum over workers of the upstream shares."""
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            return self._allreduce(x, "sum")

        @tf.custom_gradient
        def _sum(t):
            def grad(dy):
                return self._allreduce(dy, "sum")

            return self._allreduce(t, "sum"), grad

        return _sum(x)

    def allreduce_max(self, x: tf.Tensor) -> tf.Tensor:
        """Elementwise max over workers. Not differentiable (used for stabilizers and argmax)."""
        return tf.stop_gradient(self._allreduce(tf.convert_to_tensor(x), "max"))

    def peer_lost(self, error: BaseException) -> bool:
        """Whether a failed collective means a peer stopped (a single process has none)."""
        return False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(backend={self.backend!r}, rank={self.rank}, size={self.size}, "
            f"local_rank={self.local_rank}, local_size={self.local_size})"
        )
