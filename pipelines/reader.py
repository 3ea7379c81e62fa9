"""The training reader: sharded, streaming, shuffled, decoded, checked, batched, reproducible.

    pipe = open_dataset("data/synth", batch_size=128, rank=comm.rank, size=comm.size, seed=0)
    for images, labels, epoch in pipe.dataset:   # [B,H,W,3] uint8, [B] int64, [] int64
        x = pipe.augment(images, step)           # in the training step: flip, [-1, 1] float32
        ...                                      # pipe.steps_per_epoch batches per epoch, every worker
    pipe.corrupt_records.numpy()                 # records skipped so far (skip_corrupt=True)

Per epoch e (e = start_epoch, start_epoch+1, ...):
  1. this worker's files in an order shuffled by (seed, rank, e);
  2. cycle_length files at a time read by a parallel interleave, each record tagged with its file
     and index, parsed, JPEG-decoded (3 channels) and, if asked, resized in its file's stream;
  3. blocks of records checked in one vectorized call: no record missing between two that came
     (a dropped record is a corrupt one), none beyond the manifest's count, labels in range;
  4. a bounded shuffle buffer (shuffle_buffer records, seeded by (seed, rank, e));
  5. batches of batch_size uint8 images with drop_remainder, exactly steps_per_epoch of them.
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
# A record travels with its tag: file index << 32 | record index in the file.
_TAG_BITS = 32
_TAG_MASK = (1 << _TAG_BITS) - 1
# Records checked per call of the (vectorized) check.
_CHECK_BLOCK = 256


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
    dataset: tf.data.Dataset           # (images [B,H,W,3] uint8, labels [B] int64, epoch [] int64)
    manifest: schema.Manifest
    plan: ShardPlan
    corrupt_records: tf.Variable       # int64 []: records skipped so far (skip_corrupt=True)
    image_size: tuple[int, int]
    seed: int                          # this worker's augmentation seed (seed and rank)
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
            tf.shape(images)[:1], seed=tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)]))
        # In uint8 (a quarter of the bytes), mirrored as [B*H, W, 3] (tf.reverse is several times
        # faster on 3-D), and picked by a gather: tf.where with a [B, 1, 1, 1] condition took
        # 3x longer than all the rest (measured).
        s = tf.shape(images)
        mirrored = tf.reshape(tf.reverse(tf.reshape(images, [-1, s[2], s[3]]), axis=[1]), s)
        pick = tf.range(s[0]) + s[0] * tf.cast(coin < 0.5, tf.int32)
        images = tf.gather(tf.concat([images, mirrored], axis=0), pick)
    return tf.cast(images, tf.float32) / 127.5 - 1.0


def open_dataset(path: str, batch_size: int, *, rank: int = 0, size: int = 1,
                 image_size: tuple[int, int] | None = None, shuffle_buffer: int = 4096, seed: int = 0,
                 flip: bool = True, epochs: int | None = None, start_epoch: int = 0,
                 skip_corrupt: bool = False, cycle_length: int = 16, threads: int | None = None) -> Pipeline:
    """Build this worker's training pipeline (see the module docstring).

    path: dataset directory, its manifest.json, a shard file or a glob (local, s3://, gs://, hdfs://).
    rank, size: this worker and the number of workers (cluster.rank / cluster.size).
    image_size: (H, W) to resize to; default the manifest's.
    shuffle_buffer: records in the shuffle buffer (0: no shuffle).
    seed: file order and shuffle (with rank and epoch) and `Pipeline.augment`'s flips (with rank
      and step); TensorFlow's global seed plays no part.
    flip: whether `Pipeline.augment` flips images.
    epochs: number of epochs to yield (None: forever); start_epoch: first epoch number (resume).
    threads: this pipeline's own thread pool size (None: tf.data's shared pool of all cores).
      With several workers on one host, give each its share (`cores_per_worker(local_size)`):
      pools of all cores each oversubscribe the host.
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
    base_seed = seed * 1_000_003 + rank  # workers shuffle differently, reproducibly
    sentinel = (tf.zeros([*size_hw, 3], tf.uint8), tf.constant(0, tf.int64), tf.constant(-1, tf.int64))

    # Decoding runs in parallel across the interleaved files; a parallel map inside each file as
    # well would only add threads, unless too few files are open to keep the cores busy. (One
    # parallel map after the interleave instead cost 40 % more CPU per image, measured.)
    per_file_calls = tf.data.AUTOTUNE if cycle < (threads or os.cpu_count() or 1) else None

    def file_stream(fidx):
        """File `fidx` -> (image, label, tag): tag = fidx << 32 | record index in the file. A
        failed read ends the file and a failed parse or decode drops the record; the check
        below sees the gap."""
        ds = tf.data.TFRecordDataset(tf.gather(files_t, fidx), buffer_size=1 << 20).enumerate(
            start=tf.bitwise.left_shift(fidx, _TAG_BITS))
        if stride > 1:
            first = tf.gather(first_t, fidx)
            ds = ds.filter(lambda tag, _: tf.bitwise.bitwise_and(tag, _TAG_MASK) % stride == first)
        return ds.map(decode_tagged, num_parallel_calls=per_file_calls,
                      deterministic=True if per_file_calls else None).ignore_errors()

    def decode_tagged(tag, record):
        img, label = decode(record)
        return img, label, tag

    def checker(count: bool):
        """The check of one pass over the files; `count`: add skipped records to the counter (off
        for refill passes, which would count them again)."""

        def check(seen, block):
            """Vectorized over a block of records in stream order; seen [F]: records of each file
            accounted for so far. A record whose index runs ahead of its file's count means
            records were dropped in between (unreadable or undecodable); the pass's sentinel
            (tag -1, last) checks every file's tail. Labels outside [0, C) always fail."""
            img, label, tag = block
            is_sentinel = tag < 0
            real = tf.logical_not(is_sentinel)
            fidx = tf.where(real, tf.bitwise.right_shift(tag, _TAG_BITS), 0)
            ordinal = (tf.where(real, tf.bitwise.bitwise_and(tag, _TAG_MASK), 0) - tf.gather(first_t, fidx)) // stride
            expect = tf.gather(seen, fidx) + _rank_within_group(fidx)  # its ordinal, if none was dropped
            gap = tf.where(real, ordinal - expect, 0)
            new_seen = tf.maximum(seen, tf.math.unsorted_segment_max(
                tf.where(real, ordinal + 1, 0), fidx, n_files))
            tail = tf.where(tf.reduce_any(is_sentinel), own_t - new_seen, tf.zeros_like(seen))  # [F]
            checks = []
            extra = real & (ordinal >= tf.gather(own_t, fidx))
            j = _first(extra)
            checks.append(_assert(tf.logical_not(tf.reduce_any(extra)), [
                "pfc-data: file", files_t[fidx[j]], "has more records than its manifest lists:",
                own_t[fidx[j]]]))
            if skip_corrupt:
                if count:  # skipped: how far the files' counts advanced, less the records that came
                    checks.append(counter.assign_add(
                        tf.reduce_sum(new_seen - seen) - tf.reduce_sum(tf.cast(real, tf.int64))
                        + tf.reduce_sum(tf.maximum(tail, 0))))
            else:
                # the first hole: before record j in the middle of a file, else a file's tail
                j, f = _first(gap > 0), _first(tail > 0)
                middle = tf.reduce_any(gap > 0)
                where = tf.where(middle, fidx[j], f)
                index = tf.where(middle, expect[j], new_seen[f])
                checks.append(_assert(tf.logical_not(middle | tf.reduce_any(tail > 0)), [
                    "pfc-data: corrupt record in file", files_t[where], "at record index",
                    first_t[where] + index * stride, ":", tf.where(middle, gap[j], tail[f]),
                    "record(s) unreadable from there (bad CRC, truncated file, unparsable Example "
                    "or undecodable JPEG); repair the file or read with skip_corrupt=True"]))
            bad_label = real & ((label < 0) | (label >= num_classes))
            j = _first(bad_label)
            checks.append(_assert(tf.logical_not(tf.reduce_any(bad_label)), [
                "pfc-data: label", label[j], "outside [0,", num_classes, ") in file",
                files_t[fidx[j]], "at record index", tf.bitwise.bitwise_and(tag[j], _TAG_MASK)]))
            keep = tf.size(tag) - tf.reduce_sum(tf.cast(is_sentinel, tf.int32))  # the sentinel is last
            with tf.control_dependencies(checks):
                return new_seen, (tf.identity(img[:keep]), label[:keep])

        return check

    def shuffled_batches(epoch, count: bool):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n_files, dtype=tf.int64), seed=tf.stack([tf.constant(base_seed, tf.int64), epoch]))
        ds = tf.data.Dataset.from_tensor_slices(order).interleave(
            file_stream, cycle_length=cycle, block_length=1, num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(sentinel))
        # The checks run on blocks of records (a per-record check function cost about a third
        # of the decoding, measured).
        ds = ds.batch(_CHECK_BLOCK).scan(tf.zeros([n_files], tf.int64), checker(count)).unbatch()
        if shuffle_buffer > 0:
            g = tf.compat.v1.get_default_graph()
            # The order depends on `seed` alone: not on TensorFlow's global seed (a global seed
            # of 0 would even break tf.data's seed handling of a per-epoch tensor seed).
            saved, g.seed = g.seed, None
            try:
                ds = ds.shuffle(shuffle_buffer, seed=base_seed * 7919 + epoch, reshuffle_each_iteration=False)
            finally:
                g.seed = saved
        return ds.batch(batch_size, drop_remainder=True)

    def one_epoch(epoch):
        ds = shuffled_batches(epoch, True)
        if skip_corrupt:  # skipped records may leave this worker short: refill, so steps agree
            ds = ds.concatenate(shuffled_batches(epoch, False).repeat())
        return ds.take(plan.steps_per_epoch).map(lambda x, y: (x, y, epoch))

    last = start_epoch + epochs if epochs is not None else 2**62
    # Epochs one after the other. (Two epochs open at once, to overlap the next epoch's shuffle
    # fill with this one's tail, kept up to 2.3 GB of decoded images buffered and cost 70 % more
    # CPU per image on 2 cores for the same throughput, measured.)
    dataset = tf.data.Dataset.range(start_epoch, last).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = int(threads)
        dataset = dataset.with_options(options)
    return Pipeline(dataset, manifest, plan, counter, size_hw, base_seed, flip)


def cores_per_worker(workers_on_host: int) -> int:
    """This worker's share of the host's cores: the `threads` to give `open_dataset`."""
    return max(1, (os.cpu_count() or 1) // max(1, workers_on_host))


def make_dataset(path: str, batch_size: int, **kwargs) -> tf.data.Dataset:
    """`open_dataset(...).dataset`: batches of (images, labels, epoch)."""
    return open_dataset(path, batch_size, **kwargs).dataset


def _rank_within_group(group: tf.Tensor) -> tf.Tensor:
    """[n] int64 -> [n] int64: how many earlier entries hold the same value (O(n log n), no [n, F])."""
    order = tf.argsort(group, stable=True)
    g = tf.gather(group, order)
    i = tf.range(tf.size(group, out_type=tf.int64))
    run = tf.cumsum(tf.cast(tf.concat([[False], g[1:] != g[:-1]], axis=0), tf.int64))  # sorted runs
    rank_sorted = i - tf.gather(tf.math.segment_min(i, run), run)
    return tf.scatter_nd(order[:, None], rank_sorted, tf.shape(group))


def _first(mask):
    """Index of the first True in a [n] bool (0 if none)."""
    return tf.argmax(tf.cast(mask, tf.int32), output_type=tf.int64)


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
