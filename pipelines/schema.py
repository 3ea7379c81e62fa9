"""The dataset format: one `tf.train.Example` per image, sharded TFRecord files, a JSON manifest.

Example features (every record):

| key              | type   | content                                               |
|------------------|--------|-------------------------------------------------------|
| `image/encoded`  | bytes  | the JPEG file's bytes (3 channels after decoding)     |
| `image/label`    | int64  | class (identity) index in `[0, num_classes)`          |
| `image/name`     | bytes  | optional: identity name (folder name, ...), UTF-8     |
| `image/source`   | bytes  | optional: where the image came from (path, rec key)   |

Layout of a dataset directory (local or object storage):

    DIR/manifest.json
    DIR/PREFIX-00000-of-00064.tfrecord ... PREFIX-00063-of-00064.tfrecord
    DIR/verification.bin                 (optional, InsightFace .bin format)

The manifest holds what readers would otherwise have to count: see `Manifest`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import tensorflow as tf

from pipelines import storage

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/label"
NAME_KEY = "image/name"
SOURCE_KEY = "image/source"

_SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord$")


class DataError(ValueError):
    """Bad input data: the message names the file (and the record index where there is one)."""


class ManifestError(DataError):
    """A missing, unreadable or inconsistent manifest; the message names the manifest file."""


def shard_name(prefix: str, index: int, total: int) -> str:
    """'train', 3, 64 -> 'train-00003-of-00064.tfrecord'."""
    return f"{prefix}-{index:05d}-of-{total:05d}.tfrecord"


def encode_example(image: bytes, label: int, name: str = "", source: str = "") -> bytes:
    """Serialize one record (a `tf.train.Example`) in this schema."""

    def _bytes(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {IMAGE_KEY: _bytes(image), LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}
    if name:
        feature[NAME_KEY] = _bytes(name.encode("utf-8"))
    if source:
        feature[SOURCE_KEY] = _bytes(source.encode("utf-8"))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def feature_spec(with_identity: bool = False) -> dict:
    """The `tf.io.parse_*_example` spec; the optional keys default to ''."""
    spec = {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string), LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}
    if with_identity:
        spec[NAME_KEY] = tf.io.FixedLenFeature([], tf.string, default_value="")
        spec[SOURCE_KEY] = tf.io.FixedLenFeature([], tf.string, default_value="")
    return spec


@dataclasses.dataclass
class Manifest:
    """What a dataset directory holds, so that readers never count.

    num_classes: labels are in [0, num_classes).
    image_size: (height, width) the reader resizes to by default (the images' size when written).
    shards: shard file names, relative to the manifest's directory, in shard order.
    examples_per_shard: records in each shard (same order).
    verification: optional InsightFace .bin file names (relative), e.g. ["verification.bin"].
    skipped: source files a converter left out as unreadable (`pfc convert images --skip-bad`),
    each {"file": path, "reason": why}.
    """

    num_classes: int
    image_size: tuple[int, int]
    shards: list[str]
    examples_per_shard: list[int]
    verification: list[str] = dataclasses.field(default_factory=list)
    format_version: int = FORMAT_VERSION
    skipped: list[dict] = dataclasses.field(default_factory=list)

    @property
    def num_examples(self) -> int:
        return sum(self.examples_per_shard)

    def validate(self, where: str = "manifest") -> Manifest:
        """Raise ManifestError naming `where` and the bad field; return self when valid."""

        def bad(msg):
            raise ManifestError(f"{where}: {msg}")

        if self.format_version != FORMAT_VERSION:
            bad(f"format_version {self.format_version!r} is not supported (this reader: {FORMAT_VERSION})")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            bad(f"num_classes must be a positive integer, got {self.num_classes!r}")
        size = tuple(self.image_size) if isinstance(self.image_size, (list, tuple)) else None
        if not size or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            bad(f"image_size must be [height, width] of positive integers, got {self.image_size!r}")
        self.image_size = size
        if not self.shards:
            bad("shards is empty")
        if len(self.shards) != len(self.examples_per_shard):
            bad(f"{len(self.shards)} shards but {len(self.examples_per_shard)} examples_per_shard entries")
        for name, n in zip(self.shards, self.examples_per_shard):
            if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
                bad(f"shard name {name!r} must be a plain file name")
            if not isinstance(n, int) or n < 0:
                bad(f"examples_per_shard for {name} must be a non-negative integer, got {n!r}")
        if len(set(self.shards)) != len(self.shards):
            bad("shard names repeat")
        for name in self.verification:
            if not isinstance(name, str) or not name or "/" in name:
                bad(f"verification file name {name!r} must be a plain file name")
        if not isinstance(self.skipped, list) or not all(
            isinstance(x, dict) and set(x) == {"file", "reason"} for x in self.skipped
        ):
            bad('skipped must be a list of {"file": ..., "reason": ...} objects')
        return self

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ManifestError(f"{where}: unknown keys {unknown}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(d))
        if missing:
            raise ManifestError(f"{where}: missing keys {missing}")
        return cls(**d).validate(where)

    def save(self, directory: str) -> str:
        """Write DIR/manifest.json atomically (temp name, then rename); returns its path."""
        self.validate(storage.join(directory, MANIFEST_NAME))
        path = storage.join(directory, MANIFEST_NAME)
        write_atomic(path, self.to_json().encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str) -> Manifest:
        """Load from a dataset directory or from the manifest file itself."""
        path = manifest_path(path)
        storage.prepare(path)
        try:
            with tf.io.gfile.GFile(path, "rb") as f:
                text = f.read().decode("utf-8")
        except tf.errors.NotFoundError:
            raise ManifestError(
                f"{path}: manifest not found (a dataset directory needs "
                f"{MANIFEST_NAME}; write datasets with `pfc data synth` or `pfc convert`)"
            ) from None
        except (tf.errors.OpError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path}: cannot read manifest: {first_line(e)}") from None
        return cls.from_json(text, where=path)

    def shard_paths(self, directory: str) -> list[str]:
        return [storage.join(directory, s) for s in self.shards]


def manifest_path(path: str) -> str:
    """DIR -> DIR/manifest.json; a path ending in manifest.json is returned as is."""
    return path if storage.basename(path) == MANIFEST_NAME else storage.join(path.rstrip("/"), MANIFEST_NAME)


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """'train-00003-of-00064.tfrecord' -> ('train', 3, 64); None for other names."""
    m = _SHARD_RE.match(name)
    return (m["prefix"], int(m["index"]), int(m["total"])) if m else None


def write_atomic(path: str, data: bytes) -> None:
    """Write a small file under a temporary name in the same directory, then rename it."""
    storage.prepare(path)
    tmp = temp_name(path)
    with tf.io.gfile.GFile(tmp, "wb") as f:
        f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def temp_name(path: str) -> str:
    """Where `path` is written before its rename: a hidden name no reader's glob matches."""
    d, b = storage.dirname(path), storage.basename(path)
    return storage.join(d, f".{b}.tmp-{os.getpid()}")


def first_line(e: Exception) -> str:
    msg = getattr(e, "message", None) or str(e)
    return msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
