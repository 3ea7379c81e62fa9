"""Dataset format: manifest, atomic sharded writer, synthetic data, .bin files, converters."""

import json
import os
import pickle
import struct

import numpy as np
import pytest
import tensorflow as tf
from pipelines_helpers import jpeg, write_indexed

from pipelines import folders, mxrec, schema, synth, verification, writer


def test_example_round_trip():
    data = schema.encode_example(b"\xff\xd8jpegbytes", 7, name="alice", source="a/1.jpg")
    ex = tf.io.parse_single_example(data, schema.feature_spec(with_identity=True))
    assert ex[schema.IMAGE_KEY].numpy() == b"\xff\xd8jpegbytes"
    assert int(ex[schema.LABEL_KEY]) == 7
    assert ex[schema.NAME_KEY].numpy() == b"alice" and ex[schema.SOURCE_KEY].numpy() == b"a/1.jpg"
    bare = tf.io.parse_single_example(schema.encode_example(b"x", 0), schema.feature_spec(True))
    assert bare[schema.NAME_KEY].numpy() == b""  # optional keys default to ''


def test_manifest_round_trip(tmp_path):
    m = schema.Manifest(
        num_classes=5,
        image_size=(16, 12),
        shards=["t-00000-of-00002.tfrecord", "t-00001-of-00002.tfrecord"],
        examples_per_shard=[3, 4],
        verification=["v.bin"],
    )
    path = m.save(str(tmp_path))
    assert path.endswith("manifest.json") and os.listdir(tmp_path) == ["manifest.json"]  # no temp left
    back = schema.Manifest.load(str(tmp_path))
    assert back == m and back.num_examples == 7 and back.image_size == (16, 12)
    assert schema.Manifest.load(path) == m


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": [16]}, "image_size"),
        ({"examples_per_shard": [3]}, "examples_per_shard"),
        ({"shards": ["../escape", "b"]}, "plain file name"),
        ({"format_version": 99}, "format_version"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_manifest_validation_names_file_and_field(tmp_path, edit, words):
    d = {"num_classes": 5, "image_size": [16, 16], "shards": ["a", "b"], "examples_per_shard": [3, 4]}
    d.update(edit)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(schema.ManifestError) as e:
        schema.Manifest.load(str(tmp_path))
    assert str(tmp_path / "manifest.json") in str(e.value) and words in str(e.value)


def test_missing_and_bad_json_manifest(tmp_path):
    with pytest.raises(schema.ManifestError, match=f"{tmp_path}/manifest.json: manifest not found"):
        schema.Manifest.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(schema.ManifestError, match="not valid JSON"):
        schema.Manifest.load(str(tmp_path))


def test_writer_layout_and_counts(tmp_path):
    m = write_indexed(str(tmp_path), [3, 2, 4])
    assert m.shards == [f"train-0000{k}-of-00003.tfrecord" for k in range(3)]
    assert m.examples_per_shard == [3, 2, 4]
    assert sorted(os.listdir(tmp_path)) == sorted(m.shards + ["manifest.json", ".train-job.json"])
    labels = [
        int(tf.io.parse_single_example(r, schema.feature_spec())[schema.LABEL_KEY])
        for r in tf.data.TFRecordDataset(str(tmp_path / m.shards[1]))
    ]
    assert labels == [3, 4]


def test_writer_rejects_out_of_range_label_without_leaving_a_shard(tmp_path):
    with pytest.raises(schema.DataError, match=r"src9: label 9 outside \[0, 5\)"):
        writer.write_sharded(
            str(tmp_path), 1, lambda k: [writer.Record(b"x", 9, source="src9")], num_classes=5, image_size=(8, 8)
        )
    assert os.listdir(tmp_path) == [".train-job.json"]  # no shard, no manifest


def test_interrupted_write_leaves_no_complete_looking_shard_and_rerun_resumes(tmp_path):
    calls = []

    def records(k, crash_in=None):
        calls.append(k)
        for i in range(3):
            if k == crash_in and i == 2:
                raise KeyboardInterrupt("simulated kill")
            yield writer.Record(jpeg(10 * k + i), k)

    with pytest.raises(KeyboardInterrupt):
        writer.write_sharded(str(tmp_path), 3, lambda k: records(k, crash_in=1), num_classes=3, image_size=(8, 8))
    names = sorted(os.listdir(tmp_path))
    assert names == [".train-job.json", "train-00000-of-00003.tfrecord"]  # shard 1's temp removed, no manifest
    names = names[1:]
    # A killed process cannot clean up: leave a stale partial temp file as it would.
    (tmp_path / ".train-00002-of-00003.tfrecord.tmp-99999").write_bytes(b"partial")
    done = os.stat(tmp_path / names[0]).st_mtime_ns
    calls.clear()
    m = writer.write_sharded(str(tmp_path), 3, records, num_classes=3, image_size=(8, 8))
    assert calls == [1, 2]  # shard 0 kept, not regenerated
    assert os.stat(tmp_path / names[0]).st_mtime_ns == done
    assert m.examples_per_shard == [3, 3, 3]
    assert sorted(os.listdir(tmp_path)) == sorted(m.shards + ["manifest.json", ".train-job.json"])
    calls.clear()
    writer.write_sharded(str(tmp_path), 3, records, num_classes=3, image_size=(8, 8), resume=False)
    assert calls == [0, 1, 2]  # rewrite: every shard again
    calls.clear()
    writer.write_sharded(str(tmp_path), 3, records, num_classes=3, image_size=(8, 8), job={"other": 1})
    assert calls == [0, 1, 2]  # another job: nothing kept


def test_synth_rerun_with_other_parameters_does_not_keep_old_shards(tmp_path):
    synth.write_synth(str(tmp_path), synth.SynthConfig(4, 2, size=8, verification_pairs=1), 2)
    m = synth.write_synth(str(tmp_path), synth.SynthConfig(6, 2, size=8, verification_pairs=1), 2)
    labels = [
        int(tf.io.parse_single_example(r, schema.feature_spec())[schema.LABEL_KEY])
        for f in m.shard_paths(str(tmp_path))
        for r in tf.data.TFRecordDataset(f)
    ]
    assert sorted(labels) == sorted(list(range(6)) * 2)


def test_rewrite_with_other_shard_count_removes_old_shards(tmp_path):
    write_indexed(str(tmp_path), [2, 2, 2])
    write_indexed(str(tmp_path), [3, 3])
    assert sorted(os.listdir(tmp_path)) == [
        ".train-job.json",
        "manifest.json",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]


def test_synth_is_deterministic_and_identities_are_distinct():
    a = synth.render(0, 3, 1, 32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, synth.render(0, 3, 1, 32))
    assert not np.array_equal(a, synth.render(1, 3, 1, 32))  # the seed matters


def _pair_similarities(images: np.ndarray) -> np.ndarray:
    x = images.reshape(len(images), -1)
    x = x - x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x[0::2] * x[1::2]).sum(1)


