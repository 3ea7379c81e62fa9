"""The host allocator `pfc` runs TensorFlow on: set up before TensorFlow loads (no TensorFlow here)."""

from __future__ import annotations

import os

from pipelines.threads import cores_per_worker

# Variables in which horovodrun (Gloo) and Open MPI's mpirun give each worker its host's worker count.
_LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


# glibc's arena limit in this process as `configure` left it (None: glibc's default),
# for benchmarks to record with their figures.
arena_limit: int | None = None


def malloc_arenas(environ: dict[str, str], cpu_count: int) -> int:
    """glibc arenas for one worker: one per thread that decodes its input, and at least two.

    The reader decodes with this worker's share of the host's cores (`cores_per_worker`), and
    its record stream runs beside them; threads sharing an arena wait on its lock (on 2 cores
    two arenas gave the reader 13-25 % more images/s than one: docs/benchmarks.md). More
    arenas than threads only add free lists that hold on to freed memory.
    """
    local_size = 1
    for var in _LOCAL_SIZE_VARS:
        try:
            local_size = max(1, int(environ[var]))
            break
        except (KeyError, ValueError):
            continue
    return max(2, cores_per_worker(local_size, cpu_count))


def configure() -> None:
    """Host memory for shards of millions of rows: no allocator overhead that grows with the shard.

    TensorFlow's default CPU allocator (oneDNN's, a best-fit-with-coalescing pool) keeps a table
    of 8 bytes per 256 bytes of every region it reserves: 3 % more resident memory than the shard
    weights and optimizer state themselves (measured 33.6 B per bfloat16 row of 512, i.e. 0.6 GiB
    at 10M classes with momentum), and it caps its reservations at the RAM size (it refused a
    10 GiB momentum slot on a 24 GiB machine that had the memory). pfc uses the C allocator
    instead, tuned so the large per-step temporaries are reused rather than mapped and faulted in
    afresh every step (which made a step 1.5-2x slower): no mmap, no trimming at free, and few
    arenas (`malloc_arenas`: one per decoding thread, at least two; glibc's default of 8 per core
    multiplies the free lists). Measured: at 10M classes 0.38 instead of 1.17 GiB beyond
    weights + state (with the trim after the first step), FC steps 2-3 % slower than on the
    pool there, 2-19 % at 1M (docs/benchmarks.md, "Host allocator"). Must run before
    TensorFlow allocates anything or starts threads; explicit environment settings win
    (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0 restores the pool, MALLOC_ARENA_MAX etc. or their
    GLIBC_TUNABLES are used as given).
    """
    global arena_limit
    given = os.environ.get("MALLOC_ARENA_MAX")  # glibc reads it itself; 0 or junk: its default
    arena_limit = int(given) if given and given.isdecimal() and int(given) > 0 else None
    os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    if os.environ["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"].lower() not in ("1", "true"):
        # the pool, asked for: let it reserve up to twice the RAM (untouched pages cost nothing)
        try:
            with open("/proc/meminfo") as f:
                total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
            os.environ.setdefault("TF_MKL_ALLOC_MAX_BYTES", str(2 * total_kib * 1024))
        except (OSError, StopIteration, ValueError):
            pass
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: its own defaults
        return
    arenas = malloc_arenas(dict(os.environ), os.cpu_count() or 1)
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    # glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD -1, M_MMAP_MAX -4, M_ARENA_MAX -8;
    # each also settable as an environment variable or a tunable, which then wins.
    for env, tunable, param, value in (
        ("MALLOC_ARENA_MAX", "glibc.malloc.arena_max", -8, arenas),
        ("MALLOC_MMAP_MAX_", "glibc.malloc.mmap_max", -4, 0),
        ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold", -1, 2**31 - 1),
    ):
        if env not in os.environ and tunable not in tunables:
            mallopt(ctypes.c_int(param), ctypes.c_int(value))
            if param == -8:
                arena_limit = arenas
