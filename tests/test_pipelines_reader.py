"""The training reader: sharding, reproducibility, augmentation, epochs, corrupt data."""

import threading

import numpy as np
import pytest
import tensorflow as tf
from pipelines_helpers import SIZE, flip_byte, replace_record, truncate_in, write_indexed

from pipelines import reader, schema


def _labels_per_epoch(path, batch, rank, size, epochs=1, **kw):
    out = {}
    for x, y, e in reader.make_dataset(path, batch, rank=rank, size=size, epochs=epochs, **kw):
        assert x.shape == (batch, SIZE, SIZE, 3) and y.shape == (batch,)
        out.setdefault(int(e), []).extend(y.numpy().tolist())
    return out


@pytest.mark.parametrize(
    "counts, size, batch",
    [
        ([6, 6, 6, 6], 2, 3),  # file-level: 2 files per worker
        ([5, 5, 6], 4, 2),  # record-level fallback: 3 files for 4 workers
    ],
)
def test_every_record_exactly_once_per_epoch_across_workers(tmp_path, counts, size, batch):
    write_indexed(str(tmp_path), counts)
    total = sum(counts)
    per_rank = []
    with pytest.warns(UserWarning, match="record-level sharding") if len(counts) < size else _nothing():
        for rank in range(size):
            per_rank.append(_labels_per_epoch(str(tmp_path), batch, rank, size, epochs=2, seed=3))
    for epoch in (0, 1):
        seen = sorted(sum((r[epoch] for r in per_rank), []))
        assert seen == list(range(total))
    steps = {len(r[0]) // batch for r in per_rank}
    assert steps == {total // size // batch}  # every worker runs the same steps


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_uneven_workers_run_equal_steps_and_never_repeat_a_record(tmp_path):
    write_indexed(str(tmp_path), [7, 2, 5])  # 3 workers: 7, 2 and 5 records
    pipes = [reader.open_dataset(str(tmp_path), 2, rank=r, size=3, epochs=1) for r in range(3)]
    assert {p.steps_per_epoch for p in pipes} == {1}  # the smallest worker: 2 // 2
    seen = sum((y.numpy().tolist() for p in pipes for _, y, _ in p.dataset), [])
    assert len(seen) == 6 and len(set(seen)) == 6


def test_drop_remainder_and_steps_per_epoch(tmp_path):
    write_indexed(str(tmp_path), [5, 6])
    pipe = reader.open_dataset(str(tmp_path), 4, epochs=3)
    batches = list(pipe.dataset)
    assert pipe.steps_per_epoch == 2 and len(batches) == 6
    assert all(y.shape == (4,) for _, y, _ in batches)
    assert [int(e) for _, _, e in batches] == [0, 0, 1, 1, 2, 2]


def test_reproducible_with_a_seed_and_reshuffled_per_epoch(tmp_path):
    write_indexed(str(tmp_path), [8, 8, 8])

    def run(seed, start_epoch=0):
        return [
            (x.numpy(), y.numpy(), int(e))
            for x, y, e in reader.make_dataset(
                str(tmp_path), 4, seed=seed, epochs=2, start_epoch=start_epoch, shuffle_buffer=16
            )
        ]

    a, b, c = run(1), run(1), run(2)
    own_pool = [
        (x.numpy(), y.numpy(), int(e))
        for x, y, e in reader.make_dataset(str(tmp_path), 4, seed=1, epochs=2, shuffle_buffer=16, threads=1)
    ]
    for (xa, ya, _), (xo, yo, _) in zip(a, own_pool):  # a private thread pool: same batches
        np.testing.assert_array_equal(xa, xo)
        np.testing.assert_array_equal(ya, yo)
    for (xa, ya, _), (xb, yb, _) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    order = lambda r, e: np.concatenate([y for _, y, ep in r if ep == e])  # noqa: E731
    assert not np.array_equal(order(a, 0), order(c, 0))  # another seed, another order
    assert not np.array_equal(order(a, 0), order(a, 1))  # each epoch reshuffled
    assert len(run(2**40)) == 12  # any non-negative seed works
    resumed = run(1, start_epoch=1)  # resuming at epoch 1 = epoch 1 of a run
    assert [e for _, _, e in resumed] == [1] * 6 + [2] * 6
    np.testing.assert_array_equal(order(resumed, 1), order(a, 1))


def test_uint8_batches_and_the_augmentation(tmp_path):
    write_indexed(str(tmp_path), [16])
    pipe = reader.open_dataset(str(tmp_path), 8, seed=5, epochs=1, shuffle_buffer=0)
    ref = tf.data.TFRecordDataset(str(tmp_path / "train-00000-of-00001.tfrecord")).map(
        lambda r: tf.io.decode_jpeg(tf.io.parse_single_example(r, schema.feature_spec())[schema.IMAGE_KEY])
    )
    pixels = np.stack(list(ref.as_numpy_iterator()))
    batches = [x for x, _, _ in pipe.dataset]
    assert all(x.dtype == tf.uint8 for x in batches)
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x in batches]), pixels)  # in order
    plain = reader.augment(batches[0], pipe.seed, 3, flip=False).numpy()
    np.testing.assert_allclose(plain, pixels[:8] / 127.5 - 1.0, atol=1e-6)  # exact normalization
    assert plain.dtype == np.float32 and plain.min() >= -1.0 and plain.max() <= 1.0
    x = np.concatenate([batches[0], batches[1]])
    flipped = [pipe.augment(x, step).numpy() for step in (3, 3, 4)]
    np.testing.assert_array_equal(flipped[0], flipped[1])  # reproducible
    assert not np.array_equal(flipped[0], flipped[2])  # new coins per step
    n_flipped = 0
    for a, b in zip(x / 127.5 - 1.0, flipped[0]):
        if np.allclose(a, b, atol=1e-6):
            continue
        np.testing.assert_allclose(a[:, ::-1], b, atol=1e-6)  # a horizontal mirror
        n_flipped += 1
    assert 3 <= n_flipped <= 13  # about half of 16
    other_worker = reader.open_dataset(str(tmp_path), 8, rank=1, size=2, epochs=1)
    assert other_worker.seed != pipe.seed


