"""Checkpoints that resume at any world size, written atomically, every file checksummed.

Layout of one checkpoint (a directory on a filesystem every worker sees):

    ckpt-000001200/
      manifest.json            format, step, C, D, world size, dtypes, shards and their files,
                               and "files": {relative path: {"sha256", "bytes"}} of every other file
      manifest.sha256          the manifest's own digest (`sha256sum -c manifest.sha256` format)
      backbone.npz             the replicated backbone's variables (worker 0 writes it)
      backbone_optimizer.npz   its optimizer's variables
      fc/weight.00000.bin      worker 0's class rows [start, end) x D, raw, in param dtype
      fc/momentum.00000.bin    each optimizer state row-aligned with the weight (SGD momentum,
      fc/count.00000.bin       AdamW m, v and per-row counts), one file per worker and variable
      fc/rank.00000.json       worker-local state (the Partial FC sampler) and the digests of the
                               files that worker wrote

Shard files hold rows, not worker-specific layouts, so a new world size reads the class range it
now owns from whichever old files overlap it: the full matrix and its optimizer state are the same
rows before and after. Writes go to `ckpt-….tmp`, then worker 0 writes the manifest and renames
the directory: a crash leaves the previous checkpoint as it was, and a directory without a
manifest is never loaded. A failed write (a full disk) is agreed by all workers, and worker 0
removes the partial directory. Every file is checked against its digest before it is used;
`choose_resume` skips a corrupt checkpoint for the one before. Only the newest `keep` are kept.
Manifests written before checksums (no "files") still load, unverified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from partitioned_fc.sharding import write_rows

FORMAT = "partitioned-fc checkpoint"
FORMAT_VERSION = 1  # checksums only add keys: readers of version 1 ignore them
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
BACKBONE_FILES = ("backbone.npz", "backbone_optimizer.npz")
_NAME = re.compile(r"^ckpt-(\d{9})$")
_PARTIAL = re.compile(r"^ckpt-\d+\.tmp$")
_BLOCK_ROWS = 65536  # rows per host transfer: bounds a save/restore's extra memory
_HASH_BYTES = 8 << 20  # read size when verifying a file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: names the path and what is wrong."""


@dataclass
class FCState:
    """What a worker checkpoints of the model-parallel layer: the rows of the class matrix it
    holds (`class_range`: (g·start, g·end) with g rows per class, Sub-center ArcFace's
    sub-centers; classes when g = 1), the shard, the optimizer's row-aligned state variables, its
    small local state (the sampler) and the margin's running statistics (the same on every
    worker: kept once, in the manifest)."""

    class_range: tuple[int, int]
    weight: tf.Variable
    slots: dict[str, tf.Variable]
    sampler: tf.random.Generator | None = None
    margin_state: dict[str, tf.Variable] = field(default_factory=dict)
    rows_per_class: int = 1


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}"


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoints (with a manifest) in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    names = sorted(
        n for n in os.listdir(directory) if _NAME.match(n) and os.path.isfile(os.path.join(directory, n, MANIFEST))
    )
    return [os.path.join(directory, n) for n in names]


def latest(directory: str) -> str | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def remove_partial(directory: str) -> list[str]:
    """Remove the `ckpt-*.tmp` directories earlier crashes left in `directory`; -> their paths.

    Only for the owner of the directory (the trainer, under the run's lock, on one worker): a save
    in progress writes into such a directory.
    """
    if not os.path.isdir(directory):
        return []
    stale = sorted(os.path.join(directory, n) for n in os.listdir(directory) if _PARTIAL.match(n))
    stale = [p for p in stale if os.path.isdir(p) and not os.path.islink(p)]
    for path in stale:
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot remove this partial checkpoint: {_errno_text(e)}") from None
    return stale


# --- save ------------------------------------------------------------------------------------


def save(
    directory: str,
    step: int,
    comm,
    fc: FCState,
    backbone_vars: Sequence[tf.Variable],
    backbone_opt_vars: Sequence[tf.Variable],
    meta: dict,
    keep: int = 3,
) -> str:
    """Every worker calls this at the same step. Returns the checkpoint's path.

    meta: JSON-serializable facts of the run (C, D, configs, data position) put in the manifest
    by worker 0; `num_classes` and `embedding_dim` are required. An OSError on any worker (a full
    disk) raises CheckpointError on every worker, the partial directory removed, the earlier
    checkpoints untouched.
    """
    final = os.path.join(directory, checkpoint_name(step))
    tmp = final + ".tmp"
    lead = comm.rank == 0
    _save_phase(comm, tmp, lambda: _prepare(directory, tmp) if lead else None)
    _save_phase(comm, tmp, lambda: _write_worker_files(tmp, comm, fc, backbone_vars, backbone_opt_vars))

    def commit():
        manifest = _manifest(tmp, step, comm.size, fc, backbone_vars, backbone_opt_vars, meta)
        _publish(directory, tmp, final, manifest, keep)

    _save_phase(comm, tmp, commit if lead else lambda: None)
    return final


