"""InsightFace's MXNet RecordIO datasets (`train.rec`, `train.idx`, `property`), read without MXNet.

Framing of a .rec file (dmlc RecordIO, little-endian), repeated:
    uint32 magic = 0xced7230a
    uint32 lrec  = cflag << 29 | length       (length < 2^29)
    length bytes of data, then zero padding to a multiple of 4 bytes
cflag 0 is a whole record. A record whose data contains the magic word at a 4-byte-aligned
position is stored split there, without that word: cflag 1 (first part), 2 (middle), 3 (last);
reading joins the parts with the magic word between them.

A record's data is an image record: a 24-byte header `IfQQ` (uint32 flag, float32 label,
uint64 id, uint64 id2); when flag > 0, `flag` float32 labels follow and replace `label`; the
rest is the encoded image.

`train.idx` is text, one "key<TAB>byte offset" line per record. InsightFace's face datasets use
record 0 as a header whose label array holds [first identity record, end]: image records are
keys 1 .. label[0]-1; an image's class is its label (or its first label when it is an array).
Without that header (flag 0) every indexed record is an image. `property` is "num_classes,h,w".
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pipelines import images, schema, storage, writer

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_IR = struct.Struct("<IfQQ")


@dataclasses.dataclass(frozen=True)
class IRHeader:
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def unpack(data: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Image record -> (header, payload)."""
    if len(data) < _IR.size:
        raise schema.DataError(f"{where}: {len(data)} bytes, shorter than the {_IR.size}-byte image header")
    flag, label, id_, id2 = _IR.unpack_from(data)
    rest = data[_IR.size :]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise schema.DataError(f"{where}: header announces {flag} labels, record too short")
        label, rest = np.frombuffer(rest[: 4 * flag], "<f4").copy(), rest[4 * flag :]
    return IRHeader(flag, label, id_, id2), rest


class RecordFile:
    """Random access to the records of a .rec through its .idx (local paths or URLs)."""

    def __init__(self, rec_path: str, idx_path: str | None = None):
        self.rec_path = storage.prepare(rec_path)
        self.idx_path = idx_path or _sibling(rec_path, ".idx")
        self.offsets = _read_index(self.idx_path)
        try:
            self._f = tf.io.gfile.GFile(self.rec_path, "rb")
            self._size = self._f.size()
        except tf.errors.OpError as e:
            raise schema.DataError(f"{self.rec_path}: cannot open ({schema.first_line(e)})") from None

    def close(self) -> None:
        self._f.close()

    def read(self, key: int) -> bytes:
        if key not in self.offsets:
            raise schema.DataError(f"{self.idx_path}: no record with key {key}")
        return self.read_at(self.offsets[key], f"{self.rec_path} key {key}")

    def read_at(self, offset: int, where: str) -> bytes:
        parts, pos = [], offset
        while True:
            head = self._read_exact(pos, 8, where)
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise schema.DataError(f"{where}: bad magic 0x{magic:08x} at byte {pos} (expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            if cflag > 3 or (not parts and cflag not in (0, 1)) or (parts and cflag not in (2, 3)):
                raise schema.DataError(f"{where}: unexpected continuation flag {cflag} at byte {pos}")
            parts.append(self._read_exact(pos + 8, length, where))
            pos += 8 + ((length + 3) & ~3)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def _read_exact(self, pos: int, n: int, where: str) -> bytes:
        if pos + n > self._size:
            raise schema.DataError(f"{where}: truncated at byte {pos} (record needs {n} bytes, file has {self._size})")
        self._f.seek(pos)
        return self._f.read(n)


class FaceRecords:
    """An InsightFace face dataset: image keys, classes and image size, from train.rec/.idx/property."""

    def __init__(self, rec_path: str):
        self.file = RecordFile(rec_path)
        self.rec_path = rec_path
        first = min(self.file.offsets)
        header, _ = unpack(self.file.read(first), f"{rec_path} key {first}")
        if header.flag > 0:
            end = int(np.asarray(header.label).ravel()[0])
            missing = [k for k in range(1, end) if k not in self.file.offsets]
            if missing:
                raise schema.DataError(
                    f"{self.file.idx_path}: header record says images are keys 1..{end - 1} "
                    f"but key {missing[0]} is not indexed"
                )
            self.keys = list(range(1, end))
        else:
            self.keys = sorted(self.file.offsets)
        if not self.keys:
            raise schema.DataError(f"{rec_path}: no image records")
        prop = _read_property(_sibling(rec_path, "property", replace_name=True))
        self.num_classes, self.image_size = prop if prop else (None, None)

    def image(self, key: int) -> tuple[int, bytes]:
        """(class, encoded image) of record `key`."""
        where = f"{self.rec_path} key {key}"
        header, payload = unpack(self.file.read(key), where)
        label = float(np.asarray(header.label).ravel()[0])
        if label != int(label):
            raise schema.DataError(f"{where}: label {label} is not an integer")
        return int(label), payload


def shard_records(data: FaceRecords, shard: int, num_shards: int, size: tuple[int, int]) -> Iterator[writer.Record]:
    for key in data.keys[shard::num_shards]:
        label, payload = data.image(key)
        where = f"{data.rec_path} key {key}"
        jpeg, _ = images.as_jpeg(payload, where, size)
        yield writer.Record(jpeg, label, source=f"mxrec:{key}")


def convert(rec_path: str, out_dir: str, num_shards: int, *, resume: bool = True, log=None) -> schema.Manifest:
    """train.rec (+ .idx, property) -> sharded TFRecords + manifest in out_dir."""
    data = FaceRecords(rec_path)
    num_classes, size = data.num_classes, data.image_size
    if num_classes is None:  # no property file: classes from the labels (one pass over the headers)
        num_classes = 1 + max(data.image(k)[0] for k in data.keys)
    if size is None:
        _, size = images.as_jpeg(data.image(data.keys[0])[1], f"{rec_path} key {data.keys[0]}")
    return writer.write_sharded(
        out_dir,
        num_shards,
        lambda k: shard_records(data, k, num_shards, size),
        num_classes=num_classes,
        image_size=size,
        resume=resume,
        job={"mxrec": rec_path, "images": len(data.keys)},
        log=log,
    )


def _sibling(rec_path: str, suffix: str, replace_name: bool = False) -> str:
    if replace_name:
        return storage.join(storage.dirname(rec_path), suffix)
    return rec_path[:-4] + suffix if rec_path.endswith(".rec") else rec_path + suffix


def _read_index(idx_path: str) -> dict[int, int]:
    storage.prepare(idx_path)
    try:
        with tf.io.gfile.GFile(idx_path, "r") as f:
            lines = f.read().splitlines()
    except tf.errors.OpError as e:
        raise schema.DataError(f"{idx_path}: cannot read the RecordIO index ({schema.first_line(e)})") from None
    offsets = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            key, off = line.split("\t")
            offsets[int(key)] = int(off)
        except ValueError:
            raise schema.DataError(f"{idx_path}: line {n} is not 'key<TAB>offset': {line[:80]!r}") from None
    if not offsets:
        raise schema.DataError(f"{idx_path}: empty index")
    return offsets


def _read_property(path: str) -> tuple[int, tuple[int, int]] | None:
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read().strip()
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise schema.DataError(f"{path}: expected 'num_classes,height,width', got {text[:80]!r}") from None
    if min(c, h, w) < 1:
        raise schema.DataError(f"{path}: values must be positive, got {text!r}")
    return c, (h, w)