def test_reader_order_ignores_the_global_seed(tmp_path):
    write_indexed(str(tmp_path), [8, 8])
    orders = []
    for global_seed in (0, 7):  # 0 once broke tf.data's per-epoch tensor seeds
        tf.random.set_seed(global_seed)
        try:
            orders.append(
                [
                    y.numpy().tolist()
                    for _, y, _ in reader.make_dataset(str(tmp_path), 4, seed=2, epochs=2, shuffle_buffer=8)
                ]
            )
        finally:
            tf.random.set_seed(None)
    assert orders[0] == orders[1]


def test_resizes_to_requested_size(tmp_path):
    write_indexed(str(tmp_path), [4])
    x, _, _ = next(iter(reader.make_dataset(str(tmp_path), 2, image_size=(5, 7), epochs=1)))
    assert x.shape == (2, 5, 7, 3)


def test_paths_glob_single_file_and_manifest(tmp_path):
    write_indexed(str(tmp_path), [4, 4, 4])
    d = str(tmp_path)
    assert len(reader.resolve(d)[2]) == 3
    assert len(reader.resolve(d + "/manifest.json")[2]) == 3
    _, _, files, counts = reader.resolve(d + "/train-0000[02]-*.tfrecord")
    assert [f.rsplit("/", 1)[1][:11] for f in files] == ["train-00000", "train-00002"] and counts == [4, 4]
    assert len(reader.resolve(d + "/train-00001-of-00003.tfrecord")[2]) == 1
    with pytest.raises(schema.DataError, match=r"nothing-\*: no files match"):
        reader.resolve(d + "/nothing-*")
    (tmp_path / "stray.tfrecord").write_bytes(b"")
    with pytest.raises(schema.DataError, match=r"stray.tfrecord: not listed in .*manifest.json"):
        reader.resolve(d + "/*.tfrecord")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(schema.ManifestError, match=r"manifest.json: manifest not found"):
        reader.make_dataset(d, 2)


def _first_error(path, shuffle_buffer=0, batch=2, **kw):
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        for _ in reader.make_dataset(path, batch, epochs=1, shuffle_buffer=shuffle_buffer, **kw):
            pass
    return e.value.message


def test_undecodable_image_names_file_and_record(tmp_path):
    write_indexed(str(tmp_path), [6, 6], bad_image={8})
    msg = _first_error(str(tmp_path))
    assert "corrupt record in file] [" + str(tmp_path / "train-00001-of-00002.tfrecord") in msg
    assert "at record index] [2]" in msg