def _save_phase(comm, tmp: str, work: Callable[[], object]) -> None:
    """One step of a save, agreed by all workers; on a failure worker 0 removes the partial `tmp`."""

    def cleanup() -> None:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    _agree(
        comm,
        work,
        lambda r: CheckpointError(
            f"{tmp}: cannot write the checkpoint: worker {r} failed writing its files (see its error){_left(tmp)}"
        ),
        cleanup,
    )


def _prepare(directory: str, tmp: str) -> None:
    with _writing(tmp, tmp):
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt at this step
        os.makedirs(os.path.join(tmp, "fc"))


def _write_worker_files(
    tmp: str, comm, fc: FCState, backbone_vars: Sequence[tf.Variable], backbone_opt_vars: Sequence[tf.Variable]
) -> None:
    """This worker's shard files, then its rank file with their digests (worker 0: and the backbone's)."""
    files, sums = {}, {}
    for name, var in {"weight": fc.weight, **fc.slots}.items():
        files[name] = f"fc/{name}.{comm.rank:05d}.bin"
        sums[files[name]] = _written(tmp, files[name], _write_rows, var)
    if comm.rank == 0:
        for rel, variables in zip(BACKBONE_FILES, (backbone_vars, backbone_opt_vars)):
            sums[rel] = _written(tmp, rel, _write_npz, variables)
    start, end = fc.class_range
    local = {
        "rank": comm.rank,
        "class_range": [start, end],
        "files": files,
        "checksums": sums,
        "sampler_state": fc.sampler.state.numpy().tolist() if fc.sampler is not None else None,
    }
    _written(tmp, _rank_file(comm.rank), _write_json, local)


def _manifest(
    tmp: str,
    step: int,
    size: int,
    fc: FCState,
    backbone_vars: Sequence[tf.Variable],
    backbone_opt_vars: Sequence[tf.Variable],
    meta: dict,
) -> dict:
    """Worker 0's manifest: the shards and the digests every worker recorded, and of the rank files."""
    shards, files = [], {}
    for r in range(size):
        file = os.path.join(tmp, _rank_file(r))
        with _writing(file, tmp):
            raw = _read_bytes(file)
        local = _parse_json(file, raw)
        shards.append({k: local[k] for k in ("rank", "class_range", "files")})
        files.update(local["checksums"])
        files[_rank_file(r)] = _digest(raw)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "world_size": size,
        "created": time.time(),
        "fc": {
            "weight_dtype": fc.weight.dtype.name,
            "slots": {k: v.dtype.name for k, v in fc.slots.items()},
            "shards": shards,
            "margin_state": {k: v.numpy().tolist() for k, v in fc.margin_state.items()},
            "rows_per_class": fc.rows_per_class,
        },
        "backbone": {
            "variables": [getattr(v, "path", v.name) for v in backbone_vars],
            "optimizer_variables": len(backbone_opt_vars),
        },
        **meta,
        "files": dict(sorted(files.items())),
    }


