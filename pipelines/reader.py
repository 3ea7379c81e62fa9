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
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import tensorflow as tf

from pipelines import images as images_lib
from pipelines import record_blocks, schema, storage

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
            f"worker {worst} of {size} gets {min(totals)} records, fewer than one batch of {batch_size}")
    f, records, first, own = for_rank(rank)
    return ShardPlan(tuple(f), tuple(records), tuple(first), tuple(own), 1 if len(files) >= size else size,
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
    n_files = len(plan.files)
    # Per file: (fault, record index, records); fault 1: unreadable from that index on, 2: more
    # records than the manifest lists. Written where it is found, raised by the next batch's check.
    faults = tf.Variable(tf.zeros([n_files, 3], tf.int64), trainable=False, name="file_faults")
    # Writers store every image at the manifest's size, so the common case decodes without a
    # resize; an image of another size fails its `ensure_shape` and counts as a corrupt record.
    decode_jpegs, decode_one = jpeg_batch_decoder(batch_size, size_hw, manifest.image_size)
    num_classes = manifest.num_classes

    files_t = tf.constant(plan.files)
    records_t = tf.constant(plan.records, tf.int64)
    first_t = tf.constant(plan.first, tf.int64)
    own_t = tf.constant(plan.own, tf.int64)
    stride = plan.stride
    cycle = max(1, min(cycle_length, n_files))
    cores = threads or os.cpu_count() or 1
    # Local files are read in the interleave's own thread (no latency to hide; background
    # readers cost CPU per block, measured); object storage by one background reader per file.
    remote = storage.is_url(plan.files[0])
    # Bytes per read: object storage answers each read with a request, so larger ones there.
    read_buffer = 1 << 20 if remote else 1 << 18
    # Workers shuffle differently, reproducibly; kept below 2**31 so the per-epoch seeds derived
    # from it fit in int64 for any seed.
    base_seed = (seed * 1_000_003 + rank) % (2**31 - 1)
    h, w = size_hw
    no_tags, no_jpegs = tf.zeros([0], tf.int64), tf.zeros([0], tf.string)

    def file_blocks(fidx, count: bool):
        """File `fidx` -> blocks (tags [n], JPEGs [n], labels [n]) of this worker's records in
        file order, parsed (`record_blocks`: an unparsable record has JPEG b"" and label -1), tag =
        fidx << 32 | record index in the file. A failed read ends the file, so the records that
        came are a prefix of the file; its last block (`done`) so knows the count read and
        compares it with the manifest's. No state, so the bookkeeping runs inline in the reading
        thread (see `map_inline`)."""
        name, total, first, own = files_t[fidx], records_t[fidx], first_t[fidx], own_t[fidx]

        def block(read, jpegs, labels, end):
            n = tf.size(labels, out_type=tf.int64)
            index = read + tf.range(n)
            if stride > 1:
                mine = index % stride == first
                index, jpegs, labels = (tf.boolean_mask(t, mine) for t in (index, jpegs, labels))
            # At the end: this worker's records of the file that never came (own ones below read + n).
            kept = tf.maximum((read + n - first + stride - 1) // stride, 0)
            lost = tf.where(end, tf.maximum(own - kept, 0), 0)
            over = read + n > total
            if skip_corrupt:
                fault = tf.where(over, tf.stack([2, total, 0]), tf.zeros([3], tf.int64))
            else:
                fault = tf.where(over, tf.stack([2, total, 0]),
                                 tf.where(lost > 0, tf.stack([1, read + n, lost]), tf.zeros([3], tf.int64)))
            # (A file has one kind of fault at most, so an elementwise max keeps it whole.)
            writes = [faults.scatter_nd_max(tf.reshape(fidx, [1, 1]), fault[None])]
            if skip_corrupt and count:
                writes.append(counter.assign_add(lost))
            with tf.control_dependencies(writes):
                tags = tf.bitwise.bitwise_or(tf.bitwise.left_shift(fidx, _TAG_BITS), index)
                return tf.identity(tags), jpegs, labels

        return map_inline(record_blocks.RecordBlocks(name, _READ_BLOCK, read_buffer), block)

    # Records are shuffled, and travel to the decoders, in windows of whole batches: the reading
    # thread then wakes once per window rather than once per batch (fewer thread switches on
    # the decoders' cores), and the windows are cut into batches without a copy.
    window_batches = max(1, -(-shuffle_buffer // batch_size))
    window = window_batches * batch_size

    def used(k, n):
        """Records of window k (of n records) in the epoch's steps_per_epoch batches: whole
        batches only."""
        return tf.clip_by_value((plan.steps_per_epoch - k * window_batches) * batch_size, 0,
                                n // batch_size * batch_size)

    def raw_windows(epoch, count: bool, trim: bool):
        """One pass's records in windows (tags [n], JPEGs [n], labels [n]) of `window` records
        (the last one shorter), each permuted as a whole when shuffling. trim: each window cut to
        the records the epoch's batches use (`used`); the others are read, never decoded."""
        ds = tf.data.Dataset.from_tensor_slices(file_order(n_files, base_seed, epoch)).interleave(
            lambda f: file_blocks(f, count), cycle_length=cycle, block_length=1,
            num_parallel_calls=cycle if remote else None, deterministic=True if remote else None)
        # (a window permuted by one gather: tf.data's shuffle took records one by one; its seed
        # derived from (seed, rank, epoch) otherwise than `file_order`'s)
        seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(epoch, tf.int64)])

        def arrange(k, block):
            n = tf.shape(block[0], out_type=tf.int64)[0]
            order = tf.range(n)
            if shuffle_buffer > 0:
                order = tf.random.experimental.stateless_shuffle(
                    order, seed=tf.random.experimental.stateless_fold_in(seed, k))
            if trim:
                order = order[:used(k, n)]
            return tuple(tf.gather(t, order) for t in block)

        ds = ds.rebatch(window)
        # (in read order, whole: nothing to arrange, so no copy)
        return map_inline(ds.enumerate(), arrange) if shuffle_buffer > 0 or trim else ds

    def raw_batches(epoch, count: bool):
        """One pass's records, shuffled, in batches (tags [n], JPEGs [n], labels [n]) of
        batch_size (the last one shorter)."""
        return raw_windows(epoch, count, trim=False).rebatch(batch_size)

    def decode_each(tags, jpegs, labels):
        """Record by record: (images [m, H, W, 3], labels [m], tags [m]) of the m <= n records
        that decode, in order."""
        ds = tf.data.Dataset.from_tensor_slices((tags, jpegs, labels)).map(
            lambda t, j, y: (decode_one(j), y, t)).ignore_errors().batch(batch_size)
        empty = (tf.zeros([0, h, w, 3], tf.uint8), tf.zeros([0], tf.int64), no_tags)
        return ds.concatenate(tf.data.Dataset.from_tensors(empty)).take(1)

    def checks(images, labels, out, tags=None):
        """Checks of a decoded batch: the file faults found so far, the labels in range and, when
        `tags` (the records that went in) is given, that every record came out (`out`, in order);
        skipped ones are counted (skip_corrupt) or named."""
        f = faults.read_value()
        j, k = _first(tf.equal(f[:, 0], 1)), _first(tf.equal(f[:, 0], 2))
        ops = [_assert(tf.reduce_all(f[:, 0] != 1), [
                   "pfc-data: corrupt record in file", files_t[j], "at record index", f[j, 1], ":", f[j, 2],
                   "record(s) unreadable from there (bad CRC, truncated or unreadable file); repair the file "
                   "or read with skip_corrupt=True"]),
               _assert(tf.reduce_all(f[:, 0] != 2), [
                   "pfc-data: file", files_t[k], "has more records than its manifest lists:", f[k, 1]])]
        bad = (labels < 0) | (labels >= num_classes)
        j = _first(bad)
        ops.append(_assert(tf.logical_not(tf.reduce_any(bad)), [
            "pfc-data: label", _at(labels, j), "outside [0,", num_classes, ") in file",
            files_t[_file_of(_at(out, j))], "at record index", _index_of(_at(out, j))]))
        if tags is not None:
            missing = tf.size(tags) - tf.size(out)
            if skip_corrupt:
                ops.append(counter.assign_add(tf.cast(missing, tf.int64)))
            else:
                padded = tf.concat([out, tf.fill([missing], tf.constant(-1, tf.int64))], axis=0)
                j = _first(tf.not_equal(tags, padded))  # the first record that did not decode
                ops.append(_assert(tf.equal(missing, 0), [
                    "pfc-data: corrupt record in file", files_t[_file_of(_at(tags, j))], "at record index",
                    _index_of(_at(tags, j)), ": unparsable Example or undecodable image; repair the file "
                    "or read with skip_corrupt=True"]))
        return ops

    def fast_batches(epochs_ds):
        """Default: (images, labels, epoch) batches of all epochs. Each batch is decoded as a
        whole, several at once. A batch with a bad record fails as a whole and is dropped
        (tf.data cannot do better), the gap in the batch numbers shows it, and that batch is read
        again, record by record, to name the record. (Guarding every batch with a record-by-record
        fallback cost 5-8 % more CPU, measured.)"""
        steps = plan.steps_per_epoch
        # The end of an epoch travels through the decoders as a batch numbered -1 (they run
        # without branches, so it is a real batch: one blank image, batch_size times; one batch
        # in steps_per_epoch, of images that decode fast). It always arrives, so a gap at the end
        # of an epoch (or a whole epoch that failed) is named when that epoch ends.
        with tf.init_scope():  # (eager, also when open_dataset is called inside a tf.function)
            blank = tf.io.encode_jpeg(tf.zeros([*manifest.image_size, 3], tf.uint8)).numpy()
        end_of_epoch = tf.data.Dataset.from_tensors((
            tf.fill([batch_size], tf.constant(-1, tf.int64)), tf.fill([batch_size], tf.constant(blank)),
            tf.zeros([batch_size], tf.int64)))

        def numbered(epoch):
            """The epoch's windows, each record with its epoch and batch number: (epochs [n],
            numbers [n], tags [n], JPEGs [n], labels [n]), n a multiple of batch_size; the
            epoch's end last, its tags -1 (one batch)."""
            def number(k, w):
                tags, jpegs, labels = w
                n = tf.shape(tags, out_type=tf.int64)[0]
                # (a window cut to nothing has no first tag: _at gives 0)
                i = tf.where(_at(tags, 0) < 0, tf.constant(-1, tf.int64), k * window_batches + tf.range(n) // batch_size)
                return tf.fill([n], tf.cast(epoch, tf.int64)), i, tags, jpegs, labels

            windows = raw_windows(epoch, True, trim=True).concatenate(end_of_epoch).enumerate()
            return map_inline(windows, number)

        def decode(epochs, numbers, tags, jpegs, labels):
            epoch, i = epochs[0], numbers[0]
            # Records past the epoch's steps are read to the end of every file (so a truncated or
            # over-long file is always found) but cut from their windows before decoding; were a
            # batch past the steps ever to come, this assertion would drop it (through the
            # ignore_errors below; a branch would keep the function from running inline).
            past = _assert(i < steps, ["pfc-data: batch", i, "is past the epoch's", steps, "steps"])
            with tf.control_dependencies([past]):
                jpegs = tf.identity(jpegs)
            return epoch, i, decode_jpegs(jpegs), tf.ensure_shape(labels, [batch_size]), tags

        # One record stream through all epochs, a window ahead of the decoders: the next epoch's
        # files open and its first window fills while this epoch's last batches decode. (Epoch
        # by epoch, the decoders stood idle for that fill at every epoch start: 60-70 ms on 2
        # cores, measured.) Windows are cut into batches in the thread that feeds the decoders
        # (rebatch passes each batch on as a slice of its window, without a copy when the slice
        # is aligned: batch sizes that are multiples of 8).
        ds = epochs_ds.flat_map(numbered).prefetch(1).rebatch(batch_size)
        ds = map_inline(ds, decode, parallel=cores).ignore_errors()

        def name_bad_record(epoch, i):
            # Batch i again, record by record: its window, cut as the epoch cut it. (No batch i at
            # all: the epoch's records ran out, and a file fault says why.)
            k = i // window_batches
            tags, jpegs, labels = raw_windows(epoch, True, trim=True).skip(k).take(1).concatenate(
                tf.data.Dataset.from_tensors((no_tags, no_jpegs, no_tags))).take(1).get_single_element()
            start = i % window_batches * batch_size
            tags, jpegs, labels = (t[start:start + batch_size] for t in (tags, jpegs, labels))
            _, _, out = decode_each(tags, jpegs, labels).get_single_element()
            ops = checks(no_tags, no_tags, out, tags)
            with tf.control_dependencies(ops):  # every record decodes alone: still not silent
                return _assert(False, ["pfc-data: batch", i, "of epoch", epoch, "failed to decode as "
                                       "a whole, though each of its records decodes alone"])

        def step(last_i, batch):
            """The first batch missing, if any: before batch i, or before the epoch's end (i = -1;
            an epoch has batches 0 .. steps - 1). The state: the epoch's last batch so far."""
            epoch, i, images, labels, tags = batch
            end = i < 0
            expected = last_i + 1
            # (fail closed: were an epoch's end batch ever lost, its end would go unchecked)
            ordered = _assert(end | (i > last_i), ["pfc-data: internal error: the end of an epoch "
                                                   "was lost before batch", i, "of epoch", epoch])
            gap = tf.cond(tf.where(end, last_i < steps - 1, i > expected),
                          lambda: name_bad_record(epoch, expected), lambda: tf.no_op())
            with tf.control_dependencies([ordered, gap, *checks(images, labels, tags)]):
                # (the epoch's end leaves with epoch -1, for the filter)
                return tf.where(end, tf.constant(-1, tf.int64), i), (
                    tf.identity(images), tf.identity(labels), tf.where(end, tf.constant(-1, tf.int64), epoch))

        return ds.scan(tf.constant(-1, tf.int64), step).filter(lambda x, y, e: e >= 0)

    def tolerant_batches(epoch, count: bool):
        """skip_corrupt: each batch decoded as a whole, or record by record if that fails; the
        records that fail are skipped and counted; batches refilled to batch_size."""
        def decode(tags, jpegs, labels):
            whole = tf.data.Dataset.from_tensors(jpegs).map(
                lambda j: (decode_jpegs(j), labels, tags)).ignore_errors()
            return whole.concatenate(decode_each(tags, jpegs, labels)).take(1).map(
                lambda x, y, out: (x, y, out, tags))

        def checked(x, y, out, tags):
            ops = checks(x, y, out, tags if count else None)
            with tf.control_dependencies(ops):
                return tf.identity(x), tf.identity(y)

        ds = raw_batches(epoch, count).interleave(decode, cycle_length=cores, block_length=1,
                                                  num_parallel_calls=cores, deterministic=True)
        return ds.map(checked).rebatch(batch_size, drop_remainder=True)

    def refill(epoch):
        """Passes over the epoch again, without counting: batches to top up the epoch. A pass
        that gives no batch at all (fewer readable records than one batch) raises."""
        def step(n, batch):
            x, y = batch
            ok = _assert(tf.logical_or(tf.size(y) > 0, n > 0), [
                "pfc-data: this worker's files hold fewer readable records than one batch of",
                batch_size, "(", counter.read_value(), "corrupt records skipped so far)"])
            with tf.control_dependencies([ok]):
                return n + tf.size(y, out_type=tf.int64), (tf.identity(x), tf.identity(y))

        marker = tf.data.Dataset.from_tensors((tf.zeros([0, h, w, 3], tf.uint8), no_tags))
        one = tolerant_batches(epoch, False).concatenate(marker).scan(tf.constant(0, tf.int64), step)
        return one.filter(lambda x, y: tf.size(y) > 0).repeat()

    def tolerant_epoch(epoch):
        # Skipped records may leave this worker short: refill, so steps agree.
        ds = tolerant_batches(epoch, True).concatenate(refill(epoch)).take(plan.steps_per_epoch)
        return ds.map(lambda x, y: (x, y, epoch))

    last = start_epoch + epochs if epochs is not None else 2**62
    # Decoded epochs one after the other. (Two epochs decoding at once kept up to 2.3 GB of
    # decoded images buffered and cost 70 % more CPU per image on 2 cores, measured; only the
    # encoded records of the next epoch are read ahead.)
    epochs_ds = tf.data.Dataset.range(start_epoch, last)
    dataset = epochs_ds.flat_map(tolerant_epoch) if skip_corrupt else fast_batches(epochs_ds)
    dataset = dataset.prefetch(2)
    options = tf.data.Options()
    # Parallelism is set explicitly above; autotuning's per-element bookkeeping cost 6 % more
    # CPU per image (measured).
    options.autotune.enabled = False
    if threads:
        options.threading.private_threadpool_size = int(threads)
    return Pipeline(dataset.with_options(options), manifest, plan, counter, size_hw, base_seed, flip)


def make_dataset(path: str, batch_size: int, **kwargs) -> tf.data.Dataset:
    """`open_dataset(...).dataset`: batches of (images, labels, epoch)."""
    return open_dataset(path, batch_size, **kwargs).dataset


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
    line = text[start + 1:].split("\n")[0]
    line = line[:line.rfind("]")] if "]" in line else line
    return " ".join(p.strip() for p in line[len(READER_TAG):].split("] [")).replace(" : ", ": ")


def _assert(condition, data):
    """tf.debugging.Assert without its tf.cond guard: the message tensors are cheap scalars, and
    control flow in a tf.data function costs far more than they do."""
    return tf.raw_ops.Assert(condition=condition, data=data, summarize=3)


def _file_of(tag):
    return tf.bitwise.right_shift(tag, _TAG_BITS)


def _index_of(tag):
    return tf.bitwise.bitwise_and(tag, _TAG_MASK)


def map_inline(ds: tf.data.Dataset, fn, parallel: int | None = None) -> tf.data.Dataset:
    """`ds.map(fn)` (`parallel` calls at once, in order) with each call run whole in the thread
    that makes it.

    tf.data otherwise hands a function's ops to its thread pool, a thread wake-up per call and
    more; while the pool's threads decode, a small function there waits for one to finish. On
    the 2-core VM of docs/benchmarks.md the reader had ~50 context switches per batch against
    10-15 for decoding alone, and ~5 µs more kernel time per image. `fn` must have no
    control flow (tf.cond, loops): TensorFlow's single-threaded executor runs these calls.
    (tf.data has no public switch for this; the private constructors are pinned with
    TensorFlow's version, and tests/test_pipelines_reader.py checks the attribute is set.)
    """
    from tensorflow.python.data.ops import map_op

    if parallel is None:
        return map_op._MapDataset(ds, fn, use_inter_op_parallelism=False, preserve_cardinality=True)
    return map_op._ParallelMapDataset(ds, fn, num_parallel_calls=parallel, deterministic=True,
                                      use_inter_op_parallelism=False, preserve_cardinality=True)


def file_order(n_files: int, base_seed: int, epoch) -> tf.Tensor:
    """The order a worker reads its n_files files in, in an epoch: int64 [n_files], a permutation
    seeded by (base_seed, epoch) (`Pipeline.seed` is base_seed)."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(n_files, dtype=tf.int64), seed=tf.stack([tf.constant(base_seed, tf.int64), tf.cast(epoch, tf.int64)]))


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