@pytest.mark.parametrize(
    "bad, shuffle_buffer, global_seed",
    [
        (10, 0, None),  # in the last batch: no later batch shows the gap, the end of the pass does
        (5, 8, None),  # wherever the shuffle puts it
        (0, 12, 0),  # the replay that names it is seeded by `seed` alone, as the pass was
    ],
)
def test_undecodable_image_anywhere_is_named(tmp_path, bad, shuffle_buffer, global_seed):
    write_indexed(str(tmp_path), [12], bad_image={bad})
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    tf.random.set_seed(global_seed)
    try:
        with pytest.raises(tf.errors.InvalidArgumentError) as e:
            for _ in reader.make_dataset(str(tmp_path), 4, epochs=1, shuffle_buffer=shuffle_buffer):
                pass
    finally:
        tf.random.set_seed(None)
    assert f"corrupt record in file] [{shard}] [at record index] [{bad}]" in e.value.message


@pytest.mark.parametrize("damage, index, lost", [(flip_byte, 3, 3), (truncate_in, 4, 2)])
def test_bad_crc_and_truncated_shard_name_file_and_record(tmp_path, damage, index, lost):
    write_indexed(str(tmp_path), [6, 6])
    shard = str(tmp_path / "train-00000-of-00002.tfrecord")
    damage(shard, index)
    msg = _first_error(str(tmp_path))
    assert f"corrupt record in file] [{shard}] [at record index] [{index}] [:] [{lost}] [record(s)" in msg
    # skip_corrupt: the readable records go through, the rest is counted
    pipe = reader.open_dataset(str(tmp_path), 1, epochs=1, shuffle_buffer=0, skip_corrupt=True)
    labels = sorted(int(y[0]) for _, y, _ in pipe.dataset)
    assert pipe.corrupt_records.numpy() == lost
    assert sorted(set(labels)) == sorted(set(range(12)) - set(range(index, 6)))


def test_a_truncated_file_beyond_the_epochs_steps_is_still_found(tmp_path):
    # worker 0 of 2 holds 600 records but runs the smaller worker's 140 // 5 = 28 steps: the
    # epoch ends long before its files do, and the break at record 66 must still be reported
    write_indexed(str(tmp_path), [300, 140, 300])
    shard = str(tmp_path / "train-00000-of-00003.tfrecord")
    truncate_in(shard, 66)
    msg = _first_error(str(tmp_path), batch=5, rank=0, size=2)
    assert f"corrupt record in file] [{shard}] [at record index] [66]" in msg


def test_skip_corrupt_with_less_than_a_batch_readable_raises(tmp_path):
    write_indexed(str(tmp_path), [4], bad_image={0, 1, 2, 3})
    with pytest.raises(tf.errors.InvalidArgumentError, match="fewer readable records than one batch"):
        for _ in reader.make_dataset(str(tmp_path), 2, epochs=1, shuffle_buffer=0, skip_corrupt=True):
            pass


@pytest.mark.parametrize(
    "bad, shuffle_buffer",
    [
        ({1, 7, 8}, 0),
        ({1, 3, 5, 6}, 0),  # runs of holes, several in one file
        ({0, 11}, 5),
        ({2, 3, 4, 9}, 12),
    ],
)  # shuffled
def test_skip_corrupt_counts_and_keeps_steps(tmp_path, bad, shuffle_buffer):
    write_indexed(str(tmp_path), [6, 6], bad_image=bad)
    pipe = reader.open_dataset(str(tmp_path), 3, epochs=1, shuffle_buffer=shuffle_buffer, skip_corrupt=True)
    labels = [y.numpy().tolist() for _, y, _ in pipe.dataset]
    assert len(labels) == pipe.steps_per_epoch == 4  # refilled: the step count holds
    assert not bad & set(sum(labels, []))
    assert pipe.corrupt_records.numpy() == len(bad)  # each counted once (not the refill)


def test_label_out_of_range_names_file_record_and_label(tmp_path):
    m = write_indexed(str(tmp_path), [4, 4], num_classes=8)
    m.num_classes = 6  # labels 6 and 7 are now out of range
    m.save(str(tmp_path))
    msg = _first_error(str(tmp_path))
    assert "label] [6] [outside [0,] [6]" in msg
    assert str(tmp_path / "train-00001-of-00002.tfrecord") + "] [at record index] [2]" in msg
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside"):  # skipping never hides it
        for _ in reader.make_dataset(str(tmp_path), 2, epochs=1, skip_corrupt=True):
            pass