def _publish(directory: str, tmp: str, final: str, manifest: dict, keep: int) -> None:
    """Manifest and its digest, then the rename that makes the checkpoint visible, then pruning."""
    file = os.path.join(tmp, MANIFEST)
    with _writing(file, tmp):
        digest = _write_json(file, manifest)["sha256"]
        _write_bytes(os.path.join(tmp, MANIFEST_SUM), f"{digest}  {MANIFEST}\n".encode())
    with _writing(final, tmp):
        if os.path.exists(final):  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _writing(file: str, tmp: str) -> Iterator[None]:
    """An OSError (a full disk, a lost mount) -> one line naming the file being written."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"{file}: cannot write the checkpoint: {_errno_text(e)}{_left(tmp)}") from None


def _written(tmp: str, rel: str, write: Callable, *args) -> dict:
    file = os.path.join(tmp, rel)
    with _writing(file, tmp):
        return write(file, *args)


def _left(tmp: str) -> str:
    return f"; the partial {os.path.basename(tmp)} is removed, the earlier checkpoints are intact"


def _errno_text(e: OSError) -> str:
    name = errno.errorcode.get(e.errno) if e.errno is not None else None
    text = e.strerror or str(e)
    return f"{text} ({name})" if name else text


# --- agreement -------------------------------------------------------------------------------


def _agree(
    comm,
    work: Callable[[], object],
    others: Callable[[int], CheckpointError],
    on_failure: Callable[[], None] = lambda: None,
):
    """Run `work`, then agree on its success with every worker; a failure anywhere raises everywhere.

    An allgather of a flag, not a barrier: a worker that failed must not leave the others waiting.
    The failed worker raises its own error, the others `others(first failed worker)`.
    """
    try:
        result, error = work(), None
    except Exception as e:  # any error: the others must hear of it before this worker leaves
        result, error = None, e
    failed = _failed_workers(comm, error is not None)
    if failed:
        on_failure()
    if error is not None:
        raise error
    if failed:
        raise others(failed[0])
    return result


def _failed_workers(comm, failed: bool) -> list[int]:
    flags = comm.allgather(tf.constant([int(failed)], tf.int32)).numpy()
    return [r for r, flag in enumerate(flags.tolist()) if flag]


# --- restore ---------------------------------------------------------------------------------


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    try:
        raw = _read_bytes(file)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a checkpoint (no {MANIFEST}; an interrupted write leaves none)") from None
    except OSError as e:
        raise CheckpointError(f"{file}: unreadable: {e}") from None
    _check_manifest_digest(path, raw)
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {manifest.get('format_version')} is not "
            f"{FORMAT_VERSION}, the one this version reads"
        )
    for key in ("step", "num_classes", "embedding_dim", "world_size", "fc", "backbone"):
        if key not in manifest:
            raise CheckpointError(f"{file}: missing key {key!r}")
    return manifest


def _check_manifest_digest(path: str, raw: bytes) -> None:
    """The manifest's digest sits next to it; checkpoints written before checksums have none."""
    file = os.path.join(path, MANIFEST_SUM)
    try:
        recorded = _read_bytes(file).decode("ascii").split()[0]
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, IndexError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    _compare(os.path.join(path, MANIFEST), _digest(raw)["sha256"], recorded)


def check_compatible(path: str, manifest: dict, num_classes: int, embedding_dim: int) -> None:
    """C and D must match the run's: a checkpoint of another problem is an error, never re-initialized."""
    for key, want in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
        if manifest[key] != want:
            raise CheckpointError(
                f"{path}: checkpoint has {key}={manifest[key]} but the config says "
                f"{want}; start a new run (checkpoint.resume: none) or fix the config"
            )


def verify(path: str, class_range: tuple[int, int], comm=None) -> None:
    """Check the files a worker owning `class_range` would read from `path`, before any is used.

    For an explicit checkpoint.resume path: it never falls back. With `comm` every worker calls it,
    its rank file is checked too, and a failure on any worker raises on all of them.
    """
    if comm is None:
        _verify(path, class_range, None)
        return
    _agree(
        comm,
        lambda: _verify(path, class_range, comm),
        lambda r: CheckpointError(f"{path}: worker {r} found a corrupt or missing file in it (see its error)"),
    )


def choose_resume(directory: str, comm, class_range: tuple[int, int]) -> tuple[str | None, list[str]]:
    """checkpoint.resume: auto -> (the newest checkpoint whose files check out on every worker, or
    None when there is none; one-line notes on what was skipped or not verified).

    Each worker verifies what it would read for `class_range`; the workers agree on every
    candidate (an allgather), so all pick the same one. Every checkpoint corrupt: CheckpointError.
    """
    candidates = _shared_checkpoints(directory, comm)[::-1]
    notes, skipped = [], []
    for i, path in enumerate(candidates):
        checked, error = _try_verify(path, class_range, comm)
        failed = _failed_workers(comm, error is not None)
        if not failed:
            return path, notes + (
                [] if checked else [f"{_base(path)} has no checksums (written before they were recorded): not verified"]
            )
        reason = error or f"worker {failed[0]} found a corrupt or missing file (see its log)"
        skipped.append(f"{_base(path)}: {reason}")
        if i + 1 < len(candidates):
            notes.append(f"{_base(path)} is corrupt: {reason}; falling back to {_base(candidates[i + 1])}")
    if skipped:
        raise CheckpointError(
            f"{directory}: every checkpoint is corrupt: {'; '.join(skipped)}; start "
            "a new run (checkpoint.resume: none) or restore the files"
        )
    return None, []


