"""Checkpoints that resume at any world size, written atomically.

Layout of one checkpoint (a directory on a filesystem every worker sees):

    ckpt-000001200/
      manifest.json            format, step, C, D, world size, dtypes, shards and their files
      backbone.npz             the replicated backbone's variables (worker 0 writes it)
      backbone_optimizer.npz   its optimizer's variables
      fc/weight.00000.bin      worker 0's class rows [start, end) x D, raw, in param dtype
      fc/momentum.00000.bin    each optimizer state row-aligned with the weight (SGD momentum,
      fc/count.00000.bin       AdamW m, v and per-row counts), one file per worker and variable
      fc/rank.00000.json       worker-local state (the Partial FC sampler)

Shard files hold rows, not worker-specific layouts, so a new world size reads the class range it
now owns from whichever old files overlap it: the full matrix and its optimizer state are the same
rows before and after. Writes go to `ckpt-….tmp`, then worker 0 writes the manifest and renames
the directory: a crash leaves the previous checkpoint as it was, and a directory without a
manifest is never loaded. Only the newest `keep` are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import tensorflow as tf

from partitioned_fc.sharding import write_rows

FORMAT = "partitioned-fc checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9})$")
_BLOCK_ROWS = 65536  # rows per host transfer: bounds a save/restore's extra memory


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names the path and what is wrong."""


@dataclass
class FCState:
    """What a worker checkpoints of the model-parallel layer: its class range, the shard, the
    optimizer's row-aligned state variables and its small local state (the sampler)."""
    class_range: tuple[int, int]
    weight: tf.Variable
    slots: dict[str, tf.Variable]
    sampler: tf.random.Generator | None = None


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}"


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints (with a manifest) in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(n for n in os.listdir(directory) if _NAME.match(n)
                   and os.path.isfile(os.path.join(directory, n, "manifest.json")))
    return [os.path.join(directory, n) for n in names]


def latest(directory: str) -> str | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save(directory: str, step: int, comm, fc: FCState, backbone_vars: Sequence[tf.Variable],
         backbone_opt_vars: Sequence[tf.Variable], meta: dict, keep: int = 3) -> str:
    """Every worker calls this at the same step. Returns the checkpoint's path.

    meta: JSON-serializable facts of the run (C, D, configs, data position) put in the manifest
    by worker 0; `num_classes` and `embedding_dim` are required.
    """
    final = os.path.join(directory, checkpoint_name(step))
    tmp = final + ".tmp"
    if comm.rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        os.makedirs(os.path.join(tmp, "fc"))
    comm.barrier()
    start, end = fc.class_range
    files = {}
    for name, var in {"weight": fc.weight, **fc.slots}.items():
        files[name] = f"fc/{name}.{comm.rank:05d}.bin"
        _write_rows(os.path.join(tmp, files[name]), var)
    local = {"rank": comm.rank, "class_range": [start, end], "files": files,
             "sampler_state": fc.sampler.state.numpy().tolist() if fc.sampler is not None else None}
    _write_json(os.path.join(tmp, f"fc/rank.{comm.rank:05d}.json"), local)
    if comm.rank == 0:
        _write_npz(os.path.join(tmp, "backbone.npz"), backbone_vars)
        _write_npz(os.path.join(tmp, "backbone_optimizer.npz"), backbone_opt_vars)
    comm.barrier()
    if comm.rank == 0:
        shards = [_read_json(os.path.join(tmp, f"fc/rank.{r:05d}.json")) for r in range(comm.size)]
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
            "world_size": comm.size, "created": time.time(),
            "fc": {"weight_dtype": fc.weight.dtype.name,
                   "slots": {k: v.dtype.name for k, v in fc.slots.items()},
                   "shards": [{k: s[k] for k in ("rank", "class_range", "files")} for s in shards]},
            "backbone": {"variables": [getattr(v, "path", v.name) for v in backbone_vars],
                         "optimizer_variables": len(backbone_opt_vars)},
            **meta,
        }
        _write_json(os.path.join(tmp, "manifest.json"), manifest)
        if os.path.exists(final):  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(directory)
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def read_manifest(path: str) -> dict:
    file = os.path.join(path, "manifest.json")
    try:
        manifest = _read_json(file)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json; an interrupted write "
                              "leaves none)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable: {e}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {manifest.get('format_version')} is not "
                              f"{FORMAT_VERSION}, the one this version reads")
    for key in ("step", "num_classes", "embedding_dim", "world_size", "fc", "backbone"):
        if key not in manifest:
            raise CheckpointError(f"{file}: missing key {key!r}")
    return manifest


def check_compatible(path: str, manifest: dict, num_classes: int, embedding_dim: int) -> None:
    """C and D must match the run's: a checkpoint of another problem is an error, never re-initialized."""
    for key, want in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
        if manifest[key] != want:
            raise CheckpointError(f"{path}: checkpoint has {key}={manifest[key]} but the config says "
                                  f"{want}; start a new run (checkpoint.resume: none) or fix the config")