def test_more_records_than_manifest_is_an_error(tmp_path):
    m = write_indexed(str(tmp_path), [4])
    m.examples_per_shard = [3]
    m.save(str(tmp_path))
    # (found when the extra record is read: here the shuffle buffer pulls the whole file)
    assert "has more records than its manifest lists:] [3]" in _first_error(str(tmp_path), shuffle_buffer=8)


def test_plan_rejects_fewer_records_than_a_batch():
    with pytest.raises(schema.DataError, match="worker 1 of 2 gets 1 records, fewer than one batch of 2"):
        reader.plan_shards(["a"], [3], 0, 2, 2)


@pytest.mark.parametrize(
    "count, cut",
    [
        (130, 64),  # the break at the first record of a block: the end mark opens a block alone
        (130, 63),  # at the last record of a block
        (130, 128),  # the end mark after two full blocks
        (128, None),  # a whole file of exactly two blocks reads clean
    ],
)
def test_file_ends_at_block_boundaries(tmp_path, count, cut):
    write_indexed(str(tmp_path), [count], size=8)
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    if cut is None:
        labels = sorted(y for _, ys, _ in reader.make_dataset(str(tmp_path), 32, epochs=1) for y in ys.numpy())
        assert labels == list(range(count))
        return
    truncate_in(shard, cut)
    msg = _first_error(str(tmp_path), batch=32)
    assert f"corrupt record in file] [{shard}] [at record index] [{cut}] [:] [{count - cut}] [record(s)" in msg


@pytest.mark.parametrize("rank, lost", [(0, 3), (1, 4)])
def test_truncated_file_with_record_level_sharding_counts_each_workers_loss(tmp_path, rank, lost):
    # one file of 12 for 2 workers: worker 0 keeps records 0, 2, .., 10; worker 1 keeps 1, 3, .., 11.
    # Cut at record 5: worker 0 got 0, 2, 4 (3 of its 6 lost), worker 1 got 1, 3 (4 lost).
    write_indexed(str(tmp_path), [12])
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    truncate_in(shard, 5)
    with pytest.warns(UserWarning, match="record-level sharding"):
        msg = _first_error(str(tmp_path), batch=1, rank=rank, size=2)
    assert f"corrupt record in file] [{shard}] [at record index] [5] [:] [{lost}] [record(s)" in msg


def test_the_decoders_and_the_file_bookkeeping_run_inline(tmp_path):
    # map_inline relies on a private tf.data constructor: a TensorFlow that drops its attribute
    # would silently bring back the thread hand-offs (docs/benchmarks.md), so check the graph.
    write_indexed(str(tmp_path), [6, 6])
    graph = tf.compat.v1.GraphDef.FromString(
        reader.make_dataset(str(tmp_path), 2, epochs=1)._as_serialized_graph().numpy()
    )
    ops = [n for f in graph.library.function for n in f.node_def] + list(graph.node)
    inline = {
        n.op
        for n in ops
        if n.op in ("MapDataset", "ParallelMapDatasetV2")
        and "use_inter_op_parallelism" in n.attr
        and not n.attr["use_inter_op_parallelism"].b
    }
    assert inline == {"MapDataset", "ParallelMapDatasetV2"}
    assert list(reader.map_inline(tf.data.Dataset.range(4), lambda x: 2 * x, parallel=2)) == [0, 2, 4, 6]


def test_an_epoch_whose_every_batch_fails_is_named_after_a_good_one(tmp_path):
    # files of 4 and 3 records, batches of 4: 1 step per epoch, the rest read but not decoded.
    # Record 1 of the second file is bad: an epoch that reads the first file first is whole, one
    # that reads the second file first yields no batch at all. Find a seed with the good order
    # first, then the bad one: the second epoch's loss must still be named.
    write_indexed(str(tmp_path), [4, 3], bad_image={5})
    shard = str(tmp_path / "train-00001-of-00002.tfrecord")
    for seed in range(64):
        base = reader.open_dataset(str(tmp_path), 4, seed=seed).seed
        if [reader.file_order(2, base, e).numpy().tolist() for e in (0, 1)] == [[0, 1], [1, 0]]:
            break
    else:
        pytest.fail("no seed with the orders this test needs")
    it = iter(reader.make_dataset(str(tmp_path), 4, seed=seed, epochs=2, shuffle_buffer=0, cycle_length=1))
    x, y, e = next(it)
    assert int(e) == 0 and sorted(y.numpy().tolist()) == [0, 1, 2, 3]
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{shard}\\] \\[at record index\\] \\[1\\]"):
        next(it)