def _try_verify(path: str, class_range: tuple[int, int], comm) -> tuple[bool, str | None]:
    """-> (whether it had checksums, the error or None); never raises, so no worker leaves the others."""
    try:
        return _verify(path, class_range, comm), None
    except CheckpointError as e:
        return False, str(e)
    except (KeyError, TypeError, ValueError) as e:  # a manifest of the right format but not its layout
        return False, f"{os.path.join(path, MANIFEST)}: malformed ({type(e).__name__}: {e})"


def _verify(path: str, class_range: tuple[int, int], comm) -> bool:
    """-> False when the checkpoint has no checksums (nothing to verify against)."""
    manifest = read_manifest(path)
    rank = comm.rank if comm is not None and manifest["world_size"] == comm.size else None
    for rel in _files_read(manifest, class_range, rank=rank):
        _verify_file(path, rel, manifest)
    return "files" in manifest


def _shared_checkpoints(directory: str, comm) -> list[str]:
    """list_checkpoints, checked to be the same on every worker (else they could pick different ones)."""
    found = list_checkpoints(directory)
    steps = [int(_NAME.match(_base(p)).group(1)) for p in found]
    counts = comm.allgather(tf.constant([len(steps)], tf.int64)).numpy()
    if counts.max() == 0:
        return found
    padded = steps + [-1] * (int(counts.max()) - len(steps))
    seen = comm.allgather(tf.constant(padded, tf.int64)).numpy().reshape([comm.size, -1])
    differ = [r for r in range(comm.size) if seen[r].tolist() != padded]
    if differ:
        raise CheckpointError(
            f"{directory}: worker {comm.rank} sees checkpoints {steps}, worker "
            f"{differ[0]} {[s for s in seen[differ[0]].tolist() if s >= 0]}: "
            "checkpoint.dir must be one filesystem every worker shares"
        )
    return found


def _files_read(manifest: dict, class_range: tuple[int, int], names=None, rank: int | None = None) -> list[str]:
    """What a worker owning `class_range` reads: the overlapping shards' files of the variables
    `names` (None: all), its rank file when `rank` is given, and the backbone's files."""
    start, end = class_range
    out = []
    for shard in manifest["fc"]["shards"]:
        o_start, o_end = shard["class_range"]
        if max(start, o_start) < min(end, o_end):
            out += [rel for name, rel in shard["files"].items() if names is None or name in names]
    return out + ([_rank_file(rank)] if rank is not None else []) + list(BACKBONE_FILES)


def _verify_file(path: str, rel: str, manifest: dict) -> None:
    """Check one file against the manifest's record (the whole file, streamed) before it is used."""
    table = manifest.get("files")
    if table is None:
        return  # written before checksums: nothing to check against
    file = os.path.join(path, rel)
    want = table.get(rel)
    if not isinstance(want, dict) or "sha256" not in want or "bytes" not in want:
        raise CheckpointError(f"{file}: no checksum for it in {MANIFEST}: the manifest and the files disagree")
    try:
        size = os.path.getsize(file)
        if size != want["bytes"]:
            raise CheckpointError(
                f"{file}: {size} bytes, expected {want['bytes']} (recorded in {MANIFEST}): truncated or replaced"
            )
        got = _hash_file(file)
    except OSError as e:
        raise CheckpointError(f"{file}: missing or unreadable ({_errno_text(e)})") from None
    _compare(file, got["sha256"], want["sha256"])


def _compare(file: str, got: str, want: str) -> None:
    if got != want:
        raise CheckpointError(
            f"{file}: checksum mismatch (sha256 {got[:16]}... expected {want[:16]}...): "
            "the file is corrupt; use an earlier checkpoint (checkpoint.resume: auto "
            "falls back to one)"
        )


def restore(
    path: str,
    comm,
    fc: FCState,
    backbone_vars: Sequence[tf.Variable],
    backbone_opt_vars: Sequence[tf.Variable],
    *,
    verified: bool = False,
) -> dict:
    """Load a checkpoint written at any world size into this worker's variables; -> manifest.

    Every file is verified before it is read, unless `verified` (this worker has just checked
    `path` with choose_resume or verify(..., comm): no second pass over big files). A failure on
    any worker raises on every worker.
    """
    return _agree(
        comm,
        lambda: _restore(path, comm, fc, backbone_vars, backbone_opt_vars, verified),
        lambda r: CheckpointError(f"{path}: worker {r} cannot restore it (see its error)"),
    )


