"""Quiet by default: TensorFlow's and XLA's start-up INFO lines kept off the user's terminal.

`TF_CPP_MIN_LOG_LEVEL=2` silences TensorFlow's own logger, but XLA logs through Abseil before
anything initializes it, and Abseil then writes every INFO line to stderr whatever the level
(`XLA service ... initialized`, `Compiled cluster using XLA!`). No setting turns that off, so
`quiet()` puts a filter process between this process's file descriptor 2 and the real stderr:
it drops Abseil INFO lines and the banner announcing them, and passes everything else through
unchanged. A process, not a thread: when this one dies (even by a fatal signal) the pipe closes
and the filter still writes out every line it was given, so no error message is lost.

`pfc --verbose ...` or `PFC_VERBOSE=1` keeps everything (and TensorFlow's INFO lines).
No TensorFlow here: it must act before TensorFlow loads.
"""

from __future__ import annotations

import os
import re
import signal
import sys

VERBOSE_ENV = "PFC_VERBOSE"

# Abseil's INFO prefix: "I1203 10:54:12.250948    8707 file.cc:188] ..." (I0000 00:00:<epoch>
# before Abseil's clock is set); W/E/F lines are kept.
_ABSL_INFO = re.compile(rb"^I\d{4} \d\d:\d\d:\d\d?\S* +\d+ [\w./-]+:\d+\] ")
_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def is_noise(line: bytes) -> bool:
    """True for a stderr line the quiet mode drops (an Abseil INFO line or its banner)."""
    return line.rstrip(b"\r\n") == _BANNER or bool(_ABSL_INFO.match(line))


def verbose_requested(argv: list[str], environ=os.environ) -> bool:
    return "--verbose" in argv or environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet() -> None:
    """Route fd 2 through a filter process (once per process; before any thread starts)."""
    if os.environ.get("_PFC_STDERR_FILTERED") == str(os.getpid()):
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the filter: reads until every writer has closed the pipe
        os.close(write_end)
        _filter(read_end, 2)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.environ["_PFC_STDERR_FILTERED"] = str(os.getpid())


def _filter(read_end: int, out: int) -> None:
    """The filter process's whole life: copy lines from `read_end` to `out`, dropping noise."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # outlive the worker long enough to drain the pipe
    with os.fdopen(read_end, "rb", buffering=0) as src:
        for line in _lines(src):
            if not is_noise(line):
                _write_all(out, line)
    os._exit(0)


def _lines(src):
    """Lines of an unbuffered binary stream as they arrive (a partial last line included)."""
    pending = b""
    while chunk := src.read(65536):
        pending += chunk
        *done, pending = pending.split(b"\n")
        yield from (d + b"\n" for d in done)
    if pending:
        yield pending


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data) :]
        except OSError:  # the reader of stderr went away: nothing left to tell
            return
