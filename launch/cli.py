"""The `pfc` command line. Subcommands grow with the project; each lives in its own module."""
from __future__ import annotations

import argparse
import sys
from importlib import metadata


def version() -> str:
    try:
        return metadata.version("partitioned-fc")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    from launch import bench, data_cli

    parser = argparse.ArgumentParser(
        prog="pfc", description="partitioned-fc: exact model-parallel margin softmax for millions of classes")
    parser.add_argument("--version", action="version", version=f"pfc {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench.add_parser(sub)
    data_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    code = int(args.func(args) or 0)
    from pipelines import storage  # tensorflow-io's S3 client aborts at exit: end with os._exit
    return storage.exit_if_object_storage(code)


if __name__ == "__main__":
    sys.exit(main())
