"""Host memory settings of `pfc` (the allocator choice) and handing freed pages back."""
import os
import subprocess
import sys

import pytest

PROBE = ("import os; from launch import cli; cli._configure_host_memory(); "
         "print(os.environ.get('TF_ONEDNN_USE_SYSTEM_ALLOCATOR'), os.environ.get('TF_MKL_ALLOC_MAX_BYTES'))")


def _probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "TF_MKL_ALLOC_MAX_BYTES")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return out.stdout.split()


def test_pfc_uses_the_c_allocator_unless_told_otherwise():
    assert _probe() == ["1", "None"]
    allocator, cap = _probe(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="0")  # the pool, asked for
    assert allocator == "0" and int(cap) >= 2 * 1024**3           # its cap raised to 2x RAM
    assert _probe(TF_ONEDNN_USE_SYSTEM_ALLOCATOR="0", TF_MKL_ALLOC_MAX_BYTES="123") == ["0", "123"]


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
    assert int(out.stdout) > 200 * 1024             # KiB: most of the 300 MiB went back