def _restore(
    path: str,
    comm,
    fc: FCState,
    backbone_vars: Sequence[tf.Variable],
    backbone_opt_vars: Sequence[tf.Variable],
    verified: bool,
) -> dict:
    manifest = read_manifest(path)
    _check_slots(path, manifest["fc"], fc)
    wanted = {"weight": fc.weight, **fc.slots}
    # The sampler's stream continues only at the same world size (else it is re-seeded per shard).
    rank = comm.rank if fc.sampler is not None and manifest["world_size"] == comm.size else None
    if not verified:
        for rel in _files_read(manifest, fc.class_range, names=wanted, rank=rank):
            _verify_file(path, rel, manifest)
    _restore_rows(path, manifest["fc"], fc.class_range, wanted)
    # A statistic the checkpoint lacks (another margin's run) keeps its initial value.
    saved = manifest["fc"].get("margin_state", {})
    for name, var in fc.margin_state.items():
        if name in saved:
            var.assign(tf.constant(saved[name], var.dtype))
    if rank is not None:
        local = _load_json(os.path.join(path, _rank_file(rank)))
        if local.get("sampler_state") is not None:
            fc.sampler.reset(tf.constant(local["sampler_state"], tf.int64))
    _restore_npz(os.path.join(path, "backbone.npz"), backbone_vars)
    _restore_npz(os.path.join(path, "backbone_optimizer.npz"), backbone_opt_vars)
    return manifest


def _check_slots(path: str, info: dict, fc: FCState) -> None:
    saved_g = info.get("rows_per_class", 1)
    if saved_g != fc.rows_per_class:
        raise CheckpointError(
            f"{path}: the class matrix has {saved_g} row(s) per class (sub-centers) but this run's margin "
            f"has {fc.rows_per_class}; resume with the same loss (loss.k)"
        )
    if set(info["slots"]) != set(fc.slots):
        raise CheckpointError(
            f"{path}: the class matrix's optimizer state is {sorted(info['slots']) or 'none'} but this "
            f"run's optimizer has {sorted(fc.slots) or 'none'}; use the same optimizer to resume"
        )


def _restore_rows(path: str, info: dict, class_range: tuple[int, int], wanted: dict) -> None:
    """This worker's classes from every old shard that overlaps them."""
    start, end = class_range
    for shard in info["shards"]:
        o_start, o_end = shard["class_range"]
        lo, hi = max(start, o_start), min(end, o_end)
        if lo >= hi:
            continue
        for name, var in wanted.items():
            dtype = tf.as_dtype(info["weight_dtype"] if name == "weight" else info["slots"][name])
            _read_rows(os.path.join(path, shard["files"][name]), var, dtype, o_start, o_end, lo, hi, start)


def restore_backbone(path: str, backbone_vars: Sequence[tf.Variable]) -> dict:
    """Only the backbone (for evaluation and export), verified first; -> manifest."""
    manifest = read_manifest(path)
    _verify_file(path, "backbone.npz", manifest)
    _restore_npz(os.path.join(path, "backbone.npz"), backbone_vars)
    return manifest


def rows_per_class(path: str) -> int:
    """Rows per class of a checkpoint's class matrix (Sub-center ArcFace's k; else 1)."""
    return int(read_manifest(path)["fc"].get("rows_per_class", 1))


def class_blocks(path: str, rows: int = _BLOCK_ROWS):
    """Yield (first row, weight rows float32 [n, D]) of a checkpoint's class matrix, in row order
    (class c's rows are g·c .. g·c + g − 1, g = `rows_per_class(path)`).

    Every weight file is verified before the first block.
    """
    manifest = read_manifest(path)
    info = manifest["fc"]
    dtype = tf.as_dtype(info["weight_dtype"])
    shards = sorted(info["shards"], key=lambda s: s["class_range"][0])
    for shard in shards:
        _verify_file(path, shard["files"]["weight"], manifest)
    for shard in shards:
        o_start, o_end = shard["class_range"]
        for lo in range(o_start, o_end, rows):
            hi = min(o_end, lo + rows)
            var = tf.Variable(tf.zeros([hi - lo, manifest["embedding_dim"]], dtype))
            _read_rows(os.path.join(path, shard["files"]["weight"]), var, dtype, o_start, o_end, lo, hi, lo)
            yield lo, tf.cast(var, tf.float32).numpy()


# --- files -----------------------------------------------------------------------------------


