"""The training reader: sharded, streaming, shuffled, decoded, checked, batched, reproducible.

    pipe = open_dataset("data/synth", batch_size=128, rank=comm.rank, size=comm.size, seed=0)
    for images, labels, epoch in pipe.dataset:   # [B,H,W,3] uint8, [B] int64, [] int64
        x = pipe.augment(images, step)           # in the training step: flip, [-1, 1] float32
        ...                                      # pipe.steps_per_epoch batches per epoch, every worker
    pipe.corrupt_records.numpy()                 # records skipped so far (skip_corrupt=True)

Per epoch e (e = start_epoch, start_epoch+1, ...):
  1. this worker's files in an order shuffled by (seed, rank, e);
  2. cycle_length files open at a time, read and parsed in blocks of 64 records by our compiled
     op (`record_blocks`; object storage: each file by a background reader), every record
     tagged with its file and index; a file that ends before the manifest's count (bad CRC,
     truncation) or runs past it is noted (the op marks a file's last block, so this needs no
     state, and runs inline: `map_inline`);
  3. a bounded shuffle of the *encoded* images (a fifth of the bytes of decoded ones): each
     window of shuffle_buffer records in read order (rounded up to whole batches) is permuted
     as a whole, seeded by (seed, rank, e), with one gather (tf.data's shuffle buffer handled
     records one at a time);
  4. batches of batch_size records, cut from the windows without a copy, each JPEG-decoded (3
     channels; resized if asked) as a whole by one inline call without control flow
     (`jpeg_batch_decoder`), `threads` batches at once, then checked: file faults noted so far,
     labels in [0, num_classes), and no batch missing;
  5. exactly steps_per_epoch uint8 batches. Records past them are still read to the end of every
     file (so a broken or over-long file is always found) but not decoded.
Steps 1-3 run a window ahead of the decoders, into the next epoch: its files open and its first
window fills while this epoch's last batches decode. They hand the decoders whole windows, so
the reading thread wakes once per window, not once per batch.
The augmentation (random horizontal flip, x / 127.5 - 1 as float32) is `Pipeline.augment`, called
in the training step: compiled with the backbone on its device it costs next to nothing, in
tf.data it cost a third of the reader's time (docs/benchmarks.md).

Sharding: worker `rank` of `size` reads the files whose index in the manifest satisfies
`index % size == rank`. With fewer files than workers every worker reads every file and keeps the
records whose global index (position in the manifest's shard order) satisfies `index % size == rank`
(a warning says so once). Every record is then read by exactly one worker per epoch.
steps_per_epoch is the same on every worker: the smallest worker's record count // batch_size,
computed from the manifest's per-shard counts (no communication, no counting).

Corrupt data (bad CRC, truncated file, unparsable Example, undecodable JPEG) raises
InvalidArgumentError naming the file and the record index. An unparsable Example comes from the
op as an empty image, which no decoder accepts. A batch with a bad record fails to decode as a
whole; tf.data can only drop it, so batches are numbered, and the first batch missing from the
numbers is read again, record by record, to name the bad one. With skip_corrupt=True, bad
records are skipped and counted in `corrupt_records` (a file whose framing breaks is abandoned
from the broken record on: its remaining records, as counted by the manifest, are counted as
skipped); every batch is then guarded by a record-by-record fallback, which costs 5-8 % more
CPU per image (measured). Labels outside [0, num_classes) in a batch and files longer than the
manifest says always raise, naming file, record index and label or count.

The code: `open_dataset` resolves the files, plans this worker's share (`plan_shards`) and builds
a frozen `ReaderContext` (`reader_context`: plan, seeds, window, decoders, the fault records);
each stage is a module-level function of it, testable alone: `file_blocks` (step 2),
`epoch_windows` / `epoch_batches` (1-3), `decode_each` (record by record), the checks
(`file_checks`, `batch_checks`, `name_missing`, `count_missing`); one builder per mode assembles
them: `strict_batches` (default) and `tolerant_batches` (skip_corrupt). TensorFlow internals
(`map_inline`, the op's dataset class) live in `pipelines.tf_compat`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable

import tensorflow as tf

from pipelines import images as images_lib
from pipelines import record_blocks, schema, storage
from pipelines.tf_compat import map_inline

_GLOB_CHARS = "*?["
_warned_record_level: set = set()
# A record travels with its tag: file index << 32 | record index in the file.
_TAG_BITS = 32
_TAG_MASK = (1 << _TAG_BITS) - 1
# Records read from a file per tf.data element (tf.data's per-element cost, paid per block).
_READ_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What one worker reads: files (in manifest order), and which records of each.

    File i holds records[i] records (the manifest's count); the worker keeps record indices
    first[i], first[i] + stride, ... (own[i] records).
    """

    files: tuple[str, ...]
    records: tuple[int, ...]
    first: tuple[int, ...]
    own: tuple[int, ...]
    stride: int
    record_level: bool
    steps_per_epoch: int


