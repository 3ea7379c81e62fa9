"""Paths on local disks and object storage, and the process exit that object storage needs.

URL schemes other than the local file system (s3://, gs://, hdfs://, ...) are served by
tensorflow-io's file systems, which register when `tensorflow_io` is imported. The import costs a
second and loads native libraries, so it happens only for URLs.

tensorflow-io's S3 file system aborts the interpreter at exit (tensorflow/io #2039: "pure virtual
method called", exit code 134) even after all work succeeded. A process that touched object
storage therefore ends with `exit_process(code)`: flush, then `os._exit`.
"""

from __future__ import annotations

import os
import sys

_URL_SCHEMES = ("s3", "gs", "hdfs", "viewfs", "az", "oss", "http", "https")
_used_object_storage = False


def scheme(path: str) -> str:
    """'s3' for 's3://bucket/key', '' for local paths (including 'file://')."""
    if "://" not in path:
        return ""
    head = path.split("://", 1)[0].lower()
    return "" if head == "file" else head


def is_url(path: str) -> bool:
    return scheme(path) != ""


def prepare(path: str) -> str:
    """Make `path` readable/writable by tf.io.gfile and tf.data; returns it unchanged.

    For object-storage URLs this imports tensorflow_io (registering its file systems) and records
    that the process must end through `exit_process`.
    """
    global _used_object_storage
    s = scheme(path)
    if not s:
        return path
    if s not in _URL_SCHEMES:
        raise ValueError(
            f"{path}: unsupported URL scheme '{s}://' (supported: " + ", ".join(f"{x}://" for x in _URL_SCHEMES) + ")"
        )
    _used_object_storage = True
    import tensorflow_io  # noqa: F401  (registers s3://, hdfs://, ... with tf.io.gfile)

    return path


def join(base: str, *names: str) -> str:
    """os.path.join that keeps URLs intact ('s3://b/dir' + 'f' -> 's3://b/dir/f')."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(base, *names)


def dirname(path: str) -> str:
    if is_url(path):
        head, _, _ = path.rstrip("/").rpartition("/")
        return head
    return os.path.dirname(path) or "."


def basename(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def exit_process(code: int) -> None:
    """Flush stdout/stderr and end the process now with `code`, skipping interpreter teardown
    (where tensorflow-io's S3 client aborts)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def exit_if_object_storage(code: int) -> int:
    """`exit_process(code)` when this process touched object storage, else return `code`."""
    if _used_object_storage:
        exit_process(code)
    return code
