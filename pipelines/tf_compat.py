"""Every use of TensorFlow's internals in the project, in one file: a TensorFlow upgrade starts here.

    map_inline(ds, fn, parallel=None)    # ds.map(fn), each call run whole in its calling thread
    DatasetSource                        # base class of a dataset made from a variant tensor
    load_op_library(path)                # our compiled op (pipelines/record_blocks.cc)
    dataset_graph(ds)                    # a dataset's graph (GraphDef), to inspect its ops

None of these is public API: tf.data has no public switch for inline functions, no public way
to wrap a dataset op of our own, and a compiled op binds to the C++ ABI of the TensorFlow it was
built against (record_blocks.cc uses tensorflow/core headers). So this module refuses, at
import, a TensorFlow it was not checked with (`SUPPORTED`).

Upgrading TensorFlow: set the version in pyproject.toml and the Makefile (TF_SPEC), add its
major.minor to `SUPPORTED`, rebuild the op (`python -m pipelines.record_blocks`; fix
record_blocks.cc if it no longer compiles), then run tests/test_pipelines_tf_compat.py,
tests/test_pipelines_record_blocks.py and tests/test_pipelines_reader.py (the last checks that
the inline functions still are inline in the dataset's graph) and the reader benchmark
(docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
from tensorflow.python.data.ops import dataset_ops, map_op

SUPPORTED = ("2.17",)  # TensorFlow major.minor versions these internals were checked with


def check_version(version: str) -> None:
    """Raise ImportError unless `version` (a TensorFlow version string) is one of `SUPPORTED`."""
    if ".".join(version.split(".")[:2]) not in SUPPORTED:
        raise ImportError(
            f"pipelines.tf_compat: TensorFlow {version} is installed, but the reader's use of TensorFlow "
            f"internals was checked with TensorFlow {', '.join(SUPPORTED)} only. Install the pinned version "
            "(`make setup`, or pip install tensorflow-cpu==2.17.1), or port pipelines/tf_compat.py to this "
            "version as its docstring describes."
        )


check_version(tf.__version__)

DatasetSource = dataset_ops.DatasetSource


def map_inline(ds: tf.data.Dataset, fn: Callable, parallel: int | None = None) -> tf.data.Dataset:
    """`ds.map(fn)` (`parallel` calls at once, in order) with each call run whole in the thread
    that makes it.

    tf.data otherwise hands a function's ops to its thread pool, a thread wake-up per call and
    more; while the pool's threads decode, a small function there waits for one to finish. On
    the 2-core VM of docs/benchmarks.md the reader had ~50 context switches per batch against
    10-15 for decoding alone, and ~5 µs more kernel time per image. `fn` must have no
    control flow (tf.cond, loops): TensorFlow's single-threaded executor runs these calls.
    (tf.data has no public switch for this: its private constructors take one;
    tests/test_pipelines_reader.py checks the attribute is set in the graph.)
    """
    if parallel is None:
        return map_op._MapDataset(ds, fn, use_inter_op_parallelism=False, preserve_cardinality=True)
    return map_op._ParallelMapDataset(
        ds,
        fn,
        num_parallel_calls=parallel,
        deterministic=True,
        use_inter_op_parallelism=False,
        preserve_cardinality=True,
    )


def load_op_library(path: str):
    """The Python module of the compiled op library at `path` (its ops as functions)."""
    return tf.load_op_library(path)


def dataset_graph(ds: tf.data.Dataset) -> tf.compat.v1.GraphDef:
    """The graph that `ds` runs (its nodes and its functions' library), as a GraphDef."""
    return tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