def _rank_file(rank: int) -> str:
    return f"fc/rank.{rank:05d}.json"


def _base(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _write_rows(file: str, var: tf.Variable) -> dict:
    """Rows block by block, each block hashed as it is written (a big file is never read back)."""
    rows, digest, size = int(var.shape[0]), hashlib.sha256(), 0
    with open(file, "wb") as f:
        for lo in range(0, rows, _BLOCK_ROWS):
            block = _raw_bytes(tf.gather(var, tf.range(lo, min(rows, lo + _BLOCK_ROWS))))
            digest.update(block)
            f.write(block)
            size += block.nbytes
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def _raw_bytes(t: tf.Tensor) -> np.ndarray:
    # A flat uint8 view: hashlib and write take it without a copy, whatever the dtype (bfloat16 too).
    return np.ascontiguousarray(t.numpy()).view(np.uint8).reshape(-1)


def _read_rows(
    file: str, var: tf.Variable, dtype: tf.DType, o_start: int, o_end: int, lo: int, hi: int, start: int
) -> None:
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
        raise CheckpointError(
            f"{file}: {size} bytes, expected {want} for classes [{o_start}, {o_end}) "
            f"of {dtype.name} rows {list(row_shape)}: truncated or foreign"
        )
    np_dtype = dtype.as_numpy_dtype

    def blocks(f):
        for b_lo in range(lo, hi, _BLOCK_ROWS):
            b_hi = min(hi, b_lo + _BLOCK_ROWS)
            f.seek((b_lo - o_start) * row_bytes)
            block = np.frombuffer(f.read((b_hi - b_lo) * row_bytes), np_dtype)
            yield b_lo - start, block.reshape([b_hi - b_lo, *row_shape.as_list()])

    with open(file, "rb") as f:
        write_rows(var, blocks(f))


def _write_npz(file: str, variables: Sequence[tf.Variable]) -> dict:
    """np.savez's format, then its digest (zipfile seeks back to patch headers: hashed after).

    Written here, not by np.savez: on a failed write np.savez leaves its archive open, and the
    archive's finalizer fails again later with a stray traceback. One variable on the host at a time.
    """
    with open(file, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            for i, v in enumerate(variables):
                with archive.open(f"v{i:05d}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, _host(v), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    return _hash_file(file)


def _host(v: tf.Variable) -> np.ndarray:
    value = tf.convert_to_tensor(v)
    # npz cannot hold bfloat16: store 16-bit floats as float32, cast back on restore.
    return value.numpy() if value.dtype != tf.bfloat16 else tf.cast(value, tf.float32).numpy()


def _restore_npz(file: str, variables: Sequence[tf.Variable]) -> None:
    try:
        with np.load(file) as data:
            arrays = [data[k] for k in sorted(data.files)]
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing ({e.strerror})") from None
    # What numpy and zipfile raise for a truncated or altered archive (checkpoints without checksums).
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, KeyError, zlib.error) as e:
        raise CheckpointError(
            f"{file}: unreadable ({type(e).__name__}: {e}): the file is corrupt or truncated"
        ) from None
    if len(arrays) != len(variables):
        raise CheckpointError(
            f"{file}: holds {len(arrays)} variables, this model has {len(variables)}: a different backbone or optimizer"
        )
    for i, (v, a) in enumerate(zip(variables, arrays)):
        if tuple(a.shape) != tuple(v.shape):
            raise CheckpointError(
                f"{file}: variable {i} ({v.name}) has shape {list(a.shape)} in the "
                f"checkpoint but {v.shape.as_list()} in this model"
            )
        v.assign(tf.cast(a, v.dtype))


def _write_json(file: str, obj) -> dict:
    return _write_bytes(file, json.dumps(obj, indent=1).encode())


def _write_bytes(file: str, data: bytes) -> dict:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return _digest(data)


def _load_json(file: str):
    try:
        raw = _read_bytes(file)
    except OSError as e:
        raise CheckpointError(f"{file}: unreadable ({_errno_text(e)})") from None
    return _parse_json(file, raw)


def _parse_json(file: str, raw: bytes):
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None


def _read_bytes(file: str) -> bytes:
    with open(file, "rb") as f:
        return f.read()


def _digest(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _hash_file(file: str) -> dict:
    """sha256 of a whole file, read in blocks into one buffer (bounded memory)."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(_HASH_BYTES)
    view = memoryview(buf)
    with open(file, "rb") as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return {"sha256": digest.hexdigest(), "bytes": size}


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
