import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def worker_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"})
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
    cmd = [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}", "--gloo",
           sys.executable, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or worker_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """A small synthetic identity dataset (40 identities x 10 JPEGs of 32x32, 2 shards) with its
    verification.bin, written once per session by the pipelines' own writer."""
    from pipelines.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("synth") / "data"
    write_synth(str(out), SynthConfig(identities=40, images_per_identity=10, size=32,
                                      verification_pairs=40), num_shards=2)
    return out


def smoke_overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """`--set` arguments that point configs/smoke.yaml at a test dataset and a run directory."""
    sets = [f"data.train={data}", f"data.val=[{data}/verification.bin]", "data.num_classes=null",
            f"train.run_dir={run_dir}", f"train.steps={steps}", "train.batch_size=16",
            "optim.warmup_steps=2", "train.log_every=5", "checkpoint.every=10", *extra]
    return [a for s in sets for a in ("--set", s)]
