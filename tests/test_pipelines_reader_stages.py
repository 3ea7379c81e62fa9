"""The reader's stages, each alone on a tiny TFRecord set written here: file blocks, an epoch's
windows, record-by-record decoding, the checks, and the builder of each mode."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
from pipelines_helpers import SIZE, truncate_in, write_indexed

from pipelines import reader


def _context(path, counts=None, batch=4, *, rank=0, size=1, **kw) -> reader.ReaderContext:
    """A reader context over the set at `path` (written first when `counts` is given)."""
    if counts is not None:
        write_indexed(str(path), counts)
    _, manifest, files, n = reader.resolve(str(path))
    return reader.reader_context(manifest, reader.plan_shards(files, n, rank, size, batch), batch, rank=rank, **kw)


def _tag(file: int, index: int) -> int:
    return file << 32 | index


def _blocks(ctx, fidx, count=True):
    """file_blocks of file fidx as lists: (tags, labels, block lengths)."""
    out = [
        (t.numpy().tolist(), y.numpy().tolist())
        for t, _, y in reader.file_blocks(ctx, tf.constant(fidx, tf.int64), count)
    ]
    return sum((t for t, _ in out), []), sum((y for _, y in out), []), [len(t) for t, _ in out]


def test_reader_context_windows_of_whole_batches_and_a_seed_per_worker(tmp_path):
    write_indexed(str(tmp_path), [8, 8])
    ctx = _context(tmp_path, batch=4, shuffle_buffer=10, seed=3)
    assert ctx.window_batches == 3 and ctx.window == 12 and ctx.steps == 4
    assert _context(tmp_path, batch=4, shuffle_buffer=0).window == 4  # no shuffle: a batch
    seeds = {_context(tmp_path, batch=4, rank=r, size=2, seed=3).base_seed for r in (0, 1)}
    assert len(seeds) == 2 and all(0 <= s < 2**31 - 1 for s in seeds)
    resized = _context(tmp_path, batch=4, image_size=(5, 7))
    jpegs = next(iter(reader.epoch_batches(resized, 0, True)))[1]
    assert resized.decode_batch(jpegs).shape == (4, 5, 7, 3) and resized.stored_size == (SIZE, SIZE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.batch_size = 8


def test_file_blocks_tag_each_record_with_its_file_and_index(tmp_path):
    ctx = _context(tmp_path, [5, 70])  # file 1: more than one block of 64
    tags, labels, lengths = _blocks(ctx, 1)
    assert tags == [_tag(1, i) for i in range(70)]
    assert labels == list(range(5, 75))  # write_indexed: label = global index
    assert max(lengths) <= 64 and len(lengths) >= 2
    assert not ctx.faults.numpy().any()


def test_file_blocks_keep_this_workers_records_when_sharding_by_record(tmp_path):
    ctx = _context(tmp_path, [9], batch=2, rank=1, size=2)  # one file for two workers
    assert ctx.plan.stride == 2
    tags, labels, _ = _blocks(ctx, 0)
    assert labels == list(range(ctx.plan.first[0], 9, 2)) and tags == [_tag(0, i) for i in labels]


@pytest.mark.parametrize("cut", [4, 0])
def test_file_blocks_note_a_truncated_file(tmp_path, cut):
    write_indexed(str(tmp_path), [10])
    truncate_in(str(tmp_path / "train-00000-of-00001.tfrecord"), cut)
    strict = _context(tmp_path)
    assert _blocks(strict, 0)[0] == [_tag(0, i) for i in range(cut)]
    assert strict.faults.numpy().tolist() == [[1, cut, 10 - cut]]
    for count, counted in ((True, 10 - cut), (False, 0)):  # skip_corrupt: counted, no fault
        tolerant = _context(tmp_path, skip_corrupt=True)
        _blocks(tolerant, 0, count)
        assert not tolerant.faults.numpy().any() and tolerant.corrupt_records.numpy() == counted


@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_file_blocks_note_a_file_longer_than_its_manifest(tmp_path, skip_corrupt):
    m = write_indexed(str(tmp_path), [4])
    m.examples_per_shard = [3]
    m.save(str(tmp_path))
    ctx = _context(tmp_path, batch=2, skip_corrupt=skip_corrupt)
    assert len(_blocks(ctx, 0)[0]) == 4
    assert ctx.faults.numpy().tolist() == [[2, 3, 0]]


def _read_order(ctx, epoch, records):
    """Tags in read order with one file open at a time: the files in `file_order`, whole."""
    order = reader.file_order(len(ctx.plan.files), ctx.base_seed, epoch).numpy()
    return [_tag(int(f), i) for f in order for i in range(records[int(f)])]


def test_epoch_windows_permute_each_window_of_the_read_order(tmp_path):
    write_indexed(str(tmp_path), [20, 20, 20])
    plain = _context(tmp_path, shuffle_buffer=0, cycle_length=1)
    read = _read_order(plain, 1, [20, 20, 20])
    windows = [t.numpy().tolist() for t, _, _ in reader.epoch_windows(plain, 1, True, trim=False)]
    assert windows == [read[k : k + 4] for k in range(0, 60, 4)]  # no shuffle: batches in read order
    shuffled = _context(tmp_path, shuffle_buffer=10, cycle_length=1, seed=2)
    assert _read_order(shuffled, 1, [20, 20, 20]) == read  # same seed per rank: same file order
    windows = [t.numpy().tolist() for t, _, _ in reader.epoch_windows(shuffled, 1, True, trim=False)]
    assert [sorted(w) for w in windows] == [sorted(read[k : k + 12]) for k in range(0, 60, 12)]
    assert any(w != read[k : k + 12] for w, k in zip(windows, range(0, 60, 12)))
    again = [t.numpy().tolist() for t, _, _ in reader.epoch_windows(shuffled, 1, True, trim=False)]
    other = [t.numpy().tolist() for t, _, _ in reader.epoch_windows(shuffled, 2, True, trim=False)]
    assert again == windows and sorted(sum(other, [])) == sorted(read) and other != windows


def test_epoch_windows_trimmed_to_the_epochs_steps(tmp_path):
    # worker 0 of 2 reads files 0 and 2 (28 records) but runs worker 1's 20 // 4 = 5 steps
    write_indexed(str(tmp_path), [20, 20, 8])
    ctx = _context(tmp_path, batch=4, rank=0, size=2, shuffle_buffer=12)
    full = [t.numpy().tolist() for t, _, _ in reader.epoch_windows(ctx, 0, True, trim=False)]
    cut = [t.numpy().tolist() for t, _, _ in reader.epoch_windows(ctx, 0, True, trim=True)]
    left, expected = ctx.steps * 4, []
    for w in full:  # whole batches, until the steps end
        expected.append(w[: min(left, len(w) // 4 * 4)])
        left -= len(expected[-1])
    assert cut == expected and sum(map(len, cut)) == ctx.steps * 4 < sum(map(len, full))


def test_decode_each_keeps_the_records_that_decode(tmp_path):
    write_indexed(str(tmp_path), [6], bad_image={2, 4})
    ctx = _context(tmp_path, batch=6, shuffle_buffer=0)
    tags, jpegs, labels = next(iter(reader.epoch_batches(ctx, 0, True)))
    with pytest.raises(tf.errors.InvalidArgumentError):
        ctx.decode_batch(jpegs)  # the batch as a whole fails
    images, kept, out = reader.decode_each(ctx, tags, jpegs, labels).get_single_element()
    assert kept.numpy().tolist() == [0, 1, 3, 5] and out.numpy().tolist() == [_tag(0, i) for i in (0, 1, 3, 5)]
    np.testing.assert_array_equal(images[1], ctx.decode_image(jpegs[1]))
    images, _, out = reader.decode_each(ctx, tags[2:3], jpegs[2:3], labels[2:3]).get_single_element()
    assert images.shape == (0, SIZE, SIZE, 3) and out.shape == (0,)  # nothing decodes: empty


def test_batch_checks_name_a_label_outside_the_classes(tmp_path):
    ctx = _context(tmp_path, [4, 4])  # num_classes 8
    shard = ctx.plan.files[1]
    reader.batch_checks(ctx, tf.constant([0, 7], tf.int64), tf.constant([_tag(0, 0), _tag(1, 3)], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        reader.batch_checks(ctx, tf.constant([0, 8], tf.int64), tf.constant([_tag(0, 0), _tag(1, 3)], tf.int64))
    assert f"label] [8] [outside [0,] [8] [) in file] [{shard}] [at record index] [3]" in e.value.message


@pytest.mark.parametrize(
    "fault, message",
    [
        ([1, 3, 2], "corrupt record in file] [{}] [at record index] [3] [:] [2] [record(s) unreadable"),
        ([2, 5, 0], "file] [{}] [has more records than its manifest lists:] [5]"),
    ],
)
def test_file_checks_raise_the_first_fault_noted(tmp_path, fault, message):
    ctx = _context(tmp_path, [4, 4])
    reader.file_checks(ctx)  # nothing noted: passes
    ctx.faults.assign([[0, 0, 0], fault])
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        reader.file_checks(ctx)
    assert message.format(ctx.plan.files[1]) in e.value.message
    with pytest.raises(tf.errors.InvalidArgumentError):  # also before any label check
        reader.batch_checks(ctx, tf.constant([0], tf.int64), tf.constant([0], tf.int64))


def test_missing_records_named_in_strict_mode_and_counted_when_skipping(tmp_path):
    ctx = _context(tmp_path, [4, 4])
    tags = tf.constant([_tag(1, 0), _tag(1, 1), _tag(1, 2)], tf.int64)
    reader.name_missing(ctx, tags, tags)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        reader.name_missing(ctx, tags, tf.gather(tags, [0, 2]))
    assert f"corrupt record in file] [{ctx.plan.files[1]}] [at record index] [1] [: unparsable" in e.value.message
    reader.count_missing(ctx, tags, tags[:1])
    reader.count_missing(ctx, tags, tags)
    assert ctx.corrupt_records.numpy() == 2


def test_strict_batches_yield_each_epochs_steps_and_name_a_bad_record(tmp_path):
    ctx = _context(tmp_path, [6, 6], batch=3, shuffle_buffer=0)
    batches = [(y.numpy().tolist(), int(e)) for x, y, e in reader.strict_batches(ctx, tf.data.Dataset.range(2, 4))]
    assert [e for _, e in batches] == [2] * ctx.steps + [3] * ctx.steps and ctx.steps == 4
    for epoch in (2, 3):
        assert sorted(sum((y for y, e in batches if e == epoch), [])) == list(range(12))
    write_indexed(str(tmp_path / "bad"), [6, 6], bad_image={7})
    ctx = _context(tmp_path / "bad", batch=3, shuffle_buffer=0)
    with pytest.raises(
        tf.errors.InvalidArgumentError, match=r"train-00001-of-00002.tfrecord\] \[at record index\] \[1\]"
    ):
        list(reader.strict_batches(ctx, tf.data.Dataset.range(1)))


def test_tolerant_batches_skip_count_and_refill(tmp_path):
    write_indexed(str(tmp_path), [6, 6], bad_image={1, 7})
    ctx = _context(tmp_path, batch=3, shuffle_buffer=0, skip_corrupt=True)
    batches = [(y.numpy().tolist(), int(e)) for x, y, e in reader.tolerant_batches(ctx, tf.data.Dataset.range(1))]
    assert len(batches) == ctx.steps == 4 and {e for _, e in batches} == {0}
    labels = sum((y for y, _ in batches), [])
    # 10 readable records: 3 whole batches, then one refilled from a second pass
    assert not {1, 7} & set(labels) and len(set(labels[:9])) == 9 and set(labels[9:]) <= set(labels[:9]) | {11}
    assert ctx.corrupt_records.numpy() == 2  # the refill pass does not count


def test_worker_plan_and_seed_are_what_the_pipeline_uses(tmp_path):
    """The training loop learns steps per epoch and classes from worker_plan (no pipeline built)
    and augments with worker_seed: both must be the opened pipeline's."""
    write_indexed(str(tmp_path), [20, 13, 7])
    for rank, size in ((0, 1), (1, 2), (2, 3)):
        manifest, plan = reader.worker_plan(str(tmp_path), 4, rank, size)
        pipe = reader.open_dataset(str(tmp_path), 4, rank=rank, size=size, seed=5)
        assert plan == pipe.plan and manifest.num_classes == pipe.manifest.num_classes
        assert reader.worker_seed(5, rank) == pipe.seed
