"""The `pfc` command line. Subcommands grow with the project; each lives in its own module."""
from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

from launch import host_memory  # imports no TensorFlow: it must act before TensorFlow loads


def version() -> str:
    try:
        return metadata.version("partitioned-fc")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    from launch import bench, data_cli, evaluate, export, report, train

    parser = argparse.ArgumentParser(
        prog="pfc", description="partitioned-fc: exact model-parallel margin softmax for millions of classes")
    parser.add_argument("--version", action="version", version=f"pfc {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (train, evaluate, export, data_cli, bench, report):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter, unless asked
    host_memory.configure()
    parser = build_parser()
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
    from launch.run_lock import RunLockError
    from launch.trainer import TrainingError
    from monitoring.exporter import PortInUseError
    from pipelines.schema import DataError

    return (ConfigError, DataError, CheckpointError, TrainingError, RunLockError, PortInUseError,
            FileExistsError, tf.errors.OpError)


if __name__ == "__main__":
    sys.exit(main())