@pytest.mark.parametrize("size", [16, 32])
def test_synth_verification_set_is_meaningful_but_not_trivial(tmp_path, size):
    cfg = synth.SynthConfig(identities=6, images_per_identity=3, size=size, verification_pairs=60)
    m = synth.write_synth(str(tmp_path), cfg, 2)
    assert m.num_classes == 6 and m.num_examples == 18 and m.verification == ["verification.bin"]
    images, same = verification.load_bin(str(tmp_path / "verification.bin"), (size, size))
    assert images.shape == (240, size, size, 3) and same.sum() == 60 and (~same).sum() == 60
    assert images.min() >= -1 and images.max() <= 1
    sim = _pair_similarities(images)
    # Views of one identity are clearly closer than views of two (a model can learn this) ...
    assert sim[same].mean() > sim[~same].mean() + 0.08
    # ... but raw pixels do not solve verification (there is something to learn).
    best = max(np.mean((sim > t) == same) for t in sim)
    assert 0.6 < best < 0.95


def test_bin_round_trip_and_python2_style_pickles(tmp_path):
    imgs = [jpeg(i) for i in range(4)]
    p = str(tmp_path / "v.bin")
    verification.save_bin(p, imgs, [True, False])
    got, same = verification.load_pairs(p)
    assert got == imgs and same.tolist() == [True, False]
    # protocol 2 (bytes through _codecs.encode), bytearrays, numpy uint8 arrays and numpy bools
    obj = ([bytearray(imgs[0]), np.frombuffer(imgs[1], np.uint8), imgs[2], imgs[3]], [np.bool_(True), False])
    (tmp_path / "old.bin").write_bytes(pickle.dumps(obj, protocol=2))
    got, same = verification.load_pairs(str(tmp_path / "old.bin"))
    assert got == imgs and same.tolist() == [True, False]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_bin_is_refused_without_running_it(tmp_path):
    _Evil.marker = str(tmp_path / "pwned")
    p = tmp_path / "evil.bin"
    p.write_bytes(pickle.dumps(([_Evil()], [True])))
    with pytest.raises(schema.DataError, match=r"evil.bin: refusing to unpickle global (posix|os)\.system"):
        verification.load_pairs(str(p))
    assert not os.path.exists(_Evil.marker)
    p.write_bytes(pickle.dumps((["a", "b"], [True]))[:-5])
    with pytest.raises(schema.DataError, match="evil.bin: not a verification .bin"):
        verification.load_pairs(str(p))


# --- MXNet RecordIO, written here by an independent writer (the format, not pipelines' code) ---

