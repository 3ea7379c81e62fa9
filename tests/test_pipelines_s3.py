"""S3 end to end: write, inspect and read a dataset on an S3-protocol server started here (moto on
127.0.0.1). Every S3 step runs in its own process (tensorflow-io's S3 client aborts at interpreter
exit, so pfc and the reader script end with os._exit): the exit codes and outputs are checked."""

import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT, worker_env

MOTO = Path(sys.executable).parent / "moto_server"
pytestmark = [
    pytest.mark.slow,  # an S3 server and pfc processes
    pytest.mark.skipif(
        not MOTO.exists() and not shutil.which("moto_server"),
        reason="moto_server not installed (pip install -e '.[dev]')",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    port = _free_port()
    server = subprocess.Popen(
        [str(MOTO) if MOTO.exists() else "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(f"{url}/pfc-data", method="PUT"), timeout=5)
        yield worker_env(
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_REGION="us-east-1",
            S3_ENDPOINT=url,
            S3_USE_HTTPS="0",
            S3_VERIFY_SSL="0",
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


def _pfc(env, *argv, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "launch.cli", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


READ = textwrap.dedent("""
    import sys
    from pipelines import reader, storage, verification
    pipe = reader.open_dataset(sys.argv[1], 4, epochs=1, seed=0)
    labels = sorted(int(v) for _, y, _ in pipe.dataset for v in y.numpy())
    imgs, same = verification.load_bin(sys.argv[1] + "/verification.bin", (16, 16))
    print("labels", labels, "steps", pipe.steps_per_epoch, "bin", imgs.shape, int(same.sum()), flush=True)
    storage.exit_process(0)
""")


def test_s3_synth_inspect_read(s3_env):
    url = "s3://pfc-data/synth"
    p = _pfc(
        s3_env,
        "data",
        "synth",
        url,
        "--identities",
        "4",
        "--images-per-identity",
        "3",
        "--shards",
        "3",
        "--size",
        "16",
        "--verification-pairs",
        "3",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "wrote 12 images of 4 identities in 3 shards" in p.stdout
    p = _pfc(s3_env, "data", "inspect", url)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "records     12 read (12 in the manifest)" in p.stdout
    p = subprocess.run(
        [sys.executable, "-c", READ, url], cwd=ROOT, env=s3_env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # 12 records, batch 4: 3 steps, every record once
    assert f"labels {sorted([0, 1, 2, 3] * 3)} steps 3 bin (12, 16, 16, 3) 3" in p.stdout


def test_s3_unreadable_url_is_a_clear_error(s3_env):
    p = _pfc(s3_env, "data", "inspect", "s3://pfc-data/no-such-dataset")
    assert p.returncode == 1, p.stdout + p.stderr  # 1, not 134 (abort at exit)
    assert "pfc data: error: s3://pfc-data/no-such-dataset" in p.stderr
