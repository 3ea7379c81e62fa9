"""The training reader: sharded, streaming, shuffled, decoded, augmented, batched, reproducible.

    pipe = open_dataset("data/synth", batch_size=128, rank=comm.rank, size=comm.size, seed=0)
    for images, labels, epoch in pipe.dataset:   # [B,H,W,3] float32 in [-1,1], [B] int64, [] int64
        ...                                      # pipe.steps_per_epoch batches per epoch, every worker
    pipe.corrupt_records.numpy()                 # records skipped so far (skip_corrupt=True)

Per epoch e (e = start_epoch, start_epoch+1, ...):
  1. this worker's files in an order shuffled by (seed, rank, e);
  2. each file streamed by its own TFRecordDataset, `parallel interleave`d (cycle_length files at a
     time), each record parsed, JPEG-decoded (3 channels) and resized to image_size if needed;
  3. a bounded shuffle buffer (shuffle_buffer records, seeded by (seed, rank, e));
  4. batches of batch_size with drop_remainder, exactly steps_per_epoch of them;
  5. per-image random horizontal flip (stateless coins seeded by (seed, rank, e, step)), then
     x/127.5 - 1 as float32.

Sharding: worker `rank` of `size` reads the files whose index in the manifest satisfies
`index % size == rank`. With fewer files than workers every worker reads every file and keeps the
records whose global index (position in the manifest's shard order) satisfies `index % size == rank`
(a warning says so once). Every record is then read by exactly one worker per epoch.
steps_per_epoch is the same on every worker: the smallest worker's record count // batch_size,
computed from the manifest's per-shard counts (no communication, no counting).

Corrupt data (bad CRC, truncated file, unparsable Example, undecodable JPEG) raises
InvalidArgumentError naming the file and the record index; with skip_corrupt=True the records are
skipped and counted in `corrupt_records` (a file whose framing breaks is abandoned from the broken
record on: its remaining records, as counted by the manifest, are counted as skipped). Labels
outside [0, num_classes) always raise, naming file, record index and label.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import tensorflow as tf

from pipelines import schema, storage

_GLOB_CHARS = "*?["
_warned_record_level: set = set()


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What one worker reads: files (in manifest order), and which records of each.

    In each file the worker keeps record indices first[i], first[i] + stride, ... (own[i] records).
    """
    files: tuple[str, ...]
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
            return [files[i] for i in idx], [0] * len(idx), [counts[i] for i in idx]
        offset, out_f, out_first, out_own = 0, [], [], []
        for f, n in zip(files, counts):
            first = (r - offset) % size
            out_f.append(f), out_first.append(first), out_own.append(max(0, -(-(n - first) // size)))
            offset += n
        return out_f, out_first, out_own

    totals = [sum(for_rank(r)[2]) for r in range(size)]
    steps = min(totals) // batch_size
    if steps == 0:
        worst = totals.index(min(totals))
        raise schema.DataError(
            f"worker {worst} of {size} gets {min(totals)} records, fewer than one batch of {batch_size}")
    f, first, own = for_rank(rank)
    return ShardPlan(tuple(f), tuple(first), tuple(own), 1 if len(files) >= size else size,
                     len(files) < size, steps)


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
        raise schema.DataError(f"{path}: files from several directories {sorted(directories)}; "
                               "a dataset is one directory with one manifest")
    directory = directories.pop()
    manifest = schema.Manifest.load(directory)
    count = dict(zip(manifest.shards, manifest.examples_per_shard))
    wanted = {storage.basename(m) for m in matches}
    for name in sorted(wanted):
        if name not in count:
            raise schema.DataError(f"{storage.join(directory, name)}: not listed in "
                                   f"{schema.manifest_path(directory)}")
    names = [s for s in manifest.shards if s in wanted]
    return directory, manifest, [storage.join(directory, s) for s in names], [count[s] for s in names]


@dataclasses.dataclass
class Pipeline:
    """A training input pipeline and what the training loop needs to know about it."""
    dataset: tf.data.Dataset           # (images [B,H,W,3] f32 in [-1,1], labels [B] i64, epoch [] i64)
    manifest: schema.Manifest
    plan: ShardPlan
    corrupt_records: tf.Variable       # int64 []: records skipped so far (skip_corrupt=True)
    image_size: tuple[int, int]

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch


def open_dataset(path: str, batch_size: int, *, rank: int = 0, size: int = 1,
                 image_size: tuple[int, int] | None = None, shuffle_buffer: int = 4096, seed: int = 0,
                 flip: bool = True, epochs: int | None = None, start_epoch: int = 0,
                 skip_corrupt: bool = False, cycle_length: int = 8) -> Pipeline:
    """Build this worker's training pipeline (see the module docstring).

    path: dataset directory, its manifest.json, a shard file or a glob (local, s3://, gs://, hdfs://).
    rank, size: this worker and the number of workers (cluster.rank / cluster.size).
    image_size: (H, W) to resize to; default the manifest's.
    shuffle_buffer: records in the shuffle buffer (0: no shuffle).
    epochs: number of epochs to yield (None: forever); start_epoch: first epoch number (resume).
    """
    _, manifest, files, counts = resolve(path)
    plan = plan_shards(files, counts, rank, size, batch_size)
    if plan.record_level:
        key = (tuple(files), size)
        if key not in _warned_record_level:
            _warned_record_level.add(key)
            warnings.warn(f"{path}: {len(files)} shard file(s) for {size} workers; falling back to "
                          "record-level sharding (every worker reads every file and keeps 1 record "
                          f"in {size}). Write at least {size} shards to read less.", stacklevel=2)
    size_hw = tuple(image_size or manifest.image_size)
    counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="corrupt_records")
    decode = _record_decoder(size_hw, manifest.image_size)
    num_classes = manifest.num_classes

    files_t = tf.constant(plan.files)
    first_t = tf.constant(plan.first, tf.int64)
    own_t = tf.constant(plan.own, tf.int64)
    stride = plan.stride
    n_files = len(plan.files)
    cycle = max(1, min(cycle_length, n_files))
    # Decoding runs in parallel across the interleaved files; a parallel map inside each file as
    # well would only add threads, unless too few files are open to keep the cores busy.
    per_file_calls = tf.data.AUTOTUNE if cycle < (os.cpu_count() or 1) else None
    base_seed = seed * 1_000_003 + rank  # workers shuffle differently, reproducibly

    def file_stream(path_t, first, expected, count: bool):
        """One file -> (image uint8 [H,W,3], label), checked for gaps; `count`: add skipped
        records to the counter (off for refill passes, which would count them again)."""
        ds = tf.data.TFRecordDataset(path_t, buffer_size=1 << 20).enumerate()
        if stride > 1:
            ds = ds.filter(lambda i, _: i % stride == first)
        def parse(i, rec):
            img, label = decode(rec)
            return img, label, (i - first) // stride, False

        ds = ds.map(parse, num_parallel_calls=per_file_calls,
                    deterministic=True if per_file_calls else None)
        # A failed read/parse/decode drops the record; a failed read also ends the file. The
        # sentinel (ordinal = expected count) exposes a missing tail; the scan measures the gaps.
        ds = ds.ignore_errors().concatenate(tf.data.Dataset.from_tensors(
            (tf.zeros([*size_hw, 3], tf.uint8), tf.constant(0, tf.int64), expected, True)))

        def checked(last, elem):
            img, label, ordinal, sentinel = elem
            gap = ordinal - last - 1
            index = first + ordinal * stride
            checks = [_assert(
                tf.logical_or(sentinel, ordinal < expected),
                ["pfc-data: file", path_t, "has more records than its manifest lists:", expected])]
            if skip_corrupt:
                if count:
                    checks.append(counter.assign_add(gap))
            else:
                checks.append(_assert(tf.equal(gap, 0), [
                    "pfc-data: corrupt record in file", path_t, "at record index", index - gap * stride,
                    ":", gap, "record(s) unreadable from there (bad CRC, truncated file, unparsable "
                    "Example or undecodable JPEG); repair the file or read with skip_corrupt=True"]))
            checks.append(_assert(
                tf.logical_or(sentinel, tf.logical_and(label >= 0, label < num_classes)),
                ["pfc-data: label", label, "outside [0,", num_classes, ") in file", path_t,
                 "at record index", index]))
            with tf.control_dependencies(checks):
                return tf.identity(ordinal), (img, label, sentinel)

        # One scan both measures the gaps and checks; the sentinel's flag rides along to the
        # batch stage, where it is dropped (a per-record map to drop it would cost more).
        return ds.scan(tf.constant(-1, tf.int64), checked).filter(
            lambda img, label, sentinel: tf.logical_not(sentinel))

    def shuffled_batches(epoch, count: bool):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n_files), seed=tf.stack([tf.constant(base_seed, tf.int64), epoch]))
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.gather(files_t, order), tf.gather(first_t, order), tf.gather(own_t, order)))
        ds = ds.interleave(lambda f, first, n: file_stream(f, first, n, count),
                           cycle_length=cycle, block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffle_buffer > 0:
            ds = ds.shuffle(shuffle_buffer, seed=base_seed * 7919 + epoch, reshuffle_each_iteration=False)
        return ds.batch(batch_size, drop_remainder=True)

    def one_epoch(epoch):
        ds = shuffled_batches(epoch, True)
        if skip_corrupt:  # skipped records may leave this worker short: refill, so steps agree
            ds = ds.concatenate(shuffled_batches(epoch, False).repeat())
        ds = ds.take(plan.steps_per_epoch).enumerate()

        def augment(step, batch):
            images, labels, _sentinel = batch
            if flip:
                coin = tf.random.stateless_uniform(
                    [batch_size], seed=tf.stack([tf.constant(base_seed, tf.int64), epoch * 2**24 + step]))
                images = _flip_some(images, coin < 0.5)
            # uint8 -> x / 127.5 - 1 in one pass: dequantize's MIN_COMBINED mode maps [0, 255]
            # linearly onto [-1, 1] (bit-exact with cast-multiply-subtract, 2-3x less CPU).
            x = tf.quantization.dequantize(tf.bitcast(images, tf.quint8), -1.0, 1.0, mode="MIN_COMBINED")
            return x, labels, epoch

        return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    last = start_epoch + epochs if epochs is not None else 2**62
    # Two epochs open at once: the next epoch's files open and its shuffle buffer fills while
    # this epoch's last batches are consumed (one epoch after the other would leave the cores
    # idle at every boundary). block_length = steps keeps the epochs in order.
    dataset = tf.data.Dataset.range(start_epoch, last).interleave(
        one_epoch, cycle_length=2, block_length=plan.steps_per_epoch, num_parallel_calls=2,
        deterministic=True).prefetch(tf.data.AUTOTUNE)
    return Pipeline(dataset, manifest, plan, counter, size_hw)


def make_dataset(path: str, batch_size: int, **kwargs) -> tf.data.Dataset:
    """`open_dataset(...).dataset`: batches of (images, labels, epoch)."""
    return open_dataset(path, batch_size, **kwargs).dataset


def _flip_some(images, mask):
    """Mirror images[i] (uint8 [B, H, W, 3]) left-right where mask[i]. Only the chosen images are
    touched, through a 3-D view ([n*H, W, 3]) where tf.reverse is several times faster than on 4-D."""
    idx = tf.where(mask)
    chosen = tf.gather_nd(images, idx)
    s = tf.shape(chosen)
    mirrored = tf.reshape(tf.reverse(tf.reshape(chosen, [-1, s[2], s[3]]), axis=[1]), s)
    return tf.tensor_scatter_nd_update(images, idx, mirrored)


def _assert(condition, data):
    """tf.debugging.Assert without its tf.cond guard: the message tensors are cheap scalars, and
    control flow in a tf.data function costs far more than they do."""
    return tf.raw_ops.Assert(condition=condition, data=data, summarize=3)


def _record_decoder(image_size: tuple[int, int], stored_size: tuple[int, int]):
    """serialized Example -> (image uint8 [H, W, 3], label int64).

    Writers store every image at the manifest's size, so the common case decodes without a
    resize or a branch (control flow would slow every call of the tf.data function); an image of
    another size then fails `ensure_shape` and counts as a corrupt record.
    """
    spec = schema.feature_spec()
    h, w = image_size

    def decode(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        img = tf.io.decode_jpeg(ex[schema.IMAGE_KEY], channels=3)
        if tuple(image_size) == tuple(stored_size):
            img = tf.ensure_shape(img, [h, w, 3])
        else:
            img = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(img, [h, w])), 0, 255), tf.uint8)
            img.set_shape([h, w, 3])
        return img, ex[schema.LABEL_KEY]

    return decode


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
