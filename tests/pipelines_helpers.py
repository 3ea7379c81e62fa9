"""Small datasets built directly with the writer, and byte-level surgery on TFRecord files."""

from __future__ import annotations

import struct

import numpy as np
import tensorflow as tf

from pipelines import writer

SIZE = 8


def jpeg(seed: int, size: int = SIZE) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(img, quality=95).numpy()


def write_indexed(
    out: str, counts: list[int], *, size: int = SIZE, bad_image: set[int] = frozenset(), num_classes: int | None = None
):
    """Shard k holds counts[k] records; record g (global, in shard order) has label g, so labels
    identify records. Records in `bad_image` carry bytes that are not an image."""
    total = sum(counts)
    starts = np.concatenate([[0], np.cumsum(counts)])

    def records(k):
        for g in range(starts[k], starts[k + 1]):
            img = b"this is not a jpeg" if g in bad_image else jpeg(g, size)
            yield writer.Record(img, int(g), source=f"rec{g}")

    return writer.write_sharded(out, len(counts), records, num_classes=num_classes or total, image_size=(size, size))


def record_offsets(path: str) -> list[tuple[int, int]]:
    """(offset of the record, data length) for each record of a TFRecord file."""
    data = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        out.append((pos, n))
        pos += 8 + 4 + n + 4
    return out


def flip_byte(path: str, record: int, at: int = 20) -> None:
    """Corrupt one byte inside the data of `record` (its CRC no longer matches)."""
    off, n = record_offsets(path)[record]
    b = bytearray(open(path, "rb").read())
    b[off + 12 + min(at, n - 1)] ^= 0xFF
    open(path, "wb").write(bytes(b))


def truncate_in(path: str, record: int) -> None:
    """Cut the file in the middle of `record`."""
    off, n = record_offsets(path)[record]
    b = open(path, "rb").read()
    open(path, "wb").write(b[: off + 12 + n // 2])


def replace_record(path: str, record: int, data: bytes) -> None:
    """Rewrite `path` with `record`'s bytes replaced by `data` (framing and CRCs valid)."""
    records = [r.numpy() for r in tf.data.TFRecordDataset(path)]
    records[record] = data
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