def restore(path: str, comm, fc: FCState, backbone_vars: Sequence[tf.Variable],
            backbone_opt_vars: Sequence[tf.Variable]) -> dict:
    """Load a checkpoint written at any world size into this worker's variables; -> manifest."""
    manifest = read_manifest(path)
    info = manifest["fc"]
    wanted = {"weight": fc.weight, **fc.slots}
    if set(info["slots"]) != set(fc.slots):
        raise CheckpointError(
            f"{path}: the class matrix's optimizer state is {sorted(info['slots']) or 'none'} but this "
            f"run's optimizer has {sorted(fc.slots) or 'none'}; use the same optimizer to resume")
    start, end = fc.class_range
    for shard in info["shards"]:
        o_start, o_end = shard["class_range"]
        lo, hi = max(start, o_start), min(end, o_end)
        if lo >= hi:
            continue
        for name, var in wanted.items():
            dtype = tf.as_dtype(info["weight_dtype"] if name == "weight" else info["slots"][name])
            _read_rows(os.path.join(path, shard["files"][name]), var, dtype, o_start, o_end, lo, hi, start)
    if fc.sampler is not None and manifest["world_size"] == comm.size:
        local = _read_json(os.path.join(path, f"fc/rank.{comm.rank:05d}.json"))
        if local.get("sampler_state") is not None:
            fc.sampler.reset(tf.constant(local["sampler_state"], tf.int64))
    restore_backbone(path, backbone_vars)
    _restore_npz(os.path.join(path, "backbone_optimizer.npz"), backbone_opt_vars)
    return manifest


def restore_backbone(path: str, backbone_vars: Sequence[tf.Variable]) -> dict:
    """Only the backbone (for evaluation and export); -> manifest."""
    manifest = read_manifest(path)
    _restore_npz(os.path.join(path, "backbone.npz"), backbone_vars)
    return manifest


def class_blocks(path: str, rows: int = _BLOCK_ROWS):
    """Yield (first class, weight rows float32 [n, D]) of a checkpoint's class matrix, in class order."""
    manifest = read_manifest(path)
    info = manifest["fc"]
    dtype = tf.as_dtype(info["weight_dtype"])
    for shard in sorted(info["shards"], key=lambda s: s["class_range"][0]):
        o_start, o_end = shard["class_range"]
        for lo in range(o_start, o_end, rows):
            hi = min(o_end, lo + rows)
            var = tf.Variable(tf.zeros([hi - lo, manifest["embedding_dim"]], dtype))
            _read_rows(os.path.join(path, shard["files"]["weight"]), var, dtype, o_start, o_end, lo, hi, lo)
            yield lo, tf.cast(var, tf.float32).numpy()


# --- files -----------------------------------------------------------------------------------

def _write_rows(file: str, var: tf.Variable) -> None:
    rows = int(var.shape[0])
    with open(file, "wb") as f:
        for lo in range(0, rows, _BLOCK_ROWS):
            f.write(tf.gather(var, tf.range(lo, min(rows, lo + _BLOCK_ROWS))).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def _read_rows(file: str, var: tf.Variable, dtype: tf.DType, o_start: int, o_end: int,
               lo: int, hi: int, start: int) -> None:
    """Copy classes [lo, hi) from a file holding classes [o_start, o_end) into `var` (classes from start)."""
    row_shape = var.shape[1:]
    row_elems = int(np.prod(row_shape)) if row_shape.rank else 1
    row_bytes = row_elems * dtype.size
    want = (o_end - o_start) * row_bytes
    try:
        size = os.path.getsize(file)
    except OSError as e:
        raise CheckpointError(f"{file}: missing shard file ({e.strerror})") from None
    if size != want:
        raise CheckpointError(f"{file}: {size} bytes, expected {want} for classes [{o_start}, {o_end}) "
                              f"of {dtype.name} rows {list(row_shape)}: truncated or foreign")
    np_dtype = dtype.as_numpy_dtype
    def blocks(f):
        for b_lo in range(lo, hi, _BLOCK_ROWS):
            b_hi = min(hi, b_lo + _BLOCK_ROWS)
            f.seek((b_lo - o_start) * row_bytes)
            block = np.frombuffer(f.read((b_hi - b_lo) * row_bytes), np_dtype)
            yield b_lo - start, block.reshape([b_hi - b_lo, *row_shape.as_list()])

    with open(file, "rb") as f:
        write_rows(var, blocks(f))


def _write_npz(file: str, variables: Sequence[tf.Variable]) -> None:
    with open(file, "wb") as f:
        np.savez(f, **{f"v{i:05d}": _host(v) for i, v in enumerate(variables)})
        f.flush()
        os.fsync(f.fileno())


def _host(v: tf.Variable) -> np.ndarray:
    value = tf.convert_to_tensor(v)
    # npz cannot hold bfloat16: store 16-bit floats as float32, cast back on restore.
    return value.numpy() if value.dtype != tf.bfloat16 else tf.cast(value, tf.float32).numpy()


def _restore_npz(file: str, variables: Sequence[tf.Variable]) -> None:
    try:
        with np.load(file) as data:
            arrays = [data[k] for k in sorted(data.files)]
    except OSError as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if len(arrays) != len(variables):
        raise CheckpointError(f"{file}: holds {len(arrays)} variables, this model has {len(variables)}: "
                              "a different backbone or optimizer")
    for i, (v, a) in enumerate(zip(variables, arrays)):
        if tuple(a.shape) != tuple(v.shape):
            raise CheckpointError(f"{file}: variable {i} ({v.name}) has shape {list(a.shape)} in the "
                                  f"checkpoint but {v.shape.as_list()} in this model")
        v.assign(tf.cast(a, v.dtype))


def _write_json(file: str, obj) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_json(file: str):
    with open(file) as f:
        return json.load(f)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
