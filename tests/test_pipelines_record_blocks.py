"""The compiled record reader (pipelines/record_blocks.cc): blocks, where a file's records stop,
and its Example parser checked against tf.io.parse_single_example."""

import os

import numpy as np
import pytest
import tensorflow as tf
from pipelines_helpers import flip_byte, jpeg, truncate_in

from pipelines import record_blocks, schema

IMAGE, LABEL = schema.IMAGE_KEY, schema.LABEL_KEY


def _write(path, records):
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r)
    return str(path)


def _blocks(path, block=4, buffer_size=64):
    return [
        (int(s), [bytes(i) for i in im.numpy()], y.numpy().tolist(), bool(d))
        for s, im, y, d in record_blocks.RecordBlocks(path, block, buffer_size)
    ]


def _example(features: dict) -> bytes:
    def feature(v):
        if isinstance(v, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        if isinstance(v, float):
            return tf.train.Feature(float_list=tf.train.FloatList(value=[v]))
        if isinstance(v, list):
            return tf.train.Feature(int64_list=tf.train.Int64List(value=v))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    return tf.train.Example(
        features=tf.train.Features(feature={k: feature(v) for k, v in features.items()})
    ).SerializeToString()


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 8, 10])
def test_blocks_cover_the_file_in_order_and_the_last_says_done(tmp_path, n):
    images = [jpeg(i) for i in range(n)]
    path = _write(tmp_path / "f.tfrecord", [schema.encode_example(images[i], 100 + i) for i in range(n)])
    blocks = _blocks(path)
    assert [s for s, *_ in blocks] == list(range(0, 4 * len(blocks), 4))
    assert [im for _, ims, _, _ in blocks for im in ims] == images
    assert [y for _, _, ys, _ in blocks for y in ys] == [100 + i for i in range(n)]
    assert [d for *_, d in blocks] == [False] * (len(blocks) - 1) + [True]
    assert all(len(ys) == 4 for _, _, ys, _ in blocks[:-1])
    if n % 4 == 0:  # a file that ends on a block boundary: one empty last block says so
        assert blocks[-1][2] == []


@pytest.mark.parametrize("damage", ["crc", "truncate"])
def test_records_stop_at_the_first_that_cannot_be_read(tmp_path, damage):
    path = _write(tmp_path / "f.tfrecord", [schema.encode_example(jpeg(i), i) for i in range(10)])
    (flip_byte if damage == "crc" else truncate_in)(path, 6)
    blocks = _blocks(path)
    assert [y for _, _, ys, _ in blocks for y in ys] == list(range(6))
    assert blocks[-1][3] and not any(d for *_, d in blocks[:-1])


def test_a_file_that_cannot_be_opened_is_one_empty_last_block(tmp_path):
    assert _blocks(str(tmp_path / "missing.tfrecord")) == [(0, [], [], True)]


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # length-delimited
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(key: bytes, *features: bytes, key_last=False) -> bytes:
    parts = [_field(2, f) for f in features]
    parts = parts + [_field(1, key)] if key_last else [_field(1, key)] + parts
    return _field(1, b"".join(parts))


def _bytes_feature(*values: bytes) -> bytes:
    return _field(1, b"".join(_field(1, v) for v in values))


def _int64_feature(*values: int, packed=True) -> bytes:
    if packed:
        return _field(3, _field(1, b"".join(_varint(v) for v in values)))
    return _field(3, b"".join(_varint(1 << 3) + _varint(v) for v in values))


