"""Shared by the tests that start processes: the repository's paths, a worker's environment,
horovodrun on localhost, system tools, and the smoke config pointed at a test dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def worker_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",
            "TF_NUM_INTRAOP_THREADS": "1",
            "TF_NUM_INTEROP_THREADS": "1",
        }
    )
    env.update(extra)
    return env


def need_tool(binary: str, package: str) -> str:
    """The path of a system tool the test needs, or a skip saying how to get it."""
    found = shutil.which(binary) or (f"/usr/bin/{binary}" if os.path.exists(f"/usr/bin/{binary}") else None)
    if not found:
        pytest.skip(f"{binary} not installed: `make test-tools` (as root) installs Debian's {package}")
    return found


def horovodrun(np_: int, *argv: str, timeout: float = 300, check: bool = True, env=None):
    """Run `horovodrun -np N --gloo python ARGV...` on localhost; return the CompletedProcess."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", sys.executable, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or worker_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def smoke_overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """`--set` arguments that point configs/smoke.yaml at a test dataset and a run directory."""
    sets = [
        f"data.train={data}",
        f"data.val=[{data}/verification.bin]",
        "data.num_classes=null",
        f"train.run_dir={run_dir}",
        f"train.steps={steps}",
        "train.batch_size=16",
        "optim.warmup_steps=2",
        "train.log_every=5",
        "checkpoint.every=10",
        *extra,
    ]
    return [a for s in sets for a in ("--set", s)]
