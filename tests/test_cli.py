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
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=worker_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_top_level_help_loads_no_tensorflow_and_is_fast():
    out = _run("import sys\nfrom launch import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
               "print('TF LOADED' if 'tensorflow' in sys.modules else 'no tensorflow')")
    assert out.strip().endswith("no tensorflow")
    for name in commands.COMMANDS:
        assert f"    {name} " in out
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "pfc"), "--help"], capture_output=True, text=True, env=worker_env())
    assert proc.returncode == 0 and "examples:" in proc.stdout
    assert time.perf_counter() - t0 < 3.0   # loose: ~0.3 s here; TensorFlow alone takes 4-8 s


@pytest.mark.slow
def test_no_import_cycle_between_the_cli_and_the_commands():
    out = _run("import sys\nimport launch.train, launch.evaluate, launch.export, launch.report\n"
               "print('launch.cli' in sys.modules)")
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
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)) or \
                    action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{path}: {action.dest} has no help"
        if parser.get_default("func") is not None:
            leaves += 1
            assert "examples:\n  pfc " in (parser.epilog or "") or "examples:\n  horovodrun" in (parser.epilog or ""), \
                f"{path} has no example"
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
    proc = subprocess.run([str(BIN / "pfc"), "bench", "fc", "--classes", "2000", "--dim", "16", "--batch", "16",
                           "--steps", "3", "--json", str(out)], cwd=ROOT, env=worker_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert len(row["losses"]) == 3 and min(row["losses"]) > 1.0, row["losses"]
    assert row["build_overhead_gib_per_worker"] >= 0 and "left by building it -" not in proc.stdout