IMG = jpeg(7)
CASES = {
    # what writers produce, and what other valid encodings look like
    "plain": _example({IMAGE: IMG, LABEL: 5}),
    "extra features": _example({"image/source": b"x", IMAGE: IMG, "z": 1.5, LABEL: 3, "ids": [1, 2, 3]}),
    "negative and large labels": _example({IMAGE: IMG, LABEL: -(2**63)}),
    "large label": _example({IMAGE: IMG, LABEL: 2**63 - 1}),
    "empty image bytes": _example({IMAGE: b"", LABEL: 1}),
    "unpacked label": _field(
        1, _entry(IMAGE.encode(), _bytes_feature(IMG)) + _entry(LABEL.encode(), _int64_feature(9, packed=False))
    ),
    "key after value": _field(
        1,
        _entry(IMAGE.encode(), _bytes_feature(IMG), key_last=True)
        + _entry(LABEL.encode(), _int64_feature(4), key_last=True),
    ),
    "features given twice (merged)": _field(1, _entry(IMAGE.encode(), _bytes_feature(IMG)))
    + _field(1, _entry(LABEL.encode(), _int64_feature(8))),
    "unknown fields": _field(5, b"junk")
    + _varint(6 << 3)
    + _varint(300)
    + _field(
        1, _entry(IMAGE.encode(), _bytes_feature(IMG)) + _field(7, b"more") + _entry(LABEL.encode(), _int64_feature(2))
    ),
    "a key given again replaces": _field(
        1,
        _entry(LABEL.encode(), _int64_feature(1, 2))
        + _entry(IMAGE.encode(), _bytes_feature(IMG))
        + _entry(LABEL.encode(), _int64_feature(6)),
    ),
    # not what the schema reads
    "no image": _example({LABEL: 5}),
    "no label": _example({IMAGE: IMG}),
    "label as bytes": _example({IMAGE: IMG, LABEL: b"5"}),
    "image as int64": _example({IMAGE: 3, LABEL: 5}),
    "label as float": _example({IMAGE: IMG, LABEL: 5.0}),
    "two labels": _example({IMAGE: IMG, LABEL: [1, 2]}),
    "no label value": _example({IMAGE: IMG, LABEL: []}),
    "two images": _field(
        1, _entry(IMAGE.encode(), _bytes_feature(IMG, IMG)) + _entry(LABEL.encode(), _int64_feature(1))
    ),
    "a value given twice merges": _field(
        1, _entry(IMAGE.encode(), _bytes_feature(IMG), _bytes_feature(IMG)) + _entry(LABEL.encode(), _int64_feature(1))
    ),
    "empty record": b"",
    "text": b"this is not an Example",
    "truncated": _example({IMAGE: IMG, LABEL: 5})[:-3],
    "length past the end": b"\x0a\xff\xff\x03" + _example({IMAGE: IMG, LABEL: 5}),
}


def _tf_parse(record: bytes):
    try:
        ex = tf.io.parse_single_example(record, schema.feature_spec())
    except (tf.errors.InvalidArgumentError, ValueError):
        return None
    return bytes(ex[IMAGE].numpy()), int(ex[LABEL].numpy())


def _ours(tmp_path, records):
    path = _write(tmp_path / "cases.tfrecord", records)
    return [(im, y) for _, ims, ys, _ in _blocks(path, block=64, buffer_size=1 << 16) for im, y in zip(ims, ys)]


def test_the_parser_reads_what_parse_example_reads(tmp_path):
    names = list(CASES)
    ours = _ours(tmp_path, [CASES[n] for n in names])
    for name, got in zip(names, ours):
        want = _tf_parse(CASES[name])
        assert got == (want if want is not None else (b"", -1)), name
    # (the cases cover both outcomes)
    assert sum(_tf_parse(CASES[n]) is None for n in names) >= 10
    assert sum(_tf_parse(CASES[n]) is not None for n in names) >= 8


def test_the_parser_agrees_with_parse_example_on_damaged_examples(tmp_path):
    # Every Example cut short, and a few hundred with one byte changed (most of them in the
    # structure, not in the image), are read as tf.io.parse_single_example reads them.
    rng = np.random.default_rng(0)
    base = CASES["extra features"]
    head = len(base) - len(IMG) - 60  # (bytes around the image's: mostly structure)
    damaged = [base[:k] for k in range(len(base))]
    for _ in range(400):
        b = bytearray(base)
        at = int(rng.integers(0, len(b))) if rng.random() < 0.3 else int(rng.integers(0, 80)) % len(b)
        if at >= head // 2 and rng.random() < 0.5:
            at = len(b) - 1 - int(rng.integers(0, 60))
        b[at] = int(rng.integers(0, 256))
        damaged.append(bytes(b))
    ours = _ours(tmp_path, damaged)
    mismatches = [k for k, (rec, got) in enumerate(zip(damaged, ours)) if got != (_tf_parse(rec) or (b"", -1))]
    assert not mismatches, [damaged[k][:40] for k in mismatches[:3]]
    assert sum(_tf_parse(r) is None for r in damaged) > 100  # (damage that breaks the Example)


def test_the_library_is_named_for_its_source_and_built_whole_or_not_at_all(tmp_path, monkeypatch):
    built = record_blocks.build()
    assert built == record_blocks.library_path() and built.endswith(".so")
    assert os.stat(built).st_mode & 0o555 == 0o555  # (an image built as root runs as another user)
    # Another source: another name, built on demand; a failed build leaves no library behind.
    source = tmp_path / "record_blocks.cc"
    source.write_bytes(open(record_blocks._SOURCE, "rb").read() + b"\n// changed\n")
    monkeypatch.setattr(record_blocks, "_SOURCE", str(source))
    monkeypatch.setattr(record_blocks, "_HERE", str(tmp_path))
    path = record_blocks.library_path()
    assert path != built and path.startswith(str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-pfc")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-pfc'"):
        record_blocks.build()
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(RuntimeError, match="building the record reader failed"):
        record_blocks.build()
    assert not [f for f in tmp_path.iterdir() if not f.name.endswith((".cc", ".lock"))]
