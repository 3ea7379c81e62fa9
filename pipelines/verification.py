"""InsightFace verification sets (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...), read safely.

A `.bin` file is a pickle of `(bins, issame)`: `bins` a list of 2N encoded images (JPEG bytes; the
pair i is bins[2i], bins[2i+1]), `issame` a list of N booleans. Files written by Python 2 hold
`str` objects, read back as bytes; some hold numpy arrays of bytes or numpy booleans.

Unpickling can run arbitrary code (a pickle may name any importable callable, e.g. os.system),
so `load_pairs` uses an Unpickler that resolves only the few globals these files need and refuses
everything else with an error naming the file and the global, before anything is called.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import tensorflow as tf

from pipelines import schema, storage

# Globals a .bin may reference: bytes as written by Python 3 at protocol <= 2 (_codecs.encode),
# numpy arrays and scalars (the reconstruct helpers of both numpy 1.x and 2.x module layouts).
_ALLOWED = {
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "bool"),
    ("__builtin__", "bytearray"),
    ("__builtin__", "bool"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise schema.DataError(
                f"{self._where}: refusing to unpickle global {module}.{name} (a verification .bin "
                "holds only byte strings and booleans; this file is corrupt or malicious)"
            )
        if module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def load_pairs(path: str) -> tuple[list[bytes], np.ndarray]:
    """The raw content of a .bin: (2N encoded images, issame bool [N]), validated."""
    storage.prepare(path)
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except tf.errors.OpError as e:
        raise schema.DataError(f"{path}: cannot read verification set ({schema.first_line(e)})") from None
    try:
        obj = _RestrictedUnpickler(data, path).load()
    except schema.DataError:
        raise
    except Exception as e:  # truncated or malformed pickle streams raise many kinds
        raise schema.DataError(f"{path}: not a verification .bin pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise schema.DataError(f"{path}: expected a pickled (bins, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    try:
        images = [_as_bytes(b) for b in bins]
        same = np.array([bool(s) for s in issame], dtype=bool)
    except (TypeError, ValueError) as e:
        raise schema.DataError(f"{path}: unexpected content ({e})") from None
    if len(images) != 2 * len(same):
        raise schema.DataError(f"{path}: {len(images)} images for {len(same)} pairs (need 2 per pair)")
    return images, same


def load_bin(path: str, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Decode a .bin for evaluation: (images float32 [2N, H, W, 3] in [-1, 1], issame bool [N]).

    Pair i is images[2i], images[2i+1]. Images are resized to image_size when they differ.
    """
    images, same = load_pairs(path)
    h, w = image_size
    out = np.empty((len(images), h, w, 3), np.float32)
    for i, b in enumerate(images):
        try:
            img = tf.io.decode_image(b, channels=3, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            raise schema.DataError(f"{path}: image {i} (pair {i // 2}) is not a decodable image") from None
        if img.shape[0] != h or img.shape[1] != w:
            img = tf.image.resize(img, [h, w])
        out[i] = tf.cast(img, tf.float32).numpy() / 127.5 - 1.0
    return out, same


def save_bin(path: str, images: list[bytes], issame: list[bool]) -> None:
    """Write a .bin in InsightFace's format (atomically): pickle of (list of bytes, list of bool)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs (need 2 per pair)")
    data = pickle.dumps(([bytes(b) for b in images], [bool(s) for s in issame]), protocol=4)
    schema.write_atomic(path, data)


def _as_bytes(b) -> bytes:
    if isinstance(b, (bytes, bytearray)):
        return bytes(b)
    if isinstance(b, np.ndarray) and b.dtype == np.uint8:
        return b.tobytes()
    raise TypeError(f"image entry of type {type(b).__name__}, expected bytes")


def load_labelled(path: str, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A labelled dataset (directory with a manifest) for closed-set evaluation, in file order:
    (images float32 [N, H, W, 3] in [-1, 1], labels int64 [N]). Bad records name file and index."""
    manifest = schema.Manifest.load(schema.manifest_path(path))
    images, labels = [], []
    for file in manifest.shard_paths(path):
        for i, raw in enumerate(tf.data.TFRecordDataset(file)):
            where = f"{file}: record {i}"
            try:
                ex = tf.io.parse_single_example(raw, schema.feature_spec())
                img = tf.io.decode_image(ex[schema.IMAGE_KEY], channels=3, expand_animations=False)
            except tf.errors.InvalidArgumentError as e:
                raise schema.DataError(f"{where}: not a decodable record ({schema.first_line(e)})") from None
            if tuple(img.shape[:2]) != tuple(image_size):
                img = tf.image.resize(img, image_size)
            images.append(tf.cast(img, tf.float32).numpy() / 127.5 - 1.0)
            labels.append(int(ex[schema.LABEL_KEY]))
    return np.stack(images) if images else np.zeros((0, *image_size, 3), np.float32), np.array(labels, np.int64)
