"""The `pfc` command line. Subcommands grow with the project; each lives in its own module."""
from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata


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
    _allow_all_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
    except _user_errors() as e:  # bad config, data, checkpoint, port: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        print(f"pfc {args.command}: error: {first}", file=sys.stderr, flush=True)
        code = 1
    from pipelines import storage  # tensorflow-io's S3 client aborts at exit: end with os._exit
    return storage.exit_if_object_storage(code)


def _allow_all_memory() -> None:
    """Let TensorFlow's oneDNN CPU allocator use all of the machine's memory.

    By default it caps the memory it reserves at the machine's RAM, and it reserves in regions that
    grow by doubling, so what it reserves runs well ahead of what is live: at 10M classes (19 GiB of
    bfloat16 weights and momentum on a 24 GiB machine) it refused the momentum's 10 GiB although
    the machine had it (measured; also refused with the cap at the RAM size, accepted at 40 GiB).
    Reserved-but-untouched pages cost nothing, so the cap is set to twice the RAM; the kernel
    remains the judge of real exhaustion. Must run before TensorFlow allocates anything; an
    explicit TF_MKL_ALLOC_MAX_BYTES wins.
    """
    try:
        with open("/proc/meminfo") as f:
            total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return
    os.environ.setdefault("TF_MKL_ALLOC_MAX_BYTES", str(2 * total_kib * 1024))


def _user_errors() -> tuple[type[BaseException], ...]:
    import tensorflow as tf

    from launch.checkpoint import CheckpointError
    from launch.config import ConfigError
    from launch.trainer import TrainingError
    from monitoring.exporter import PortInUseError
    from pipelines.schema import DataError

    return (ConfigError, DataError, CheckpointError, TrainingError, PortInUseError, FileExistsError,
            tf.errors.OpError)


if __name__ == "__main__":
    sys.exit(main())