MAGIC = 0xCED7230A


def _rec_frame(data: bytes) -> bytes:
    """dmlc RecordIO framing, splitting at 4-aligned occurrences of the magic word."""
    m = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(data) - 3, 4) if data[i : i + 4] == m]
    parts, start = [], 0
    for c in cuts:
        parts.append(data[start:c])
        start = c + 4
    parts.append(data[start:])
    out = b""
    for i, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
        out += m + struct.pack("<I", (cflag << 29) | len(part)) + part + b"\0" * (-len(part) % 4)
    return out


def _ir(label, payload: bytes, id_: int = 0) -> bytes:
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id_, 0) + np.asarray(label, "<f4").tobytes() + payload
    return struct.pack("<IfQQ", 0, float(label), id_, 0) + payload


def write_mxrec(d, labels, header=True, prop=True, size=8):
    """train.rec/.idx (+ property): record 0 the header [first identity record, end]."""
    images = [jpeg(100 + i, size) for i in range(len(labels))]
    records = []
    if header:
        n = len(labels) + 1
        records.append(_ir([float(n), float(n + max(labels) + 1)], b""))
    magic_as_float = struct.unpack("<f", struct.pack("<I", MAGIC))[0]
    for i, (y, img) in enumerate(zip(labels, images)):
        # odd records: label arrays; the last one's second label has the magic word's bytes, at an
        # aligned offset, so the writer must store that record in parts
        last = i == len(labels) - 1
        records.append(_ir([float(y), magic_as_float if last else 0.5] if i % 2 or last else y, img, i))
    assert any(r.count(struct.pack("<I", MAGIC)) for r in records)
    rec, idx = b"", ""
    for k, r in enumerate(records):
        idx += f"{k}\t{len(rec)}\n"
        rec += _rec_frame(r)
    (d / "train.rec").write_bytes(rec)
    (d / "train.idx").write_text(idx)
    if prop:
        (d / "property").write_text(f"{max(labels) + 1},{size},{size}")
    return images


def test_mxrec_framing_header_and_labels(tmp_path):
    labels = [0, 0, 1, 2, 2, 1]
    images = write_mxrec(tmp_path, labels)
    data = mxrec.FaceRecords(str(tmp_path / "train.rec"))
    assert data.keys == [1, 2, 3, 4, 5, 6] and data.num_classes == 3 and data.image_size == (8, 8)
    got = [data.image(k) for k in data.keys]
    assert [y for y, _ in got] == labels  # float labels and first-of-array labels
    assert [b for _, b in got] == images  # incl. the record stored in parts
    off = data.file.offsets[6]
    lrec = struct.unpack_from("<I", (tmp_path / "train.rec").read_bytes(), off + 4)[0]
    assert lrec >> 29 == 1  # it is stored as a first part (cflag 1)
    raw = data.file.read(6)
    assert len(mxrec.unpack(raw)[0].label) == 2 and raw.count(struct.pack("<I", MAGIC)) == 1


def test_mxrec_convert_round_trip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    labels = [0, 1, 1, 2, 0]
    images = write_mxrec(src, labels, prop=False)
    m = mxrec.convert(str(src / "train.rec"), str(tmp_path / "out"), 2)
    assert m.num_classes == 3 and m.examples_per_shard == [3, 2] and m.image_size == (8, 8)
    got = {}
    for shard in m.shard_paths(str(tmp_path / "out")):
        for r in tf.data.TFRecordDataset(shard):
            ex = tf.io.parse_single_example(r, schema.feature_spec(True))
            got[ex[schema.SOURCE_KEY].numpy().decode()] = (int(ex[schema.LABEL_KEY]), ex[schema.IMAGE_KEY].numpy())
    assert sorted(got) == [f"mxrec:{k}" for k in range(1, 6)]
    for k in range(1, 6):
        assert got[f"mxrec:{k}"] == (labels[k - 1], images[k - 1])


def test_mxrec_without_header_record_uses_every_indexed_record(tmp_path):
    write_mxrec(tmp_path, [1, 0, 1], header=False)
    data = mxrec.FaceRecords(str(tmp_path / "train.rec"))
    assert data.keys == [0, 1, 2] and data.image(0)[0] == 1


def test_mxrec_bad_input_names_file_and_record(tmp_path):
    write_mxrec(tmp_path, [0, 1, 1])
    rec = tmp_path / "train.rec"
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    b = bytearray(rec.read_bytes())
    b[offsets[2]] ^= 0xFF
    rec.write_bytes(bytes(b))
    data = mxrec.FaceRecords(str(rec))
    with pytest.raises(schema.DataError, match=r"train.rec key 2: bad magic"):
        data.image(2)
    rec.write_bytes(bytes(b)[: offsets[3] + 20])
    with pytest.raises(schema.DataError, match=r"train.rec key 3: truncated"):
        mxrec.FaceRecords(str(rec)).image(3)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(schema.DataError, match=r"train.idx: cannot read the RecordIO index"):
        mxrec.FaceRecords(str(rec))


