"""The ops of two or more `pipelines/reader.py` versions' datasets, counted by type: what a
refactoring that should not change the work changed.

    git show 059a6b7:pipelines/reader.py > /tmp/reader_before.py
    .venv/bin/python bench/reader_graphs.py /tmp/reader_before.py pipelines/reader.py

Each version builds its pipeline (batch 2, one epoch) over the same small dataset written here,
in three settings (default, no shuffle, skip_corrupt); its serialized dataset graph's nodes and
function-library nodes are counted by op type. Prints, per setting, each version's total and
the op types whose counts differ from the first version's. Timing-free, so a shared host does
not blur it (bench/ab_reader.py times the versions).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

SETTINGS = {"default": {}, "no shuffle": {"shuffle_buffer": 0}, "skip_corrupt": {"skip_corrupt": True}}


def op_counts(dataset) -> collections.Counter:
    """Op type -> nodes of that type in `dataset`'s graph and its functions."""
    from pipelines import tf_compat

    graph = tf_compat.dataset_graph(dataset)
    return collections.Counter([n.op for f in graph.library.function for n in f.node_def] + [n.op for n in graph.node])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("readers", nargs="+", help="reader.py files to compare (the first is the reference)")
    args = p.parse_args()
    from pipelines_helpers import write_indexed

    data = tempfile.mkdtemp(prefix="reader-graphs-")
    write_indexed(data, [6, 6])
    versions = []
    for k, path in enumerate(args.readers):
        spec = importlib.util.spec_from_file_location(f"reader_v{k}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        versions.append((path, mod))
    for setting, kwargs in SETTINGS.items():
        counts = [op_counts(mod.make_dataset(data, 2, epochs=1, **kwargs)) for _, mod in versions]
        for (path, _), c in zip(versions, counts):
            diff = {
                op: f"{counts[0][op]} -> {c[op]}" for op in sorted(set(c) | set(counts[0])) if c[op] != counts[0][op]
            }
            print(f"{setting}: {path}: {sum(c.values())} ops; differences from the first: {diff or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
