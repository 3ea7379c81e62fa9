"""`pfc train` as users run it: single-node mode with no launcher, its log, checkpoints, `pfc eval`,
`pfc export` and `pfc report` on the real run, and clear errors before any work."""

import importlib.util
import json
import re
import subprocess

import pytest
from helpers import BIN, ROOT, smoke_overrides, worker_env

pytestmark = pytest.mark.slow  # every test runs the pfc command


def pfc(*argv, timeout=300):
    return subprocess.run(
        [str(BIN / "pfc"), *argv], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout
    )


def test_single_node_train_eval_export_report(synth_dataset, tmp_path):
    run_dir = tmp_path / "run"
    sets = smoke_overrides(synth_dataset, run_dir, 20)
    proc = pfc("train", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training C=40 D=128 on 1 worker(s)" in proc.stdout
    # quiet by default: XLA compiled the step, but none of its Abseil INFO lines reach the user
    assert "XLA" not in proc.stderr and "absl::InitializeLog" not in proc.stderr, proc.stderr[-2000:]
    assert "step 20/20" in proc.stdout and "eval step 20: verification: acc" in proc.stdout
    assert "TAR@FAR=0.001 n/a (40 different pairs; FAR=0.001 needs 1000)" in proc.stdout
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    progress = [x for x in lines if "loss" in x]
    assert [x["step"] for x in progress] == [5, 10, 15, 20]
    assert all(k in progress[0] for k in ("epoch", "accuracy", "lr", "samples_per_sec", "time"))
    evals = [x for x in lines if "eval" in x]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval"]["verification"]["accuracy"] <= 1.0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert ckpts == ["ckpt-000000010", "ckpt-000000020"]

    proc = pfc("eval", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 0 and proc.stdout.startswith("step 20  verification: acc"), proc.stderr[-2000:]
    from test_ijb import write_set  # a small IJB-C layout: 6 identities x 3 templates

    write_set(tmp_path / "ijbc", {100 * i + k: i for i in range(6) for k in range(3)})
    proc = pfc(
        "eval",
        "--config",
        "configs/smoke.yaml",
        *sets,
        "--ijb",
        str(tmp_path / "ijbc"),
        "--json",
        str(tmp_path / "eval.json"),
    )
    assert proc.returncode == 0 and "ijbc: TAR@FAR=1e-06 n/a" in proc.stdout, proc.stderr[-2000:]
    ijb_out = json.loads((tmp_path / "eval.json").read_text())["ijb"]
    assert ijb_out["tar_at_far"]["1e-01"] is not None and 0 <= ijb_out["tar_at_far"]["1e-01"] <= 1

    onnx = ["--onnx", str(tmp_path / "model.onnx")] if importlib.util.find_spec("tf2onnx") else []
    proc = pfc("export", str(run_dir / "checkpoints" / "ckpt-000000020"), str(tmp_path / "model"), *onnx)
    assert proc.returncode == 0 and (tmp_path / "model" / "saved_model.pb").exists(), proc.stderr[-2000:]
    assert not onnx or ((tmp_path / "model.onnx").stat().st_size > 0 and "ONNX: uint8" in proc.stdout)
    proc = pfc("embed", str(tmp_path / "model"), str(synth_dataset), str(tmp_path / "emb.npy"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    import numpy as np

    emb = np.load(tmp_path / "emb.npy")
    names = (tmp_path / "emb.names.txt").read_text().splitlines()
    assert emb.shape == (400, 128) and len(names) == 400 and len(set(names)) == 400
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)

    proc = pfc("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"loss.png", "accuracy.png", "throughput.png", "verification.png"} <= {
        p.name for p in (run_dir / "report").iterdir()
    }
    # the real log's evaluation holds thresholds and pair counts too: only accuracy and TAR are drawn
    from launch.report import read_log, verification_series

    series = verification_series(read_log(run_dir / "log.jsonl"))
    # 40 different pairs cannot measure FAR 1e-3: no TAR is drawn, and the line says why
    assert list(series["accuracy"]) == ["verification"] and list(series["tar"]) == []
    assert evals[0]["eval"]["verification"]["tar"] is None
    ((step, acc, std),) = series["accuracy"]["verification"]
    assert step == 20 and acc == evals[0]["eval"]["verification"]["accuracy"] and std is not None

    # Resuming a finished run has nothing to do: an error that says so, not a silent zero-step run.
    proc = pfc("train", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 1 and "resumed from" in proc.stdout and "step 20/20" not in proc.stdout
    assert "nothing is left to train" in proc.stderr and "Traceback" not in proc.stderr


def test_errors_before_any_work(synth_dataset, tmp_path):
    proc = pfc(
        "train",
        "--config",
        "configs/smoke.yaml",
        *smoke_overrides(synth_dataset, tmp_path, 5),
        "--set",
        "fc.sample_rate=1.5",
    )
    assert proc.returncode == 1
    assert "pfc train: error: configs/smoke.yaml: fc.sample_rate: must be <= 1" in proc.stderr
    proc = pfc("train", "--config", "configs/smoke.yaml", *smoke_overrides(tmp_path / "nowhere", tmp_path, 5))
    assert proc.returncode == 1 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    proc = pfc(
        "train",
        "--config",
        "configs/smoke.yaml",
        *smoke_overrides(synth_dataset, tmp_path, 5),
        "--set",
        "data.num_classes=41",
    )
    assert proc.returncode == 1 and "data.num_classes is 41 but the dataset" in proc.stderr
    proc = pfc(
        "eval",
        "--config",
        "configs/smoke.yaml",
        *smoke_overrides(synth_dataset, tmp_path, 5),
        "--checkpoint",
        str(tmp_path),
    )
    assert proc.returncode == 1 and "not a checkpoint" in proc.stderr


def test_launch_scripts_for_one_host_and_a_hostfile(synth_dataset, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# workers\nlocalhost slots=2\n")
    env = worker_env(PATH=f"{BIN}:{worker_env()['PATH']}")
    for name, argv in (
        ("local", ["launch/run_local.sh", "configs/smoke.yaml", "2"]),
        ("hostfile", ["launch/run_hostfile.sh", str(hostfile), "configs/smoke.yaml"]),
    ):
        run_dir = tmp_path / name
        proc = subprocess.run(
            ["bash", *argv, *smoke_overrides(synth_dataset, run_dir, 4, "eval.interval=0")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "on 2 worker(s)" in proc.stdout and "step 4/4" in proc.stdout, name
    empty = tmp_path / "empty"
    empty.write_text("# nobody\n")
    proc = subprocess.run(
        ["bash", "launch/run_hostfile.sh", str(empty), "configs/smoke.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "no hosts" in proc.stderr


def test_corrupt_records_name_the_config_key_or_are_counted_where_the_user_looks(synth_dataset, tmp_path):
    """Strict mode: one line naming the file, the record and data.skip_corrupt, no TensorFlow
    wrapping. Skip mode: the skipped records in the progress line and log.jsonl, exporter off."""
    import shutil

    from pipelines_helpers import flip_byte

    data = tmp_path / "data"
    shutil.copytree(synth_dataset, data)
    shard = sorted(data.glob("train-*.tfrecord"))[0]
    for record in (5, 40, 77):
        flip_byte(str(shard), record)
    sets = smoke_overrides(data, tmp_path / "strict", 20, "monitoring.port=0")
    proc = pfc("train", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 1, proc.stdout[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pfc train: error: corrupt record in file {shard} at record index "), line
    assert "set data.skip_corrupt: true" in line and "function_node" not in line and "[" not in line
    sets = smoke_overrides(data, tmp_path / "skip", 20, "monitoring.port=0", "data.skip_corrupt=true")
    proc = pfc("train", "--config", "configs/smoke.yaml", *sets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"step 20/20 .* \| \d+ corrupt records skipped", proc.stdout), proc.stdout[-2000:]
    last = [json.loads(x) for x in (tmp_path / "skip" / "log.jsonl").read_text().splitlines() if '"loss"' in x][-1]
    assert last["corrupt_records"] >= 3
