"""The installed package's version (no imports of ours: the CLI, the trainer and the exporter
read it)."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    try:
        return metadata.version("partitioned-fc")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
