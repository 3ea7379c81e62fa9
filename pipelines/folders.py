"""ImageFolder datasets: one sub-folder per identity, converted to sharded TFRecords.

    SRC/alice/001.jpg, SRC/alice/002.png, SRC/bob/x.jpg, ...

Classes are the sub-folders in sorted order (label = position), so the same tree always gives the
same labels. Files are taken in sorted order; hidden files and names without an image extension are
ignored. An empty SRC, or an identity folder without images, is an error naming the folder.
"""
from __future__ import annotations

import os
from typing import Iterator

from pipelines import images, schema, writer

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def scan(src: str) -> tuple[list[str], list[tuple[str, int]]]:
    """-> (class names, [(file path, label)]) in a fixed order."""
    if not os.path.isdir(src):
        raise schema.DataError(f"{src}: not a directory")
    classes = sorted(d for d in os.listdir(src)
                     if not d.startswith(".") and os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise schema.DataError(f"{src}: no identity sub-folders (expected SRC/<identity>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(src, name)
        files = sorted(f for f in os.listdir(folder)
                       if not f.startswith(".") and f.lower().endswith(EXTENSIONS)
                       and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise schema.DataError(f"{folder}: identity folder has no image files ({', '.join(EXTENSIONS)})")
        items.extend((os.path.join(folder, f), label) for f in files)
    return classes, items


def shard_records(classes: list[str], items: list[tuple[str, int]], shard: int, num_shards: int,
                  size: tuple[int, int]) -> Iterator[writer.Record]:
    for path, label in items[shard::num_shards]:
        with open(path, "rb") as f:
            jpeg, _ = images.as_jpeg(f.read(), path, size)
        yield writer.Record(jpeg, label, name=classes[label], source=path)


def convert(src: str, out_dir: str, num_shards: int, *, size: tuple[int, int] | None = None,
            resume: bool = True, log=None) -> schema.Manifest:
    """SRC/<identity>/<images> -> sharded TFRecords + manifest. `size`: (H, W) to resize to
    (default: the first image's size; images of other sizes are resized to it)."""
    classes, items = scan(src)
    if size is None:
        with open(items[0][0], "rb") as f:
            _, size = images.as_jpeg(f.read(), items[0][0])
    return writer.write_sharded(out_dir, num_shards,
                                lambda k: shard_records(classes, items, k, num_shards, size),
                                num_classes=len(classes), image_size=size, resume=resume,
                                job={"images": os.path.abspath(src), "files": len(items)}, log=log)
