"""Host memory settings of `pfc` (the allocator choice) and handing freed pages back."""

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os; from launch import host_memory; host_memory.configure(); "
    "print(os.environ.get('TF_ONEDNN_USE_SYSTEM_ALLOCATOR'), os.environ.get('TF_MKL_ALLOC_MAX_BYTES'))"
)


def _probe(**env):
    clean = {
        k: v for k, v in os.environ.items() if k not in ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "TF_MKL_ALLOC_MAX_BYTES")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


@pytest.mark.slow
def test_pfc_uses_the_c_allocator_unless_told_otherwise():
    assert _probe() == ["1", "None"]
    allocator, cap = _probe(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="0")  # the pool, asked for
    assert allocator == "0" and int(cap) >= 2 * 1024**3  # its cap raised to 2x RAM
    assert _probe(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="0", TF_MKL_ALLOC_MAX_BYTES="123") == ["0", "123"]


def test_malloc_arenas_one_per_decoding_thread_at_least_two():
    from launch.host_memory import malloc_arenas

    assert malloc_arenas({}, 2) == 2  # this CI machine
    assert malloc_arenas({}, 1) == 2  # never fewer than two
    assert malloc_arenas({}, 16) == 16  # one worker: all cores decode
    assert malloc_arenas({"HOROVOD_LOCAL_SIZE": "8"}, 96) == 12  # horovodrun: 8 workers share 96
    assert malloc_arenas({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 16) == 4  # mpirun
    assert malloc_arenas({"HOROVOD_LOCAL_SIZE": "x", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 8) == 4


ARENAS = """
import ctypes, os, re, tempfile, threading
from launch import host_memory
host_memory.configure()
libc = ctypes.CDLL('libc.so.6')
hold, alive = [], threading.Barrier(8, timeout=60)
def grab():                                      # a thread's first malloc picks (or makes) its arena;
    hold.append(ctypes.create_string_buffer(1 << 16))
    alive.wait()                                 # all alive at once, so none hands its arena on
threads = [threading.Thread(target=grab) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix='.xml') as f:
    fp = libc.fopen(f.name.encode(), b'w')
    libc.malloc_info(0, ctypes.c_void_p(fp)); libc.fclose(ctypes.c_void_p(fp))
    print(len(re.findall(r'<heap nr=', open(f.name).read())), host_memory.arena_limit)
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_info")
def test_pfc_limits_the_arenas_that_threads_spread_over():
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "TF_ONEDNN", "GLIBC_TUNABLES", "HOROVOD_", "OMPI_"))
    }
    cpus = os.cpu_count() or 1

    def arenas(**env):  # (arenas 9 live threads spread over, the limit recorded for benchmarks)
        out = subprocess.run(
            [sys.executable, "-c", ARENAS], env={**clean, **env}, capture_output=True, text=True, check=True
        )
        n, limit = out.stdout.split()
        return int(n), None if limit == "None" else int(limit)

    from launch.host_memory import malloc_arenas

    assert arenas(OMPI_COMM_WORLD_LOCAL_SIZE=str(cpus)) == (2, 2)  # one core per worker: two
    mine = malloc_arenas(clean, cpus)
    assert arenas() == (min(mine, 9), mine)  # pfc's choice (9 threads)
    assert arenas(MALLOC_ARENA_MAX="1") == (1, 1)  # an explicit setting wins,
    assert arenas(GLIBC_TUNABLES="glibc.malloc.arena_max=1")[0] == 1  # as a tunable too
    assert arenas(MALLOC_ARENA_MAX="0")[1] is None  # 0: glibc's default, recorded so
    default, limit = arenas(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="0")  # the pool: glibc's defaults
    assert limit is None and default > 2


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_returns_freed_pages():
    code = """
import ctypes
from partitioned_fc.memory import release_free_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
libc = ctypes.CDLL('libc.so.6')
libc.mallopt(-4, 0)                              # as pfc sets it: no mmap,
libc.mallopt(-1, 2**31 - 1)                      # no trim at free: freed blocks stay resident
blocks = [ctypes.create_string_buffer(1 << 20) for _ in range(300)]
del blocks
before = rss()
assert release_free_memory()
print(before - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 200 * 1024  # KiB: most of the 300 MiB went back
