"""One trainer per run directory: worker 0 holds an exclusive lock on the run and checkpoint
directories for the whole run, and a second trainer fails at once, naming the holder.

The lock is a POSIX record lock (`fcntl.lockf`) on `DIR/.pfc-train.lock`: the kernel drops it when
the holder exits, however it exits (SIGKILL included), so a crash never leaves a stale lock. POSIX
locks work on local disks and on NFS (v3 through the lock manager, v4 natively). They belong to a
process, so a second trainer inside the same process is caught by `_held`. The file holds the
holder's host, pid and start time for the message; it is left in place when the run ends (removing
it would race with the next trainer opening it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence

LOCK_NAME = ".pfc-train.lock"
_held: dict[int, str] = {}  # descriptor -> lock file, of the locks this process holds


class RunLockError(RuntimeError):
    """Another trainer holds the run: the message names the directory and the holder."""


def holder_text(file: str) -> str:
    """'pid P on host H since T' from a lock file, or what is known."""
    try:
        with open(file) as f:
            info = json.load(f)
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a trainer that has not written its name yet"


def _busy(directory: str, file: str) -> RunLockError:
    return RunLockError(
        f"{directory}: another trainer is using this directory ({holder_text(file)}; "
        f"lock {file}): stop it, or give this run another train.run_dir / checkpoint.dir"
    )


def _identity() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv)[:500],
    }


def _lock_one(directory: str) -> int:
    """Lock `directory` for this process; -> the open descriptor that holds the lock."""
    os.makedirs(directory, exist_ok=True)
    file = os.path.join(directory, LOCK_NAME)
    if os.path.realpath(file) in _held.values():
        raise _busy(directory, file)
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise _busy(directory, file) from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_identity()).encode())
    os.fsync(fd)
    _held[fd] = os.path.realpath(file)
    return fd


def _unlock(fd: int) -> None:
    _held.pop(fd, None)
    os.close(fd)  # closing the descriptor releases the lock


def distinct(directories: Sequence[str]) -> list[str]:
    """The directories to lock: each once, a checkpoint folder inside the run folder included
    (checkpoint.dir may be shared by other runs' run folders)."""
    return list(dict.fromkeys(os.path.realpath(d) for d in directories))


@contextlib.contextmanager
def hold(directories: Sequence[str]) -> Iterator[None]:
    """Lock every directory (all or none) for the `with` body."""
    fds: list[int] = []
    try:
        for d in distinct(directories):
            fds.append(_lock_one(d))
        yield
    finally:
        for fd in fds:
            _unlock(fd)
