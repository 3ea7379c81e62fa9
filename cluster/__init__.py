"""Who am I, who are my peers, and the collectives with correct gradients.

    import cluster
    comm = cluster.init()          # Horovod under horovodrun, else a single-process cluster
    comm.rank, comm.size, comm.local_rank, comm.local_size
    comm.allgather(x); comm.allreduce_sum(x); comm.allreduce_max(x); comm.reduce_scatter_sum(x)
    comm.broadcast_variables(vars); comm.barrier()

`init()` may be called any number of times: it returns the same cluster.
"""

from __future__ import annotations

import os

from cluster.base import Cluster
from cluster.local import LocalCluster

__all__ = ["Cluster", "LocalCluster", "init", "launched_by_horovod", "BACKENDS"]

BACKENDS = ("auto", "local", "horovod")

# Variables that horovodrun (Gloo) or an MPI launcher sets in every worker's environment.
_LAUNCHER_VARS = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_GLOO_RENDEZVOUS_ADDR", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")

_cluster: Cluster | None = None


def launched_by_horovod() -> bool:
    """True when this process was started by horovodrun / mpirun."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def init(backend: str | None = None) -> Cluster:
    """Return this process's cluster, creating it on the first call.

    backend: "auto" (default; also from $PFC_CLUSTER): Horovod when a launcher started the
    process, else the single-process cluster. "horovod" or "local" force one.
    """
    global _cluster
    backend = backend or os.environ.get("PFC_CLUSTER", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"unknown cluster backend {backend!r}; expected one of {BACKENDS}")
    if _cluster is not None:
        if backend != "auto" and backend != _cluster.backend:
            raise RuntimeError(
                f"cluster already initialised with backend {_cluster.backend!r}; "
                f"cannot switch to {backend!r} in the same process"
            )
        return _cluster
    if backend == "horovod" or (backend == "auto" and launched_by_horovod()):
        try:
            from cluster.hvd_backend import HorovodCluster
        except ImportError as e:
            started = [v for v in _LAUNCHER_VARS if v in os.environ]
            raise RuntimeError(
                "this process was started by a distributed launcher "
                f"({', '.join(started) or 'backend=horovod requested'}) but Horovod cannot be "
                f"imported: {e}. Install it with `make setup` (or see README, 'Install')."
            ) from e
        _cluster = HorovodCluster()
    else:
        _cluster = LocalCluster()
    return _cluster
