"""A TFRecord file of our Examples as a dataset of parsed blocks: our one compiled op (record_blocks.cc).

    blocks = RecordBlocks(filename, block_records=64)   # (start [], images [n], labels [n], done [])

`start` is the index of the block's first record in the file; `images` (encoded bytes) and
`labels` (int64) are the schema's two features of the next n <= block_records records (framing and
CRCs checked); a record that is not an Example with exactly one of each (what
`tf.io.parse_example` with `schema.feature_spec()` accepts) comes out as image b"" and label -1.
`done` marks the file's last block: its records stop there, at the end of the file or at the first
record that cannot be read (bad CRC, truncation, an I/O error, a file that cannot be opened), so
start + n is the count read. Nothing here raises on bad data; the reader compares the count with
its manifest and names the file and record of an image that does not decode.
Paths are whatever TensorFlow's file systems read (local, and s3://, gs://, hdfs:// once
tensorflow-io is imported).

Why a compiled op: tf.data.TFRecordDataset yields one record per element; on its way into a
block each record went through four iterators and one more copy, and `tf.io.parse_example` ran
in TensorFlow's intra-op threads, waking them. Here a block is read and parsed in one call, in the
calling thread, by the parser `tf.io.parse_example` runs (so both accept the same records);
docs/benchmarks.md has what that saved.

Building: `python -m pipelines.record_blocks` (run by `make setup` and in the image recipe)
compiles it against the installed TensorFlow with the C++ compiler (`CXX`, default g++) into
this package's directory, or, if that is not writable, into ~/.cache/partitioned-fc. A process
that finds no library built for its TensorFlow and this source builds it on first use (one
process at a time, under a file lock; the library appears under its final name only once whole).
It binds to the C++ ABI of that TensorFlow: loading it and wrapping its output as a dataset go
through `pipelines.tf_compat`, which names the TensorFlow versions it was checked with.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile

import tensorflow as tf

from pipelines import schema, tf_compat

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "record_blocks.cc")
_ops = None


def _flags() -> list[str]:
    return ["-O2", "-shared", "-fPIC", *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def library_path() -> str:
    """Where the library for this source, TensorFlow and compiler flags lives (built or not)."""
    with open(_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + tf.__version__.encode() + " ".join(_flags()).encode()).hexdigest()[:16]
    name = f"_record_blocks_{key}.so"
    for directory in (_HERE, os.path.join(os.path.expanduser("~"), ".cache", "partitioned-fc")):
        if os.path.exists(os.path.join(directory, name)) or _writable(directory):
            return os.path.join(directory, name)
    raise RuntimeError(
        f"pipelines.record_blocks: neither {_HERE} nor ~/.cache/partitioned-fc is writable "
        "to build the record reader in"
    )


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def build() -> str:
    """Compile the op for the installed TensorFlow unless it is built; its path."""
    path = library_path()
    if os.path.exists(path):
        return path
    cxx = os.environ.get("CXX", "g++")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if os.path.exists(path):
            return path
        directory, name = os.path.split(path)
        fd, tmp = tempfile.mkstemp(prefix=name[: -len(".so")] + ".", suffix=".tmp", dir=directory)
        os.close(fd)
        cmd = [*shlex.split(cxx), _SOURCE, "-o", tmp, *_flags()]
        try:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError(
                    f"pipelines.record_blocks: no C++ compiler '{cxx}' to build the record reader "
                    f"({_SOURCE}); install g++ (or set CXX) and run "
                    "`python -m pipelines.record_blocks`"
                ) from None
            if proc.returncode != 0:
                raise RuntimeError(
                    f"pipelines.record_blocks: building the record reader failed: "
                    f"{shlex.join(cmd)}\n{proc.stderr[-4000:]}"
                )
            # Readable by every user (mkstemp made it the owner's alone): an image built as root
            # runs as another user.
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)  # whole or not at all
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _load():
    global _ops
    if _ops is None:
        _ops = tf_compat.load_op_library(build())
    return _ops


class RecordBlocks(tf_compat.DatasetSource):
    """One TFRecord file -> blocks (start int64 [], images string [n], labels int64 [n], done bool []),
    n <= block_records (see the module docstring). buffer_size: bytes read from the file at a time."""

    def __init__(self, filename, block_records: int, buffer_size: int = 1 << 18):
        variant = _load().pfc_record_block_dataset(
            tf.convert_to_tensor(filename, tf.string),
            tf.constant(block_records, tf.int64),
            tf.constant(buffer_size, tf.int64),
            image_key=schema.IMAGE_KEY,
            label_key=schema.LABEL_KEY,
        )
        super().__init__(variant)

    @property
    def element_spec(self):
        return (
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([None], tf.string),
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([], tf.bool),
        )


if __name__ == "__main__":
    print(build())
    sys.exit(0)