def test_nothing_decodable_raises_instead_of_reading_forever(tmp_path):
    # epochs=None (as `pfc train` reads): no batch ever decodes, and the error must still come
    write_indexed(str(tmp_path), [4], bad_image={0, 1, 2, 3})
    result = []

    def first_batch():
        try:
            next(iter(reader.make_dataset(str(tmp_path), 4, shuffle_buffer=0)))
            result.append("a batch")
        except tf.errors.InvalidArgumentError as e:
            result.append(e.message)

    t = threading.Thread(target=first_batch, daemon=True)
    t.start()
    t.join(timeout=120)
    assert result, "the reader neither yielded nor raised in 120 s"
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    assert f"corrupt record in file] [{shard}] [at record index] [0]" in result[0]


def test_a_bad_record_in_an_epochs_last_batch_is_named_when_resizing_and_resuming(tmp_path):
    # the epoch's end batch goes through the resizing decoder too; epochs numbered from 3
    write_indexed(str(tmp_path), [12], bad_image={10})
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    it = iter(reader.make_dataset(str(tmp_path), 4, image_size=(5, 7), shuffle_buffer=0, start_epoch=3))
    for _ in range(2):
        x, y, e = next(it)
        assert x.shape == (4, 5, 7, 3) and int(e) == 3
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{shard}\\] \\[at record index\\] \\[10\\]"):
        next(it)


def test_shuffle_permutes_each_window_of_whole_batches(tmp_path):
    # 60 records read in one order (3 files, one 64-record block each); shuffle_buffer 10 with
    # batches of 4 is a window of 12 records: each window of the read order permuted as a whole
    write_indexed(str(tmp_path), [20, 20, 20])
    read = lambda buf: np.concatenate(  # noqa: E731
        [y.numpy() for _, y, _ in reader.make_dataset(str(tmp_path), 4, seed=1, epochs=1, shuffle_buffer=buf)]
    )
    plain, shuffled = read(0), read(10)
    assert sorted(plain) == list(range(60)) and sorted(shuffled) == list(range(60))
    windows = [(sorted(plain[k : k + 12]), sorted(shuffled[k : k + 12])) for k in range(0, 60, 12)]
    assert all(p == s for p, s in windows)  # no record leaves its window
    assert all(not np.array_equal(plain[k : k + 12], shuffled[k : k + 12]) for k in range(0, 60, 12))


@pytest.mark.parametrize("later", [False, True])
def test_unparsable_example_is_named_wherever_it_falls_in_its_window(tmp_path, later):
    # Windows of 12 records (3 batches of 4); the record is named also when it is not in the
    # first of its window's batches (here in the third window: the replay starts at the right
    # window and batch).
    write_indexed(str(tmp_path), [48])
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    order = np.concatenate(
        [y.numpy() for _, y, _ in reader.make_dataset(str(tmp_path), 4, seed=3, epochs=1, shuffle_buffer=12)]
    )  # record at each position
    bad = next(int(g) for p, g in enumerate(order) if p // 12 == 2 and ((p // 4) % 3 > 0) == later)
    replace_record(shard, bad, b"\x0a\x05not an Example")
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        for _ in reader.make_dataset(str(tmp_path), 4, seed=3, epochs=1, shuffle_buffer=12):
            pass
    assert f"corrupt record in file] [{shard}] [at record index] [{bad}] [: unparsable Example" in e.value.message


def test_records_past_the_epochs_steps_are_never_decoded(tmp_path):
    # Worker 0 of 2 holds 8 records but runs worker 1's 4 // 4 = 1 step: one window of both its
    # batches, of which only the first is used. A bad record in the other one goes unnoticed,
    # as it would in any batch past the steps.
    write_indexed(str(tmp_path), [8, 4])
    kw = dict(rank=0, size=2, seed=3, epochs=1, shuffle_buffer=8)
    used = sorted(int(g) for _, y, _ in reader.make_dataset(str(tmp_path), 4, **kw) for g in y.numpy())
    assert len(used) == 4
    replace_record(
        str(tmp_path / "train-00000-of-00002.tfrecord"), min(set(range(8)) - set(used)), b"\x0a\x05not an Example"
    )
    again = sorted(int(g) for _, y, _ in reader.make_dataset(str(tmp_path), 4, **kw) for g in y.numpy())
    assert again == used
