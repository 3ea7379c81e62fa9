"""Faults an operator meets: skipped steps that apply nothing, caps on skipping, resuming by
samples at another world size, two trainers on one run directory, a peer killed mid-run, and
the log of a resumed run."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import BIN, ROOT, horovodrun, smoke_overrides, worker_env
from workers import train_worker

import cluster
from launch import checkpoint as ckpt
from launch import run_lock
from launch import train as train_lib
from launch.config import from_dict
from launch.report import read_log
from launch.trainer import Trainer, TrainingError

pytestmark = pytest.mark.slow  # every test trains (in this process, pfc or horovodrun)


def _config(tmp_path, *, sample_rate=1.0, **train):
    raw = train_worker.config(str(tmp_path / "run"), 6, None)
    raw["model"].update(batch_norm=True, dropout=0.2)  # BN statistics and a dropout RNG to protect
    raw["fc"]["sample_rate"] = sample_rate
    raw["train"].update(batch_size=6, **train)
    raw["checkpoint"]["every"] = 2
    return from_dict(raw)


def _every_value(t: Trainer) -> dict:
    """Every piece of state a step could touch, by name."""
    out = {f"model/{v.path}": v.numpy() for v in t.model.variables}
    out.update({f"opt/{i}": np.asarray(v.numpy()) for i, v in enumerate(t.opt.variables)})
    out.update({f"fc_opt/{k}": v.numpy() for k, v in t.fc_opt.state().items()})
    out["fc/weight"], out["fc/step"] = t.fc.weight.numpy(), t.fc.step.numpy()
    if getattr(t.fc, "sampler", None) is not None:
        out["fc/sampler"] = t.fc.sampler.state.numpy()
    return out


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
def test_a_skipped_step_applies_nothing(tmp_path, sample_rate):
    t = Trainer(_config(tmp_path, sample_rate=sample_rate), cluster.init("local"), num_classes=train_worker.NUM_CLASSES)
    t.set_total_steps(10)
    images, labels = train_worker.global_batch(0)
    assert t.train_step(images, labels).applied
    before = _every_value(t)
    assert any("moving_mean" in k for k in before) and "fc/sampler" in before or sample_rate == 1.0
    for step in range(1, 3):
        images, labels = train_worker.global_batch(step)
        assert not t.train_step(images * np.inf, labels).applied
    after = _every_value(t)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert t.position.samples == 3 * 6 and t.position.skipped == 2 and t.step == 1
    # and a good step still moves the BN statistics: the check above could fail
    assert t.train_step(*train_worker.global_batch(3)).applied
    moved = _every_value(t)
    assert any(not np.array_equal(moved[k], before[k]) for k in before if "moving_mean" in k)


def _data(bad):
    def make(first):
        for s in range(first, 1000):
            images, labels = train_worker.global_batch(s % 50)
            yield (images * np.inf if bad(s) else images), labels, 0

    return make


def test_skipping_in_a_row_past_the_cap_stops_the_run(tmp_path):
    cfg = _config(tmp_path, nonfinite="skip", max_skipped_in_a_row=3, max_skipped_share=1.0)
    with pytest.raises(
        TrainingError,
        match=r"4 steps skipped \(4 in a row\) at step 2: more than "
        r"train.max_skipped_in_a_row=3",
    ):
        train_lib.train(
            cfg,
            cluster.init("local"),
            data=_data(lambda s: s >= 2),
            steps_per_epoch=10,
            num_classes=train_worker.NUM_CLASSES,
        )
    assert ckpt.latest(cfg.checkpoint_dir).endswith("ckpt-000000002")


def test_skipping_more_than_the_share_stops_the_run(tmp_path):
    # 6 planned steps at share 0.3: ceil(1.8) = 2 skips allowed, the third stops the run
    cfg = _config(tmp_path, nonfinite="skip", max_skipped_share=0.3)
    with pytest.raises(
        TrainingError,
        match=r"3 steps skipped \(1 in a row\).*max_skipped_share=0.3 "
        r"of 6 steps \(2\)",
    ):
        train_lib.train(
            cfg,
            cluster.init("local"),
            data=_data(lambda s: s % 2 == 1),
            steps_per_epoch=10,
            num_classes=train_worker.NUM_CLASSES,
        )


def test_skipped_steps_do_not_count_as_steps_but_as_data(tmp_path):
    cfg = _config(tmp_path, nonfinite="skip")
    out = train_lib.train(
        cfg,
        cluster.init("local"),
        data=_data(lambda s: s == 1),
        steps_per_epoch=10,
        num_classes=train_worker.NUM_CLASSES,
    )
    manifest = ckpt.read_manifest(out["checkpoint"])
    assert out["step"] == 6 and manifest["step"] == 6
    assert manifest["samples"] == 7 * 6 and manifest["skipped_steps"] == 1
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert last["nonfinite_steps"] == 1 and last["samples"] == 42


# --- resuming by samples at another world size -------------------------------------------------


def pfc(*argv, timeout=300, **popen):
    return subprocess.run(
        [str(BIN / "pfc"), *argv], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout, **popen
    )


def _epochs_run(n, data, run_dir, epochs):
    """`pfc train` at n workers, 8 samples per worker per step, for `epochs` of the data."""
    sets = smoke_overrides(
        data,
        run_dir,
        1,
        "train.steps=null",
        f"train.epochs={epochs}",
        "train.batch_size=8",
        "checkpoint.every=0",
        "eval.interval=0",
    )
    if n == 1:
        return pfc("train", "--config", "configs/smoke.yaml", *sets)
    return horovodrun(n, str(BIN / "pfc"), "train", "--config", "configs/smoke.yaml", *sets, check=False)


@pytest.mark.parametrize("first,then", [(2, 3), (3, 1)])
def test_epochs_resume_at_another_world_size_trains_the_planned_samples(synth_dataset, tmp_path, first, then):
    """One epoch at `first` workers (8 samples per worker per step), then resumed at `then`
    workers to three epochs: the run takes three epochs of samples at the new global batch (the
    steps of the old one would end it early, or not at all), and asking for fewer is an error."""
    run_dir = tmp_path / "run"
    proc = _epochs_run(first, synth_dataset, run_dir, 1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one = ckpt.read_manifest(ckpt.latest(str(run_dir / "checkpoints")))
    assert one["world_size"] == first and one["samples"] == one["step"] * 8 * first
    proc = _epochs_run(then, synth_dataset, run_dir, 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps_per_epoch = int(re.search(r"(\d+) per epoch", proc.stdout).group(1))
    three = ckpt.read_manifest(ckpt.latest(str(run_dir / "checkpoints")))
    batch, planned = 8 * then, 3 * steps_per_epoch * 8 * then
    assert three["world_size"] == then and planned <= three["samples"] < planned + batch, (one, three)
    assert three["step"] - one["step"] == (three["samples"] - one["samples"]) // batch
    proc = _epochs_run(then, synth_dataset, run_dir, 2)
    assert proc.returncode != 0 and "nothing is left to train" in proc.stdout + proc.stderr


# --- one trainer per run directory -----------------------------------------------------------


def test_a_second_trainer_on_the_run_directory_fails_at_once_naming_the_holder(synth_dataset, tmp_path):
    run_dir = tmp_path / "run"
    sets = smoke_overrides(synth_dataset, run_dir, 100000, "train.log_every=1")
    first = subprocess.Popen(
        [str(BIN / "pfc"), "train", "--config", "configs/smoke.yaml", *sets],
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while "step 1/" not in first.stdout.readline():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
        t0 = time.perf_counter()
        second = pfc("train", "--config", "configs/smoke.yaml", *sets)
        assert second.returncode == 1, second.stdout[-2000:]
        assert f"another trainer is using this directory (pid {first.pid} on host" in second.stderr
        assert "Traceback" not in second.stderr and time.perf_counter() - t0 < 60
        log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        assert all(x.get("step", 0) < 100000 for x in log)  # the second wrote nothing to it
    finally:
        first.kill()
        first.wait()


def test_the_lock_is_exclusive_across_processes_and_in_one_and_freed_on_exit(tmp_path):
    hold = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from launch import run_lock\n"
        "with run_lock.hold([sys.argv[1]]):\n    print('held', flush=True); time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path), str(ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.RunLockError, match=f"pid {other.pid} on host"):
            with run_lock.hold([str(tmp_path)]):
                pass
    finally:
        other.kill()
        other.wait()
    with run_lock.hold([str(tmp_path), str(tmp_path / "checkpoints")]):  # freed by the kill
        with pytest.raises(run_lock.RunLockError, match="another trainer"):
            with run_lock.hold([str(tmp_path / "checkpoints")]):  # the same process
                pass
    with run_lock.hold([str(tmp_path)]):  # freed at the end
        pass


def test_stale_partial_checkpoints_are_removed_at_start(tmp_path):
    cfg = _config(tmp_path)
    stale = os.path.join(cfg.checkpoint_dir, "ckpt-000000004.tmp")
    os.makedirs(os.path.join(stale, "fc"))
    train_lib.train(
        cfg,
        cluster.init("local"),
        data=_data(lambda s: False),
        steps_per_epoch=10,
        num_classes=train_worker.NUM_CLASSES,
    )
    assert not os.path.exists(stale)


# --- a peer killed mid-run -------------------------------------------------------------------


def test_the_survivor_names_a_lost_peer_and_the_checkpoint_a_resume_uses(tmp_path):
    proc = horovodrun(
        2, "tests/workers/fault_worker.py", str(tmp_path / "run"), "kill-rank1-at=5", check=False, timeout=240
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # the survivor either sees the collective fail or is ended by horovodrun first: both are named
    assert re.search(r"worker 0: (lost contact with a peer worker|terminated \(SIGTERM\)) at step 5", out), out[-4000:]
    assert "A resume (checkpoint.resume: auto) starts from" in out and "ckpt-000000004" in out


# --- the log of a resumed run ----------------------------------------------------------------


def test_a_resume_is_marked_in_the_log_and_the_report_draws_the_resumed_run(tmp_path):
    cfg = _config(tmp_path)
    train_lib.train(
        cfg,
        cluster.init("local"),
        data=_data(lambda s: False),
        steps_per_epoch=10,
        num_classes=train_worker.NUM_CLASSES,
    )
    # as if the run had crashed after step 6 with its last checkpoint at 4: resume from ckpt 4
    log_file = tmp_path / "run" / "log.jsonl"
    shutil.rmtree(os.path.join(cfg.checkpoint_dir, "ckpt-000000006"))
    raw = cfg.to_dict()
    raw["train"]["steps"] = 8
    train_lib.train(
        from_dict(raw),
        cluster.init("local"),
        data=_data(lambda s: False),
        steps_per_epoch=10,
        num_classes=train_worker.NUM_CLASSES,
    )
    records = [json.loads(x) for x in log_file.read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] == 4 and resumes[0]["from"].endswith("ckpt-000000004")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # the crashed run's 5, 6 are in the file
    assert read_log(log_file).train["step"] == [1, 2, 3, 4, 5, 6, 7, 8]  # the report keeps the resumed run's


def test_auto_resume_passes_over_a_corrupt_newest_checkpoint_saying_so(tmp_path, capsys):
    cfg = _config(tmp_path)
    train_lib.train(
        cfg,
        cluster.init("local"),
        data=_data(lambda s: False),
        steps_per_epoch=10,
        num_classes=train_worker.NUM_CLASSES,
    )
    shard = os.path.join(cfg.checkpoint_dir, "ckpt-000000006", "fc", "weight.00000.bin")
    raw = bytearray(open(shard, "rb").read())
    raw[0] ^= 1  # the lowest bit of one weight: loads silently without a checksum
    open(shard, "wb").write(bytes(raw))
    assert (
        hashlib.sha256(open(shard, "rb").read()).hexdigest()
        != ckpt.read_manifest(os.path.dirname(os.path.dirname(shard)))["files"]["fc/weight.00000.bin"]["sha256"]
    )
    more = cfg.to_dict()
    more["train"]["steps"] = 8
    # an explicit path never falls back
    explicit = json.loads(json.dumps(more))
    explicit["checkpoint"]["resume"] = os.path.join(cfg.checkpoint_dir, "ckpt-000000006")
    with pytest.raises(ckpt.CheckpointError, match="weight.00000.bin: checksum mismatch"):
        train_lib.train(
            from_dict(explicit),
            cluster.init("local"),
            data=_data(lambda s: False),
            steps_per_epoch=10,
            num_classes=train_worker.NUM_CLASSES,
        )
    capsys.readouterr()
    train_lib.train(
        from_dict(more),
        cluster.init("local"),
        data=_data(lambda s: False),
        steps_per_epoch=10,
        num_classes=train_worker.NUM_CLASSES,
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("worker 0: ckpt-000000006 is corrupt: ") and "weight.00000.bin" in out[0]
    assert "falling back to ckpt-000000004" in out[0]
    assert any(line.startswith("resumed from") and line.split()[2].endswith("ckpt-000000004") for line in out)