def test_image_folder_conversion(tmp_path):
    src = tmp_path / "src"
    for name, n in (("bob", 2), ("alice", 3)):
        (src / name).mkdir(parents=True)
        for i in range(n):
            (src / name / f"{i}.jpg").write_bytes(jpeg(hash((name, i)) % 1000, 12))
    png = tf.io.encode_png(np.zeros((20, 16, 3), np.uint8)).numpy()
    (src / "bob" / "z.png").write_bytes(png)
    (src / "bob" / "notes.txt").write_text("ignored")
    m = folders.convert(str(src), str(tmp_path / "out"), 2, size=12)
    assert m.num_classes == 2 and m.num_examples == 6 and m.image_size == (12, 12)
    seen = []
    for shard in m.shard_paths(str(tmp_path / "out")):
        for r in tf.data.TFRecordDataset(shard):
            ex = tf.io.parse_single_example(r, schema.feature_spec(True))
            img = tf.io.decode_jpeg(ex[schema.IMAGE_KEY])
            assert img.shape == (12, 12, 3)  # the PNG was resized and re-encoded as JPEG
            seen.append((ex[schema.NAME_KEY].numpy().decode(), int(ex[schema.LABEL_KEY])))
    assert sorted(seen) == [("alice", 0)] * 3 + [("bob", 1)] * 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(schema.DataError, match="no identity sub-folders"):
        folders.scan(str(tmp_path))
    (tmp_path / "carol").mkdir()
    with pytest.raises(schema.DataError, match=f"{tmp_path}/carol: identity folder has no image files"):
        folders.scan(str(tmp_path))
    (tmp_path / "carol" / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(schema.DataError, match=r"carol/x.jpg \(not a decodable image"):
        folders.convert(str(tmp_path), str(tmp_path / "out"), 1)


def test_image_folder_names_every_bad_file_or_skips_and_lists_them(tmp_path):
    src = tmp_path / "src"
    for name in ("ann", "ben"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"{i}.jpg").write_bytes(jpeg(i, 12))
    (src / "ann" / "1.jpg").write_bytes(b"truncated")
    (src / "ben" / "2.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(schema.DataError) as e:
        folders.convert(str(src), str(tmp_path / "out"), 2, size=12)
    message = str(e.value)
    assert message.startswith(f"{src}: 2 file(s) cannot be read as images: ")
    assert f"{src}/ann/1.jpg (not a decodable image" in message and f"{src}/ben/2.png (" in message
    assert "--skip-bad" in message and not (tmp_path / "out").exists()  # nothing written
    m = folders.convert(str(src), str(tmp_path / "out"), 2, size=12, skip_bad=True)
    assert m.num_examples == 5 and [x["file"] for x in m.skipped] == [f"{src}/ann/1.jpg", f"{src}/ben/2.png"]
    assert schema.Manifest.load(str(tmp_path / "out")).skipped == m.skipped


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_non_square_photos_are_cropped_or_padded_not_stretched(tmp_path, fit):
    """A 40x20 (H x W) photo: white left half, black right half, and a red top quarter. Crop keeps
    the centred 20x20 (no red); pad keeps it all in a 40x40 square (black bands left and right)."""
    img = np.zeros((40, 20, 3), np.uint8)
    img[:, :10] = 255
    img[:10] = [255, 0, 0]
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(tf.io.encode_png(img).numpy())
    m = folders.convert(str(tmp_path / "src"), str(tmp_path / "out"), 1, size=40, fit=fit)
    record = next(iter(tf.data.TFRecordDataset(m.shard_paths(str(tmp_path / "out"))[0])))
    got = tf.io.decode_jpeg(tf.io.parse_single_example(record, schema.feature_spec())[schema.IMAGE_KEY]).numpy()
    assert got.shape == (40, 40, 3) and m.image_size == (40, 40)
    left, right, top = got[20:, :8].mean(), got[20:, 32:].mean(), got[:4, 15:25].astype(float)
    if fit == "crop":  # the centred square: rows 10..30, scaled x2: white left, black right, no red
        assert left > 200 and right < 40 and abs(top[..., 0] - top[..., 1]).mean() < 40
    else:  # padded to 40x40: a black band at both sides, red on top in the middle
        assert got[:, :3].mean() < 40 and got[:, -3:].mean() < 40 and (top[..., 0] - top[..., 1]).mean() > 150


def test_image_folder_default_size_is_112(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(jpeg(1, 12))
    assert folders.convert(str(tmp_path / "src"), str(tmp_path / "out"), 1).image_size == (112, 112)
