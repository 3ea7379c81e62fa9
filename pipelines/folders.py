"""ImageFolder datasets: one sub-folder per identity, converted to sharded TFRecords.

    SRC/alice/001.jpg, SRC/alice/002.png, SRC/bob/x.jpg, ...

Classes are the sub-folders in sorted order (label = position), so the same tree always gives the
same labels. Files are taken in sorted order; hidden files and names without an image extension are
ignored. An empty SRC, or an identity folder without images, is an error naming the folder.

Every file is decoded once before anything is written, so one run names every undecodable file
(and `skip_bad` writes the rest, listing the skipped files in the manifest). Images are stored at
`size` x `size` (default 112, the face convention); a non-square image is centre-cropped to a
square first (`fit="crop"`, the default: no distortion, the face in the middle is kept) or padded
to one with black (`fit="pad"`: nothing is cut off).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from pipelines import images, schema, writer

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DEFAULT_SIZE = 112
_LISTED = 20  # bad files named in the error line; the rest are counted


@dataclass(frozen=True)
class Bad:
    file: str
    reason: str


def scan(src: str) -> tuple[list[str], list[tuple[str, int]]]:
    """-> (class names, [(file path, label)]) in a fixed order."""
    if not os.path.isdir(src):
        raise schema.DataError(f"{src}: not a directory")
    classes = sorted(d for d in os.listdir(src) if not d.startswith(".") and os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise schema.DataError(f"{src}: no identity sub-folders (expected SRC/<identity>/<image files>)")
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(src, name)
        files = sorted(
            f
            for f in os.listdir(folder)
            if not f.startswith(".") and f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(folder, f))
        )
        if not files:
            raise schema.DataError(f"{folder}: identity folder has no image files ({', '.join(EXTENSIONS)})")
        items.extend((os.path.join(folder, f), label) for f in files)
    return classes, items


def check(items: list[tuple[str, int]]) -> list[Bad]:
    """Decode every file; -> the ones that fail, with why."""
    bad = []
    for path, _ in items:
        try:
            with open(path, "rb") as f:
                images.decode(f.read(), path)
        except (OSError, schema.DataError) as e:
            bad.append(Bad(path, str(e).removeprefix(f"{path}: ")))
    return bad


def bad_files_error(src: str, bad: list[Bad]) -> schema.DataError:
    named = "; ".join(f"{b.file} ({b.reason})" for b in bad[:_LISTED])
    more = f"; and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    return schema.DataError(
        f"{src}: {len(bad)} file(s) cannot be read as images: {named}{more}. "
        "Fix or remove them, or pass --skip-bad to write the others (the skipped "
        "files are listed in the manifest)"
    )


def shard_records(
    classes: list[str], items: list[tuple[str, int]], shard: int, num_shards: int, size: tuple[int, int], fit: str
) -> Iterator[writer.Record]:
    for path, label in items[shard::num_shards]:
        with open(path, "rb") as f:
            jpeg, _ = images.as_jpeg(f.read(), path, size, fit=fit)
        yield writer.Record(jpeg, label, name=classes[label], source=path)


def convert(
    src: str,
    out_dir: str,
    num_shards: int,
    *,
    size: int = DEFAULT_SIZE,
    fit: str = "crop",
    skip_bad: bool = False,
    resume: bool = True,
    log=None,
) -> schema.Manifest:
    """SRC/<identity>/<images> -> sharded TFRecords of size x size JPEGs + manifest.

    Every file is checked first: undecodable ones are all named in one DataError, or with
    `skip_bad` left out, counted in the log and listed in the manifest's `skipped`.
    """
    if fit not in images.FITS:
        raise ValueError(f"fit must be one of {images.FITS}, got {fit!r}")
    classes, items = scan(src)
    bad = check(items)
    if bad and not skip_bad:
        raise bad_files_error(src, bad)
    if bad and log:
        log(f"{src}: skipping {len(bad)} unreadable file(s) (listed in the manifest's skipped)")
    left_out = {b.file for b in bad}
    items = [it for it in items if it[0] not in left_out]
    empty = sorted({classes[label] for label in range(len(classes))} - {classes[label] for _, label in items})
    if empty:
        raise schema.DataError(
            f"{os.path.join(src, empty[0])}: every image of this identity is unreadable ({len(empty)} such identities)"
        )
    return writer.write_sharded(
        out_dir,
        num_shards,
        lambda k: shard_records(classes, items, k, num_shards, (size, size), fit),
        num_classes=len(classes),
        image_size=(size, size),
        resume=resume,
        job={"images": os.path.abspath(src), "files": len(items), "fit": fit},
        log=log,
        skipped=[{"file": b.file, "reason": b.reason} for b in bad],
    )
