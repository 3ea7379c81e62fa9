"""The `pfc` subcommands: where each lives, its one-line help and examples.

`pfc --help` reads only this table, so it imports neither TensorFlow nor any command; `pfc
COMMAND ...` imports that command's module alone. Imports nothing of ours.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # the module whose add_parser(sub) adds this command
    help: str
    examples: tuple[str, ...]


COMMANDS: dict[str, Command] = {
    "train": Command(
        "launch.train",
        "train (one worker, or every worker under horovodrun)",
        (
            "pfc train --config configs/smoke.yaml --set train.steps=100",
            "horovodrun -np 2 -H localhost:2 --gloo pfc train --config configs/fonts.yaml",
        ),
    ),
    "eval": Command(
        "launch.evaluate",
        "verification accuracy of a checkpoint on the config's .bin sets",
        (
            "pfc eval --config configs/smoke.yaml",
            "pfc eval --config configs/fonts.yaml --checkpoint runs/fonts/checkpoints/ckpt-000002000 --json eval.json",
        ),
    ),
    "export": Command(
        "launch.export",
        "a checkpoint's backbone as a SavedModel (images -> embeddings)",
        ("pfc export runs/smoke/checkpoints/ckpt-000000300 models/smoke",),
    ),
    "embed": Command(
        "launch.embed",
        "unit embeddings of a folder of images or a dataset with an exported model",
        (
            "pfc embed models/smoke ~/photos embeddings.npy",
            "pfc embed models/fonts data/fonts64/closed closed.npy --flip-sum",
        ),
    ),
    "clean": Command(
        "launch.clean",
        "list training samples far from their class's dominant sub-center (noisy labels)",
        (
            "pfc clean --config configs/fonts.yaml noisy.tsv",
            "pfc clean --config configs/fonts.yaml --threshold 60 --data data/fonts64 noisy.tsv",
        ),
    ),
    "data": Command(
        "launch.data_cli",
        "datasets: synthetic identities, typefaces, inspection",
        (
            "pfc data synth data/synth --identities 200 --images-per-identity 20 --shards 4",
            "pfc data fonts data/fonts64 --size 64 --per-style 1",
            "pfc data inspect data/synth",
        ),
    ),
    "convert": Command(
        "launch.data_cli",
        "convert image folders or InsightFace RecordIO to TFRecords",
        (
            "pfc convert images ~/photos data/photos --shards 8",
            "pfc convert mxrec faces_emore/train.rec data/ms1m --shards 64",
        ),
    ),
    "bench": Command(
        "bench.fc",
        "benchmarks (fc: the model-parallel layer; data: the reader)",
        ("pfc bench fc --classes 1000000 --dim 512 --batch 256", "pfc bench data data/synth --workers 2"),
    ),
    "report": Command(
        "launch.report",
        "PNG plots of a run's log (loss, accuracy, throughput, verification)",
        ("pfc report runs/smoke",),
    ),
}


def epilog(examples: tuple[str, ...] | list[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples)


def add(sub, name: str, help: str | None = None, examples=None) -> argparse.ArgumentParser:
    """A (sub)command's parser with its help and examples: the table's for a top-level command,
    else the `help` and `examples` given."""
    if name in COMMANDS and help is None:
        help, examples = COMMANDS[name].help, COMMANDS[name].examples
    return sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=epilog(examples or ()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def install(sub, name: str) -> None:
    """Import the module of command `name` and let it add its parser(s)."""
    importlib.import_module(COMMANDS[name].module).add_parser(sub)


def listing(sub) -> None:
    """Every command as a help-only entry: enough for `pfc --help` and for `pfc BAD` errors."""
    for name, c in COMMANDS.items():
        sub.add_parser(name, help=c.help)