def plan_shards(files: list[str], counts: list[int], rank: int, size: int, batch_size: int) -> ShardPlan:
    """Assign files (or records, when len(files) < size) to worker `rank` of `size`. Pure."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside [0, {size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def for_rank(r):
        if len(files) >= size:
            idx = [i for i in range(len(files)) if i % size == r]
            return [files[i] for i in idx], [counts[i] for i in idx], [0] * len(idx), [counts[i] for i in idx]
        offset, out_f, out_first, out_own = 0, [], [], []
        for f, n in zip(files, counts):
            first = (r - offset) % size
            out_f.append(f), out_first.append(first), out_own.append(max(0, -(-(n - first) // size)))
            offset += n
        return out_f, list(counts), out_first, out_own

    totals = [sum(for_rank(r)[3]) for r in range(size)]
    steps = min(totals) // batch_size
    if steps == 0:
        worst = totals.index(min(totals))
        raise schema.DataError(
            f"worker {worst} of {size} gets {min(totals)} records, fewer than one batch of {batch_size}"
        )
    f, records, first, own = for_rank(rank)
    return ShardPlan(
        tuple(f), tuple(records), tuple(first), tuple(own), 1 if len(files) >= size else size, len(files) < size, steps
    )


def worker_plan(path: str, batch_size: int, rank: int = 0, size: int = 1) -> tuple[schema.Manifest, ShardPlan]:
    """What worker `rank` of `size` would read of the dataset at `path`, without building a
    pipeline: its manifest and shard plan (`plan.steps_per_epoch`, the same on every worker)."""
    _, manifest, files, counts = resolve(path)
    return manifest, plan_shards(files, counts, rank, size, batch_size)


def worker_seed(seed: int, rank: int) -> int:
    """Worker `rank`'s base seed of shuffles and flips: workers differ, reproducibly; kept below
    2**31 so the per-epoch seeds derived from it fit in int64 for any seed."""
    return (seed * 1_000_003 + rank) % (2**31 - 1)


def resolve(path: str) -> tuple[str, schema.Manifest, list[str], list[int]]:
    """A dataset directory, its manifest.json, one shard file or a glob of shard files ->
    (directory, manifest, shard paths, record counts), in manifest order."""
    storage.prepare(path)
    if storage.basename(path) == schema.MANIFEST_NAME or _isdir(path):
        directory = storage.dirname(path) if storage.basename(path) == schema.MANIFEST_NAME else path.rstrip("/")
        manifest = schema.Manifest.load(directory)
        return directory, manifest, manifest.shard_paths(directory), list(manifest.examples_per_shard)
    if any(c in path for c in _GLOB_CHARS):
        try:
            matches = sorted(tf.io.gfile.glob(path))
        except tf.errors.OpError as e:
            raise schema.DataError(f"{path}: cannot list files ({schema.first_line(e)})") from None
        if not matches:
            raise schema.DataError(f"{path}: no files match")
    else:
        if not _exists(path):
            raise schema.DataError(f"{path}: no such file or directory (or not readable)")
        matches = [path]
    directories = {storage.dirname(m) for m in matches}
    if len(directories) != 1:
        raise schema.DataError(
            f"{path}: files from several directories {sorted(directories)}; "
            "a dataset is one directory with one manifest"
        )
    directory = directories.pop()
    manifest = schema.Manifest.load(directory)
    count = dict(zip(manifest.shards, manifest.examples_per_shard))
    wanted = {storage.basename(m) for m in matches}
    for name in sorted(wanted):
        if name not in count:
            raise schema.DataError(f"{storage.join(directory, name)}: not listed in {schema.manifest_path(directory)}")
    names = [s for s in manifest.shards if s in wanted]
    return directory, manifest, [storage.join(directory, s) for s in names], [count[s] for s in names]


@dataclasses.dataclass
class Pipeline:
    """A training input pipeline and what the training loop needs to know about it."""

    dataset: tf.data.Dataset  # (images [B,H,W,3] uint8, labels [B] int64, epoch [] int64)
    manifest: schema.Manifest
    plan: ShardPlan
    corrupt_records: tf.Variable  # int64 []: records skipped so far (skip_corrupt=True)
    image_size: tuple[int, int]
    seed: int  # this worker's augmentation seed (seed and rank)
    flip: bool

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def augment(self, images: tf.Tensor, step) -> tf.Tensor:
        """The training augmentation of a batch, for the training step: uint8 [B, H, W, 3] ->
        float32 [B, H, W, 3] in [-1, 1], each image mirrored left-right with probability 1/2
        (coins seeded by this worker's seed and `step`, the global step: reproducible on resume)."""
        return augment(images, self.seed, step, flip=self.flip)


def augment(images: tf.Tensor, seed: int, step, *, flip: bool = True) -> tf.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, H, W, 3]: x / 127.5 - 1, and a random horizontal flip
    per image (stateless coins from (seed, step)).

    It belongs in the compiled training step, not in tf.data: there it runs on the training device
    (and a GPU is sent uint8, a quarter of the bytes), while in the reader the float32 batch and
    the flip cost a third of the reader's time on top of the JPEG decoding (measured;
    docs/benchmarks.md).
    """
    if flip:
        coin = tf.random.stateless_uniform(
            tf.shape(images)[:1], seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
        )
        # In uint8 (a quarter of the bytes), mirrored as [B*H, W, 3] (tf.reverse is several times
        # faster on 3-D), and picked by a gather: tf.where with a [B, 1, 1, 1] condition took
        # 3x longer than all the rest (measured).
        s = tf.shape(images)
        mirrored = tf.reshape(tf.reverse(tf.reshape(images, [-1, s[2], s[3]]), axis=[1]), s)
        pick = tf.range(s[0]) + s[0] * tf.cast(coin < 0.5, tf.int32)
        images = tf.gather(tf.concat([images, mirrored], axis=0), pick)
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def open_dataset(
    path: str,
    batch_size: int,
    *,
    rank: int = 0,
    size: int = 1,
    image_size: tuple[int, int] | None = None,
    shuffle_buffer: int = 4096,
    seed: int = 0,
    flip: bool = True,
    epochs: int | None = None,
    start_epoch: int = 0,
    skip_corrupt: bool = False,
    cycle_length: int = 16,
    threads: int | None = None,
) -> Pipeline:
    """Build this worker's training pipeline (see the module docstring).

    path: dataset directory, its manifest.json, a shard file or a glob (local, s3://, gs://, hdfs://).
    rank, size: this worker and the number of workers (cluster.rank / cluster.size).
    image_size: (H, W) to resize to; default the manifest's.
    shuffle_buffer: records permuted together (rounded up to whole batches; 0: no shuffle).
    seed: file order and shuffle (with rank and epoch) and `Pipeline.augment`'s flips (with rank
      and step); TensorFlow's global seed plays no part.
    flip: whether `Pipeline.augment` flips images.
    epochs: number of epochs to yield (None: forever); start_epoch: first epoch number (resume).
    skip_corrupt: skip and count bad records instead of raising (see the module docstring).
    cycle_length: files open at once (records of this many files are mixed before the shuffle).
    threads: batches decoded at once, and this pipeline's own thread pool of that size (None:
      all cores, in tf.data's shared pool). With several workers on one host, give each its
      share (`pipelines.threads.cores_per_worker(local_size)`): pools of all cores each
      oversubscribe the host.
    """
    manifest, plan = worker_plan(path, batch_size, rank, size)
    if plan.record_level:
        _warn_record_level(path, list(plan.files), size)
    ctx = reader_context(
        manifest,
        plan,
        batch_size,
        image_size=image_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        skip_corrupt=skip_corrupt,
        cycle_length=cycle_length,
        threads=threads,
    )
    last = start_epoch + epochs if epochs is not None else 2**62
    epochs_ds = tf.data.Dataset.range(start_epoch, last)
    dataset = (tolerant_batches if skip_corrupt else strict_batches)(ctx, epochs_ds).prefetch(2)
    return Pipeline(
        dataset.with_options(_options(threads)),
        manifest,
        plan,
        ctx.corrupt_records,
        ctx.image_size,
        ctx.base_seed,
        flip,
    )


def make_dataset(path: str, batch_size: int, **kwargs) -> tf.data.Dataset:
    """`open_dataset(...).dataset`: batches of (images, labels, epoch)."""
    return open_dataset(path, batch_size, **kwargs).dataset


def _warn_record_level(path: str, files: list[str], size: int) -> None:
    """Once per (files, size): fewer files than workers, so every worker reads every file."""
    key = (tuple(files), size)
    if key not in _warned_record_level:
        _warned_record_level.add(key)
        warnings.warn(
            f"{path}: {len(files)} shard file(s) for {size} workers; falling back to "
            "record-level sharding (every worker reads every file and keeps 1 record "
            f"in {size}). Write at least {size} shards to read less.",
            stacklevel=3,
        )


def _options(threads: int | None) -> tf.data.Options:
    options = tf.data.Options()
    # Parallelism is set explicitly by the stages; autotuning's per-element bookkeeping cost 6 %
    # more CPU per image (measured).
    options.autotune.enabled = False
    if threads:
        options.threading.private_threadpool_size = int(threads)
    return options


# ---------------------------------------------------------------------------------------------
# What every stage reads: one frozen record per pipeline.


@dataclasses.dataclass(frozen=True, eq=False)
class ReaderContext:
    """What the stages of one pipeline share, built once by `reader_context`. (The two variables
    are the pipeline's only state: their values change as it runs, never which they are.)"""

    plan: ShardPlan
    batch_size: int
    image_size: tuple[int, int]  # (H, W) of the decoded images
    stored_size: tuple[int, int]  # (H, W) the writer stored (the manifest's)
    num_classes: int
    shuffle_buffer: int  # 0: windows stay in read order
    window_batches: int  # batches per window (permuted and handed on together)
    base_seed: int  # this worker's seed, from (seed, rank)
    cycle: int  # files open at once
    cores: int  # batches decoded at once
    remote: bool  # object storage: one background reader per open file
    read_buffer: int  # bytes per read of a file
    skip_corrupt: bool
    decode_batch: Callable[[tf.Tensor], tf.Tensor]  # JPEGs string [batch_size] -> uint8 [batch_size, H, W, 3]
    decode_image: Callable[[tf.Tensor], tf.Tensor]  # one JPEG string [] -> uint8 [H, W, 3]
    # int64 [files, 3], per file: (fault, record index, records); fault 1: unreadable from that
    # index on, 2: more records than the manifest lists. Written where it is found (reading
    # runs ahead of decoding), raised by the next batch's check.
    faults: tf.Variable
    corrupt_records: tf.Variable  # int64 []: records skipped so far (skip_corrupt)

    @property
    def window(self) -> int:
        """Records per window: whole batches."""
        return self.window_batches * self.batch_size

    @property
    def steps(self) -> int:
        """Batches per epoch (every worker's)."""
        return self.plan.steps_per_epoch


def reader_context(
    manifest: schema.Manifest,
    plan: ShardPlan,
    batch_size: int,
    *,
    image_size: tuple[int, int] | None = None,
    shuffle_buffer: int = 4096,
    seed: int = 0,
    rank: int = 0,
    skip_corrupt: bool = False,
    cycle_length: int = 16,
    threads: int | None = None,
) -> ReaderContext:
    """The context of worker `rank`'s pipeline over `plan` (arguments as for `open_dataset`)."""
    size_hw = tuple(image_size or manifest.image_size)
    counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="corrupt_records")
    faults = tf.Variable(tf.zeros([len(plan.files), 3], tf.int64), trainable=False, name="file_faults")
    # Writers store every image at the manifest's size, so the common case decodes without a
    # resize; an image of another size fails its `ensure_shape` and counts as a corrupt record.
    decode_batch, decode_image = jpeg_batch_decoder(batch_size, size_hw, manifest.image_size)
    # Local files are read in the interleave's own thread (no latency to hide; background
    # readers cost CPU per block, measured); object storage by one background reader per file.
    remote = storage.is_url(plan.files[0])
    return ReaderContext(
        plan=plan,
        batch_size=batch_size,
        image_size=size_hw,
        stored_size=tuple(manifest.image_size),
        num_classes=manifest.num_classes,
        shuffle_buffer=shuffle_buffer,
        # Records travel in windows of whole batches: the reading thread then wakes once per
        # window rather than once per batch (fewer thread switches on the decoders' cores), and
        # the windows are cut into batches without a copy.
        window_batches=max(1, -(-shuffle_buffer // batch_size)),
        base_seed=worker_seed(seed, rank),
        cycle=max(1, min(cycle_length, len(plan.files))),
        cores=threads or os.cpu_count() or 1,
        # Bytes per read: object storage answers each read with a request, so larger ones there.
        remote=remote,
        read_buffer=1 << 20 if remote else 1 << 18,
        skip_corrupt=skip_corrupt,
        decode_batch=decode_batch,
        decode_image=decode_image,
        faults=faults,
        corrupt_records=counter,
    )


# ---------------------------------------------------------------------------------------------
# Stages: files -> tagged blocks -> an epoch's windows -> batches, decoded and checked.


def file_blocks(ctx: ReaderContext, fidx: tf.Tensor, count: bool) -> tf.data.Dataset:
    """File `fidx` (int64 []) of the plan -> blocks (tags [n], JPEGs [n], labels [n]) of this
    worker's records in file order, parsed (`record_blocks`: an unparsable record has JPEG b""
    and label -1), tag = fidx << 32 | record index in the file. A failed read ends the file, so
    the records that came are a prefix of the file; its last block so knows the count read and
    notes a fault in `ctx.faults` (skip_corrupt and `count`: adds the lost records to
    `ctx.corrupt_records`). No state, so the bookkeeping runs inline in the reading thread."""
    plan = ctx.plan
    name = tf.constant(plan.files)[fidx]
    total, first, own = (tf.constant(v, tf.int64)[fidx] for v in (plan.records, plan.first, plan.own))
    blocks = record_blocks.RecordBlocks(name, _READ_BLOCK, ctx.read_buffer)
    return map_inline(blocks, functools.partial(_tag_block, ctx, count, fidx, total, first, own))


def _tag_block(ctx: ReaderContext, count: bool, fidx, total, first, own, read, jpegs, labels, end):
    """One block of `record_blocks` (read: index of its first record, end: the file's last
    block) -> (tags [m], JPEGs [m], labels [m]), this worker's m records of it; the file's
    manifest count `total`, its first own record index `first` and own record count `own`."""
    stride = ctx.plan.stride
    n = tf.size(labels, out_type=tf.int64)
    index = read + tf.range(n)
    if stride > 1:
        mine = index % stride == first
        index, jpegs, labels = (tf.boolean_mask(t, mine) for t in (index, jpegs, labels))
    # At the end: this worker's records of the file that never came (own ones below read + n).
    kept = tf.maximum((read + n - first + stride - 1) // stride, 0)
    lost = tf.where(end, tf.maximum(own - kept, 0), 0)
    # (A file has one kind of fault at most, so an elementwise max keeps it whole.)
    writes = [ctx.faults.scatter_nd_max(tf.reshape(fidx, [1, 1]), _block_fault(ctx, read + n, total, lost)[None])]
    if ctx.skip_corrupt and count:
        writes.append(ctx.corrupt_records.assign_add(lost))
    with tf.control_dependencies(writes):
        tags = tf.bitwise.bitwise_or(tf.bitwise.left_shift(fidx, _TAG_BITS), index)
        return tf.identity(tags), jpegs, labels


def _block_fault(ctx: ReaderContext, read_to, total, lost) -> tf.Tensor:
    """int64 [3]: a file's fault as one block shows it (records read to index `read_to`, of the
    manifest's `total`; `lost` of this worker's never came): (2, total, 0) past the manifest's
    count; in strict mode (1, read_to, lost) for lost records (skip_corrupt counts them instead);
    else zeros."""
    none = tf.zeros([3], tf.int64)
    lost_fault = none if ctx.skip_corrupt else tf.where(lost > 0, tf.stack([1, read_to, lost]), none)
    return tf.where(read_to > total, tf.stack([2, total, 0]), lost_fault)


def file_order(n_files: int, base_seed: int, epoch) -> tf.Tensor:
    """The order a worker reads its n_files files in, in an epoch: int64 [n_files], a permutation
    seeded by (base_seed, epoch) (`Pipeline.seed` is base_seed)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n_files, dtype=tf.int64), seed=tf.stack([tf.constant(base_seed, tf.int64), tf.cast(epoch, tf.int64)])
    )


def epoch_windows(ctx: ReaderContext, epoch, count: bool, trim: bool) -> tf.data.Dataset:
    """One pass's records in windows (tags [n], JPEGs [n], labels [n]) of `ctx.window` records
    (the last one shorter), each permuted as a whole when shuffling. trim: each window cut to
    the records the epoch's batches use (`_used`); the others are read, never decoded."""
    ds = tf.data.Dataset.from_tensor_slices(file_order(len(ctx.plan.files), ctx.base_seed, epoch)).interleave(
        lambda f: file_blocks(ctx, f, count),
        cycle_length=ctx.cycle,
        block_length=1,
        num_parallel_calls=ctx.cycle if ctx.remote else None,
        deterministic=True if ctx.remote else None,
    )
    ds = ds.rebatch(ctx.window)
    if ctx.shuffle_buffer <= 0 and not trim:
        return ds  # in read order, whole: nothing to arrange, so no copy
    # (a window permuted by one gather: tf.data's shuffle took records one by one; its seed
    # derived from (seed, rank, epoch) otherwise than `file_order`'s)
    epoch_seed = tf.stack([tf.constant(ctx.base_seed, tf.int64), tf.cast(epoch, tf.int64)])
    return map_inline(ds.enumerate(), functools.partial(_arrange_window, ctx, epoch_seed, trim))


def _arrange_window(ctx: ReaderContext, epoch_seed, trim: bool, k, window):
    """Window k (tags [n], JPEGs [n], labels [n]) permuted (seeded by epoch_seed and k) when
    shuffling, then cut to its `_used` records when trimming."""
    n = tf.shape(window[0], out_type=tf.int64)[0]
    order = tf.range(n)
    if ctx.shuffle_buffer > 0:
        order = tf.random.experimental.stateless_shuffle(
            order, seed=tf.random.experimental.stateless_fold_in(epoch_seed, k)
        )
    if trim:
        order = order[: _used(ctx, k, n)]
    return tuple(tf.gather(t, order) for t in window)


def _used(ctx: ReaderContext, k, n):
    """Records of window k (of n records) in the epoch's steps_per_epoch batches: whole batches only."""
    return tf.clip_by_value(
        (ctx.steps - k * ctx.window_batches) * ctx.batch_size, 0, n // ctx.batch_size * ctx.batch_size
    )


def epoch_batches(ctx: ReaderContext, epoch, count: bool) -> tf.data.Dataset:
    """One pass's records, shuffled, in batches (tags [n], JPEGs [n], labels [n]) of batch_size
    (the last one shorter)."""
    return epoch_windows(ctx, epoch, count, trim=False).rebatch(ctx.batch_size)


def decode_each(ctx: ReaderContext, tags, jpegs, labels) -> tf.data.Dataset:
    """Record by record: one element (images [m, H, W, 3], labels [m], tags [m]) of the m <= n
    records that decode, in order."""
    ds = (
        tf.data.Dataset.from_tensor_slices((tags, jpegs, labels))
        .map(lambda t, j, y: (ctx.decode_image(j), y, t))
        .ignore_errors()
        .batch(ctx.batch_size)
    )
    empty = (tf.zeros([0, *ctx.image_size, 3], tf.uint8), tf.zeros([0], tf.int64), tf.zeros([0], tf.int64))
    return ds.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)


# ---------------------------------------------------------------------------------------------
# Checks: each returns the ops (asserts, counter updates) a batch depends on.


def file_checks(ctx: ReaderContext) -> list[tf.Operation]:
    """No file fault found so far (`ctx.faults`), else one naming the first such file."""
    f = ctx.faults.read_value()
    files = tf.constant(ctx.plan.files)
    j, k = _first(tf.equal(f[:, 0], 1)), _first(tf.equal(f[:, 0], 2))
    return [
        _assert(
            tf.reduce_all(f[:, 0] != 1),
            [
                "pfc-data: corrupt record in file",
                files[j],
                "at record index",
                f[j, 1],
                ":",
                f[j, 2],
                "record(s) unreadable from there (bad CRC, truncated or unreadable file); repair the file "
                "or read with skip_corrupt=True",
            ],
        ),
        _assert(
            tf.reduce_all(f[:, 0] != 2),
            ["pfc-data: file", files[k], "has more records than its manifest lists:", f[k, 1]],
        ),
    ]


def batch_checks(ctx: ReaderContext, labels, tags) -> list[tf.Operation]:
    """`file_checks` and the labels (int64 [m], of the records tagged `tags` [m]) in
    [0, num_classes), else naming the first label outside, its file and record index."""
    ops = file_checks(ctx)
    bad = (labels < 0) | (labels >= ctx.num_classes)
    j = _first(bad)
    ops.append(
        _assert(
            tf.logical_not(tf.reduce_any(bad)),
            [
                "pfc-data: label",
                _at(labels, j),
                "outside [0,",
                ctx.num_classes,
                ") in file",
                tf.constant(ctx.plan.files)[_file_of(_at(tags, j))],
                "at record index",
                _index_of(_at(tags, j)),
            ],
        )
    )
    return ops


def name_missing(ctx: ReaderContext, tags, out) -> tf.Operation:
    """Strict mode: every record that went in (`tags` [n]) came out (`out` [m], in order), else
    naming the first that did not."""
    missing = tf.size(tags) - tf.size(out)
    padded = tf.concat([out, tf.fill([missing], tf.constant(-1, tf.int64))], axis=0)
    j = _first(tf.not_equal(tags, padded))  # the first record that did not decode
    return _assert(
        tf.equal(missing, 0),
        [
            "pfc-data: corrupt record in file",
            tf.constant(ctx.plan.files)[_file_of(_at(tags, j))],
            "at record index",
            _index_of(_at(tags, j)),
            ": unparsable Example or undecodable image; repair the file or read with skip_corrupt=True",
        ],
    )


def count_missing(ctx: ReaderContext, tags, out) -> tf.Operation:
    """skip_corrupt: adds the records that went in (`tags` [n]) but not out (`out` [m]) to
    `ctx.corrupt_records`."""
    return ctx.corrupt_records.assign_add(tf.cast(tf.size(tags) - tf.size(out), tf.int64))


# ---------------------------------------------------------------------------------------------
# Strict mode (the default): a bad record raises, naming it.


def strict_batches(ctx: ReaderContext, epochs_ds: tf.data.Dataset) -> tf.data.Dataset:
    """(images [B, H, W, 3] uint8, labels [B] int64, epoch [] int64) batches of the epochs in
    `epochs_ds`. Each batch is decoded as a whole, several at once. A batch with a bad record
    fails as a whole and is dropped (tf.data cannot do better), the gap in the batch numbers
    shows it, and that batch is read again, record by record, to name the record. (Guarding
    every batch with a record-by-record fallback cost 5-8 % more CPU, measured.)

    One record stream through all epochs, a window ahead of the decoders: the next epoch's files
    open and its first window fills while this epoch's last batches decode. (Epoch by epoch, the
    decoders stood idle for that fill at every epoch start: 60-70 ms on 2 cores, measured.)
    Windows are cut into batches in the thread that feeds the decoders (rebatch passes each
    batch on as a slice of its window, without a copy when the slice is aligned: batch sizes
    that are multiples of 8)."""
    epoch_end = _end_of_epoch(ctx)
    ds = epochs_ds.flat_map(lambda epoch: _numbered_windows(ctx, epoch_end, epoch)).prefetch(1).rebatch(ctx.batch_size)
    ds = map_inline(ds, functools.partial(_decode_numbered, ctx), parallel=ctx.cores).ignore_errors()
    return ds.scan(tf.constant(-1, tf.int64), functools.partial(_check_batch, ctx)).filter(lambda x, y, e: e >= 0)


def _end_of_epoch(ctx: ReaderContext) -> tf.data.Dataset:
    """The end of an epoch, one batch (tags [B] all -1, JPEGs [B], labels [B]).

    It travels through the decoders as a batch numbered -1 (they run without branches, so it is
    a real batch: one blank image, batch_size times; one batch in steps_per_epoch, of images
    that decode fast). It always arrives, so a gap at the end of an epoch (or a whole epoch that
    failed) is named when that epoch ends."""
    with tf.init_scope():  # (eager, also when open_dataset is called inside a tf.function)
        blank = tf.io.encode_jpeg(tf.zeros([*ctx.stored_size, 3], tf.uint8)).numpy()
    b = ctx.batch_size
    return tf.data.Dataset.from_tensors(
        (tf.fill([b], tf.constant(-1, tf.int64)), tf.fill([b], tf.constant(blank)), tf.zeros([b], tf.int64))
    )


def _numbered_windows(ctx: ReaderContext, epoch_end: tf.data.Dataset, epoch) -> tf.data.Dataset:
    """The epoch's trimmed windows, each record with its epoch and batch number: (epochs [n],
    numbers [n], tags [n], JPEGs [n], labels [n]), n a multiple of batch_size; `epoch_end`
    (`_end_of_epoch`) last, numbered -1."""
    windows = epoch_windows(ctx, epoch, True, trim=True).concatenate(epoch_end).enumerate()
    return map_inline(windows, functools.partial(_number_window, ctx, epoch))


def _number_window(ctx: ReaderContext, epoch, k, window):
    """Window k (tags [n], JPEGs [n], labels [n]) -> (epochs [n], numbers [n], tags, JPEGs, labels)."""
    tags, jpegs, labels = window
    n = tf.shape(tags, out_type=tf.int64)[0]
    # (a window cut to nothing has no first tag: _at gives 0)
    numbers = tf.where(
        _at(tags, 0) < 0, tf.constant(-1, tf.int64), k * ctx.window_batches + tf.range(n) // ctx.batch_size
    )
    return tf.fill([n], tf.cast(epoch, tf.int64)), numbers, tags, jpegs, labels


def _decode_numbered(ctx: ReaderContext, epochs, numbers, tags, jpegs, labels):
    """One numbered batch ([B] each) -> (epoch [], number [], images [B, H, W, 3], labels [B], tags [B])."""
    epoch, i = epochs[0], numbers[0]
    # Records past the epoch's steps are read to the end of every file (so a truncated or
    # over-long file is always found) but cut from their windows before decoding; were a batch
    # past the steps ever to come, this assertion would drop it (through the ignore_errors of
    # `strict_batches`; a branch would keep the function from running inline).
    past = _assert(i < ctx.steps, ["pfc-data: batch", i, "is past the epoch's", ctx.steps, "steps"])
    with tf.control_dependencies([past]):
        jpegs = tf.identity(jpegs)
    return epoch, i, ctx.decode_batch(jpegs), tf.ensure_shape(labels, [ctx.batch_size]), tags


def _check_batch(ctx: ReaderContext, last_i, batch):
    """The scan over decoded batches: the first batch missing, if any, named (before batch i, or
    before the epoch's end, i = -1; an epoch has batches 0 .. steps - 1), and `batch_checks`.
    The state: the epoch's last batch so far. Out: (images, labels, epoch), epoch -1 for the
    epoch's end (dropped by the filter)."""
    epoch, i, images, labels, tags = batch
    end = i < 0
    expected = last_i + 1
    # (fail closed: were an epoch's end batch ever lost, its end would go unchecked)
    ordered = _assert(
        end | (i > last_i),
        ["pfc-data: internal error: the end of an epoch was lost before batch", i, "of epoch", epoch],
    )
    gap = tf.cond(
        tf.where(end, last_i < ctx.steps - 1, i > expected),
        lambda: _name_bad_record(ctx, epoch, expected),
        lambda: tf.no_op(),
    )
    with tf.control_dependencies([ordered, gap, *batch_checks(ctx, labels, tags)]):
        no = tf.constant(-1, tf.int64)
        return tf.where(end, no, i), (tf.identity(images), tf.identity(labels), tf.where(end, no, epoch))


def _name_bad_record(ctx: ReaderContext, epoch, i) -> tf.Operation:
    """Batch i of the epoch again, record by record: its window, cut as the epoch cut it;
    raises naming the first record that does not decode. (No batch i at all: the epoch's
    records ran out, and a file fault says why.)"""
    k = i // ctx.window_batches
    none = (tf.zeros([0], tf.int64), tf.zeros([0], tf.string), tf.zeros([0], tf.int64))
    tags, jpegs, labels = (
        epoch_windows(ctx, epoch, True, trim=True)
        .skip(k)
        .take(1)
        .concatenate(tf.data.Dataset.from_tensors(none))
        .take(1)
        .get_single_element()
    )
    start = i % ctx.window_batches * ctx.batch_size
    tags, jpegs, labels = (t[start : start + ctx.batch_size] for t in (tags, jpegs, labels))
    _, _, out = decode_each(ctx, tags, jpegs, labels).get_single_element()
    with tf.control_dependencies([*file_checks(ctx), name_missing(ctx, tags, out)]):
        # every record decodes alone: still not silent
        return _assert(
            False,
            [
                "pfc-data: batch",
                i,
                "of epoch",
                epoch,
                "failed to decode as a whole, though each of its records decodes alone",
            ],
        )


# ---------------------------------------------------------------------------------------------
# skip_corrupt mode: bad records are skipped and counted, epochs refilled to their steps.


def tolerant_batches(ctx: ReaderContext, epochs_ds: tf.data.Dataset) -> tf.data.Dataset:
    """(images [B, H, W, 3] uint8, labels [B] int64, epoch [] int64) batches of the epochs in
    `epochs_ds`, steps_per_epoch each, decoded one epoch after the other. (Two epochs decoding
    at once kept up to 2.3 GB of decoded images buffered and cost 70 % more CPU per image on 2
    cores, measured.)"""
    return epochs_ds.flat_map(functools.partial(_tolerant_epoch, ctx))


def _tolerant_epoch(ctx: ReaderContext, epoch) -> tf.data.Dataset:
    # Skipped records may leave this worker short: refill, so steps agree.
    ds = _tolerant_pass(ctx, epoch, True).concatenate(_refill(ctx, epoch)).take(ctx.steps)
    return ds.map(lambda x, y: (x, y, epoch))


def _tolerant_pass(ctx: ReaderContext, epoch, count: bool) -> tf.data.Dataset:
    """One pass's (images [B, H, W, 3], labels [B]): each batch decoded as a whole, or record by
    record if that fails; the records that fail are skipped (`count`: and counted); batches
    refilled to batch_size."""
    ds = epoch_batches(ctx, epoch, count).interleave(
        functools.partial(_decode_or_each, ctx),
        cycle_length=ctx.cores,
        block_length=1,
        num_parallel_calls=ctx.cores,
        deterministic=True,
    )
    return ds.map(functools.partial(_checked, ctx, count)).rebatch(ctx.batch_size, drop_remainder=True)


def _decode_or_each(ctx: ReaderContext, tags, jpegs, labels) -> tf.data.Dataset:
    """One element (images [m, H, W, 3], labels [m], out [m], tags [n]): the batch decoded
    whole (m = n), or else its records that decode alone (`decode_each`)."""
    whole = tf.data.Dataset.from_tensors(jpegs).map(lambda j: (ctx.decode_batch(j), labels, tags)).ignore_errors()
    return whole.concatenate(decode_each(ctx, tags, jpegs, labels)).take(1).map(lambda x, y, out: (x, y, out, tags))


def _checked(ctx: ReaderContext, count: bool, images, labels, out, tags):
    """(images [m, H, W, 3], labels [m]) of `_decode_or_each`, after `batch_checks` (`count`:
    and `count_missing`)."""
    ops = batch_checks(ctx, labels, out)
    if count:
        ops.append(count_missing(ctx, tags, out))
    with tf.control_dependencies(ops):
        return tf.identity(images), tf.identity(labels)


def _refill(ctx: ReaderContext, epoch) -> tf.data.Dataset:
    """Passes over the epoch again, without counting: batches to top up the epoch. A pass that
    gives no batch at all (fewer readable records than one batch) raises."""
    marker = tf.data.Dataset.from_tensors((tf.zeros([0, *ctx.image_size, 3], tf.uint8), tf.zeros([0], tf.int64)))
    one = (
        _tolerant_pass(ctx, epoch, False)
        .concatenate(marker)
        .scan(tf.constant(0, tf.int64), functools.partial(_count_refill, ctx))
    )
    return one.filter(lambda x, y: tf.size(y) > 0).repeat()


def _count_refill(ctx: ReaderContext, n, batch):
    """The scan over one refill pass: n, the records it gave so far; raises at its end marker
    (an empty batch) when it gave none."""
    images, labels = batch
    ok = _assert(
        tf.logical_or(tf.size(labels) > 0, n > 0),
        [
            "pfc-data: this worker's files hold fewer readable records than one batch of",
            ctx.batch_size,
            "(",
            ctx.corrupt_records.read_value(),
            "corrupt records skipped so far)",
        ],
    )
    with tf.control_dependencies([ok]):
        return n + tf.size(labels, out_type=tf.int64), (tf.identity(images), tf.identity(labels))


def _first(mask):
    """Index of the first True in a [n] bool (0 if none, also for n = 0)."""
    return tf.argmax(tf.concat([tf.cast(mask, tf.int32), [0]], axis=0), output_type=tf.int64)


def _at(values, i):
    """values[i], or a zero when values is empty (for the messages of checks that passed)."""
    return tf.gather(tf.concat([values, tf.zeros([1], values.dtype)], axis=0), i)


READER_TAG = "pfc-data: "  # the first word of every check's message


def reader_error(error: BaseException) -> str | None:
    """The message of one of the reader's checks inside a TensorFlow error, as one plain line
    (TensorFlow prints an Assert's data as `[a] [b] ...` and wraps it in `{{function_node ...}}`
    and `[[{{node ...}}]]`); None when the error is not one of them."""
    text = str(error)
    start = text.find("[" + READER_TAG)
    if start < 0:
        return None
    line = text[start + 1 :].split("\n")[0]
    line = line[: line.rfind("]")] if "]" in line else line
    return " ".join(p.strip() for p in line[len(READER_TAG) :].split("] [")).replace(" : ", ": ")


def _assert(condition, data):
    """tf.debugging.Assert without its tf.cond guard: the message tensors are cheap scalars, and
    control flow in a tf.data function costs far more than they do."""
    return tf.raw_ops.Assert(condition=condition, data=data, summarize=3)


def _file_of(tag):
    return tf.bitwise.right_shift(tag, _TAG_BITS)


def _index_of(tag):
    return tf.bitwise.bitwise_and(tag, _TAG_MASK)


def jpeg_batch_decoder(batch_size: int, image_size: tuple[int, int], stored_size: tuple[int, int]):
    """(encoded JPEGs string [batch_size] -> uint8 [batch_size, H, W, 3], one encoded JPEG ->
    uint8 [H, W, 3]): 3 channels, resized to image_size = (H, W) unless stored_size, the size the
    writer stored, is the same.

    One tf.io.decode_jpeg per image, unrolled: no loop, so it can run inline (`map_inline`),
    which made batched decoding 10-15 % cheaper per image than a tf.map_fn loop (measured). A
    batch of another size fails (as a whole: the callers then go record by record); an image
    of another size fails its `ensure_shape`.
    """
    h, w = image_size
    same = tuple(image_size) == tuple(stored_size)

    def image(encoded):
        img = tf.io.decode_jpeg(encoded, channels=3)
        if not same:
            img = tf.cast(images_lib.resize_levels(img, [h, w]), tf.uint8)
        return tf.ensure_shape(img, [h, w, 3])

    def decode(encoded):
        return tf.stack([image(e) for e in tf.unstack(encoded, num=batch_size)])

    return decode, image


def _isdir(path: str) -> bool:
    try:
        return tf.io.gfile.isdir(path)
    except tf.errors.OpError:
        return False


def _exists(path: str) -> bool:
    try:
        return tf.io.gfile.exists(path)
    except tf.errors.OpError:
        return False
