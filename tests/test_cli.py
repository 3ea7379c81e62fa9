"""The `pfc` command line itself: a fast top-level help, help and examples for every command and
argument, one shape of error."""

import argparse
import subprocess
import sys
import time

import pytest
from helpers import BIN, ROOT, worker_env

from launch import cli, commands


def _run(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_top_level_help_loads_no_tensorflow_and_is_fast():
    out = _run(
        "import sys\nfrom launch import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TF LOADED' if 'tensorflow' in sys.modules else 'no tensorflow')"
    )
    assert out.strip().endswith("no tensorflow")
    for name in commands.COMMANDS:
        assert f"    {name} " in out
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "pfc"), "--help"], capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 0 and "examples:" in proc.stdout
    assert time.perf_counter() - t0 < 3.0  # loose: ~0.3 s here; TensorFlow alone takes 4-8 s


@pytest.mark.slow
def test_no_import_cycle_between_the_cli_and_the_commands():
    out = _run(
        "import sys\nimport launch.train, launch.evaluate, launch.export, launch.report\n"
        "print('launch.cli' in sys.modules)"
    )
    assert out.strip() == "False"


def _parsers(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_command_and_argument_has_help_and_every_command_an_example():
    leaves = 0
    for path, parser in _parsers(cli.build_parser("*"), "pfc"):
        for action in parser._actions:
            if (
                isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
                or action.help == argparse.SUPPRESS
            ):
                continue
            assert action.help, f"{path}: {action.dest} has no help"
        if parser.get_default("func") is not None:
            leaves += 1
            assert "examples:\n  pfc " in (parser.epilog or "") or "examples:\n  horovodrun" in (parser.epilog or ""), (
                f"{path} has no example"
            )
    assert leaves >= 10


@pytest.mark.slow
def test_errors_start_with_the_command():
    proc = subprocess.run([str(BIN / "pfc"), "train"], capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 2 and "pfc train: error: the following arguments are required: --config" in proc.stderr
    proc = subprocess.run([str(BIN / "pfc"), "trian"], capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 2 and "pfc: error: argument COMMAND: invalid choice: 'trian'" in proc.stderr


@pytest.mark.slow
def test_bench_fc_train_mode_reports_a_meaningful_loss_and_no_negative_memory(tmp_path):
    """A smoke test of the command's report (speed itself is measured by bench/, never by tests):
    each timed step takes a new batch, so the loss of random labels stays high."""
    import json

    out = tmp_path / "fc.jsonl"
    proc = subprocess.run(
        [
            str(BIN / "pfc"),
            "bench",
            "fc",
            "--classes",
            "2000",
            "--dim",
            "16",
            "--batch",
            "16",
            "--steps",
            "3",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert len(row["losses"]) == 3 and min(row["losses"]) > 1.0, row["losses"]
    assert row["build_overhead_gib_per_worker"] >= 0 and "left by building it -" not in proc.stdout


def test_quiet_mode_drops_abseil_info_lines_only():
    from launch import quiet_logs

    noise = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        b"I0000 00:00:1796295452.188950    8707 service.cc:146] XLA service 0x5593 initialized\n",
        b"I1203 10:54:12.250948    8707 device_compiler.h:188] Compiled cluster using XLA!\n",
    ]
    kept = [
        b"W1203 10:54:12.250948    8707 op_kernel.cc:1] a warning\n",
        b"E0000 00:00:1796295452.188950    8707 gloo.cc:12] connection refused\n",
        b"pfc train: error: configs/x.yaml: loss.name: unknown margin\n",
        b"Traceback (most recent call last):\n",
        b"I0000 is how a user line may start\n",
    ]
    assert all(quiet_logs.is_noise(line) for line in noise)
    assert not any(quiet_logs.is_noise(line) for line in kept)
    assert quiet_logs.verbose_requested(["train", "--verbose"], {})
    assert quiet_logs.verbose_requested(["train"], {"PFC_VERBOSE": "1"})
    assert not quiet_logs.verbose_requested(["train"], {"PFC_VERBOSE": "0"})


@pytest.mark.slow
def test_the_stderr_filter_loses_nothing_when_its_process_is_killed():
    """Lines written just before a SIGKILL still reach stderr; only the noise is gone."""
    code = (
        "import os, signal\nfrom launch import quiet_logs\nquiet_logs.quiet()\n"
        "os.write(2, b'I0000 00:00:1796295452.188950    8707 service.cc:146] XLA service\\n'"
        " + b'W1203 10:54:12.250948    8707 a.cc:1] kept warning\\n' + b'last words')\n"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=worker_env(), capture_output=True, timeout=60)
    assert proc.returncode == -9
    assert proc.stderr == b"W1203 10:54:12.250948    8707 a.cc:1] kept warning\nlast words"


@pytest.mark.slow
def test_verbose_keeps_what_the_quiet_default_drops():
    """A command that compiles XLA kernels: its INFO lines only with --verbose (or PFC_VERBOSE=1)."""
    argv = [
        str(BIN / "pfc"),
        "bench",
        "fc",
        "--classes",
        "1000",
        "--dim",
        "16",
        "--batch",
        "8",
        "--steps",
        "1",
        "--threads",
        "1",
    ]
    quiet = subprocess.run(argv, capture_output=True, text=True, env=worker_env(), timeout=120)
    loud = subprocess.run(argv + ["--verbose"], capture_output=True, text=True, env=worker_env(), timeout=120)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr[-2000:] + loud.stderr[-2000:]
    assert "fc  C=1,000" in quiet.stdout and "XLA" not in quiet.stderr
    assert "Compiled cluster using XLA" in loud.stderr
