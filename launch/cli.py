"""The `pfc` command line. Each subcommand lives in its own module, listed in launch/commands.py
and imported only when it runs: `pfc --help` loads no TensorFlow."""

from __future__ import annotations

import argparse
import os
import sys

from launch import (
    commands,
    host_memory,  # imports no TensorFlow: it must act before TensorFlow loads
    quiet_logs,
)
from launch.version import version


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` (its module imported), or help-only entries for every command;
    command "*": every command's full parser (for tests of the help texts)."""
    parser = argparse.ArgumentParser(
        prog="pfc",
        description="partitioned-fc: exact model-parallel margin softmax for millions of classes",
        epilog=commands.epilog([c.examples[0] for c in commands.COMMANDS.values()]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pfc {version()}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep TensorFlow's and XLA's INFO lines (anywhere on the line; or PFC_VERBOSE=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command == "*":
        for name in dict.fromkeys(c.module for c in commands.COMMANDS.values()):
            __import__(name, fromlist=["add_parser"]).add_parser(sub)
    elif command in commands.COMMANDS:
        commands.install(sub, command)
    else:
        commands.listing(sub)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """The `pfc` program (argv None: the command line, whose stderr is filtered unless verbose)
    or a call with its arguments (tests: the caller's stderr is left alone)."""
    words = sys.argv[1:] if argv is None else argv
    verbose = quiet_logs.verbose_requested(words)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")  # TensorFlow's chatter
    if argv is None and not verbose:
        quiet_logs.quiet()
    host_memory.configure()
    argv = [a for a in words if a != "--verbose"]
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code = run_guarded(args.command, lambda: args.func(args))
    from pipelines import storage  # tensorflow-io's S3 client aborts at exit: end with os._exit

    return storage.exit_if_object_storage(code)


def run_guarded(command: str, run) -> int:
    """run() -> exit code. A user's error (bad config, data, checkpoint, port, a lost peer)
    becomes one line `pfc COMMAND: error: ...` on stderr and exit 1, with no traceback."""
    try:
        return int(run() or 0)
    except _user_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(f"pfc {command}: error: {first}", file=sys.stderr, flush=True)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    import tensorflow as tf

    from launch.checkpoint import CheckpointError
    from launch.config import ConfigError
    from launch.export import ExportError
    from launch.run_lock import RunLockError
    from launch.trainer import TrainingError
    from monitoring.exporter import PortInUseError
    from pipelines.schema import DataError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        TrainingError,
        RunLockError,
        PortInUseError,
        ExportError,
        FileExistsError,
        tf.errors.OpError,
    )


if __name__ == "__main__":
    sys.exit(main())
