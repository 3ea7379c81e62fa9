"""How many threads a worker's input pipeline gets. No TensorFlow here: `pfc` sizes its
allocator from it before TensorFlow loads (launch/host_memory.py)."""

from __future__ import annotations

import os


def cores_per_worker(workers_on_host: int, cpu_count: int | None = None) -> int:
    """This worker's share of the host's cores (`cpu_count`, default all): the `threads` to give
    `reader.open_dataset`, which decodes with that many."""
    return max(1, (cpu_count or os.cpu_count() or 1) // max(1, workers_on_host))
