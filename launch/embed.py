"""`pfc embed MODEL INPUT OUT.npy`: unit embeddings of images with an exported model.

MODEL: a `pfc export` SavedModel. INPUT: a folder (its image files, sub-folders included, in
sorted order) or a dataset (a directory with manifest.json, a shard file or a glob). Writes
OUT.npy (float32 [N, D], unit norm, in input order) and OUT.names.txt (one name per line: the
file's path relative to the folder, or a record's source, else `shard:index`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import numpy as np

from launch import commands

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def add_parser(sub) -> None:
    p = commands.add(sub, "embed")
    p.add_argument("model", metavar="MODEL", help="a SavedModel written by pfc export")
    p.add_argument(
        "input",
        metavar="FOLDER_OR_RECORDS",
        help="a folder of images, or a dataset (directory with manifest.json, shard file, glob)",
    )
    p.add_argument("out", metavar="OUT.npy", help="embeddings [N, D]; names go to OUT.names.txt")
    p.add_argument(
        "--flip-sum",
        action="store_true",
        help="add the embedding of each image's mirror before normalizing (as pfc eval does)",
    )
    p.add_argument("--batch", type=int, default=64, help="images per call of the model (default 64)")
    p.set_defaults(func=run_embed)


def folder_images(folder: str) -> Iterator[tuple[str, bytes]]:
    """(path relative to `folder`, file bytes) of every image file below it, sorted."""
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    yield os.path.relpath(path, folder), f.read()


def dataset_records(path: str) -> Iterator[tuple[str, int, dict]]:
    """(shard file, index in it, parsed features) of every record of a dataset, in shard order."""
    import tensorflow as tf

    from pipelines import reader, schema

    _, _, files, _ = reader.resolve(path)
    for file in files:
        for i, raw in enumerate(tf.data.TFRecordDataset(file)):
            yield file, i, tf.io.parse_single_example(raw, schema.feature_spec(with_identity=True))


def record_images(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, JPEG bytes) of every record of a dataset, in shard order."""
    from pipelines import schema

    for file, i, ex in dataset_records(path):
        source = ex[schema.SOURCE_KEY].numpy().decode("utf-8", "replace")
        yield source or f"{os.path.basename(file)}:{i}", ex[schema.IMAGE_KEY].numpy()


def batches(items: Iterator[tuple[str, bytes]], size: int) -> Iterator[tuple[list[str], np.ndarray]]:
    """Decoded uint8 batches of images of one shape (a change of shape starts a new batch)."""
    from pipelines import images

    names, pixels = [], []
    for name, data in items:
        img = images.decode(data, name).numpy()
        if pixels and (img.shape != pixels[0].shape or len(pixels) == size):
            yield names, np.stack(pixels)
            names, pixels = [], []
        names.append(name)
        pixels.append(img)
    if pixels:
        yield names, np.stack(pixels)


def embed(model: str, source: str, *, flip_sum: bool = False, batch: int = 64) -> tuple[np.ndarray, list[str]]:
    """-> (embeddings float32 [N, D], names) of every image of `source` (folder or dataset)."""
    import tensorflow as tf

    serve = tf.saved_model.load(model).signatures["flip_sum" if flip_sum else "serving_default"]
    items = folder_images(source) if os.path.isdir(source) and not _is_dataset(source) else record_images(source)
    out, names = [], []
    for batch_names, pixels in batches(items, batch):
        out.append(serve(images=tf.constant(pixels))["embeddings"].numpy())
        names += batch_names
    if not names:
        from pipelines.schema import DataError

        raise DataError(f"{source}: no images found")
    return np.concatenate(out), names


def _is_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json"))


def run_embed(args: argparse.Namespace) -> int:
    emb, names = embed(args.model, args.input, flip_sum=args.flip_sum, batch=args.batch)
    np.save(args.out, emb)
    names_file = os.path.splitext(args.out)[0] + ".names.txt"
    with open(names_file, "w") as f:
        f.write("\n".join(names) + "\n")
    print(
        f"wrote {emb.shape[0]} embeddings of dimension {emb.shape[1]} to {args.out} and their names to {names_file}",
        flush=True,
    )
    return 0
