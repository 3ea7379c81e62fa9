"""`pfc data synth|inspect`, `pfc convert images|mxrec`: outputs, and exit status 1 on bad input."""

import pytest
from pipelines_helpers import flip_byte, write_indexed

from launch import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_synth_then_inspect(tmp_path, capsys):
    out = str(tmp_path / "ds")
    code, text, _ = run(
        capsys,
        "data",
        "synth",
        out,
        "--identities",
        "5",
        "--images-per-identity",
        "3",
        "--shards",
        "2",
        "--size",
        "16",
        "--verification-pairs",
        "4",
    )
    assert code == 0 and "wrote 15 images of 5 identities in 2 shards" in text
    code, text, _ = run(capsys, "data", "inspect", out)
    assert code == 0, text
    assert "records     15 read (15 in the manifest)" in text
    assert "classes     5 in the manifest, 5 with images" in text
    assert "per class   min 3  median 3  mean 3.0  max 3" in text and text.rstrip().endswith("ok")


def test_inspect_names_every_corrupt_record(tmp_path, capsys):
    m = write_indexed(str(tmp_path), [4, 4, 4], bad_image={1, 6}, num_classes=12)
    flip_byte(str(tmp_path / m.shards[2]), 2)
    m.num_classes = 11  # label 11 is now out of range
    m.save(str(tmp_path))
    code, text, _ = run(capsys, "data", "inspect", str(tmp_path))
    assert code == 1
    corrupt = [line for line in text.splitlines() if line.startswith("CORRUPT")]
    assert len(corrupt) == 3, text
    assert f"{tmp_path}/{m.shards[0]}: record 1: undecodable JPEG" in corrupt[0]
    assert f"{tmp_path}/{m.shards[1]}: record 2: undecodable JPEG" in corrupt[1]
    assert (
        f"{tmp_path}/{m.shards[2]}: record 2: unreadable" in corrupt[2]
        and "records 2..3 cannot be reached" in corrupt[2]
    )
    assert f"PROBLEM {tmp_path}/{m.shards[2]}: 2 records readable, the manifest lists 4" in text
    # the label check is reached when the framing is intact
    m2 = write_indexed(str(tmp_path / "b"), [3], num_classes=3)
    m2.num_classes = 2
    m2.save(str(tmp_path / "b"))
    code, text, _ = run(capsys, "data", "inspect", str(tmp_path / "b"))
    assert code == 1 and "record 2: label 2 outside [0, 2)" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "inspect", "{tmp}"], "{tmp}/manifest.json: manifest not found"),
        (["data", "inspect", "{tmp}/missing.tfrecord"], "{tmp}/missing.tfrecord: no such file"),
        (["convert", "images", "{tmp}", "{tmp}/out", "--shards", "2"], "{tmp}: no identity sub-folders"),
        (["convert", "mxrec", "{tmp}/train.rec", "{tmp}/out", "--shards", "2"], "{tmp}/train.idx: cannot read"),
        (
            ["data", "synth", "{tmp}/s", "--identities", "0", "--images-per-identity", "1", "--shards", "1"],
            "identities must be >= 1",
        ),
    ],
)
def test_bad_input_exits_1_with_a_message_naming_it(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 1
    assert err.startswith(f"pfc {argv[0]}: error: ") and message.format(tmp=tmp_path) in err


@pytest.mark.slow
def test_bench_data_times_each_pipeline_in_its_own_process_in_turn(tmp_path, capsys):
    # a smoke test of the command (speed itself is measured by the benchmark, never by tests)
    write_indexed(str(tmp_path), [6, 6])
    out, workers = tmp_path / "r.jsonl", 2
    code, text, _ = run(
        capsys,
        "bench",
        "data",
        str(tmp_path),
        "--batch",
        "2",
        "--steps",
        "3",
        "--rounds",
        "2",
        "--workers",
        str(workers),
        "--json",
        str(out),
    )
    assert code == 0 and "decode-only" in text and "reader overhead" in text
    import json

    row = json.loads(out.read_text())
    assert row["workers"] == workers and row["decode_only_img_s"] > 0 and row["reader_img_s"] > 0
    assert [[len(w) for w in per_worker] for per_worker in row["walls"].values()] == [[2] * workers] * 3
    # Turns never overlap: round by round, each pipeline's processes (one per worker) run while
    # the other pipelines' wait.
    turns = sorted(
        (start, end, name)
        for name, per_worker in row["turns"].items()
        for worker in per_worker
        for start, end in worker
    )
    names = [name for _, _, name in turns]
    assert names == [n for _ in range(2) for n in ("decode_only", "decode_batched", "reader") for _ in range(workers)]
    for (_, end, a), (start, _, b) in zip(turns, turns[1:]):
        assert a == b or end <= start


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_data_stops_every_process_when_one_fails(tmp_path, capsys):
    # A record that is not a JPEG: the first pipeline's process fails in its first turn while
    # the others wait at the next barrier; they are stopped and the command exits 1 naming it.
    write_indexed(str(tmp_path), [6, 6], bad_image={1})
    code, _, err = run(capsys, "bench", "data", str(tmp_path), "--batch", "2", "--steps", "3", "--rounds", "2")
    assert code == 1 and "the decode_only process of worker 0 failed" in err


def test_bench_data_overhead_is_the_median_of_paired_rounds():
    from bench.data import paired_overhead

    # One slow reader round moves the median by one rank, not by its size.
    assert paired_overhead([[[1.0, 1.0, 1.0]]], [[1.1, 1.2, 2.0]]) == pytest.approx(0.2)
    # Paired: a round where both are slow (drift) is as good as any other.
    assert paired_overhead([[[1.0, 2.0, 1.0]]], [[1.1, 2.2, 1.1]]) == pytest.approx(0.1)
    assert paired_overhead([[[1.0, 1.0]]], [[1.1, 1.3]]) == pytest.approx(0.2)  # even: mean of the middle two
    # Workers run at once: images/s add up within a round.
    assert paired_overhead([[[1.0], [1.0]]], [[2.0], [1.0]]) == pytest.approx(2 / 1.5 - 1)
    # Two baselines: each round against the faster of them (summed over workers).
    assert paired_overhead([[[2.0, 1.0]], [[1.0, 2.0]]], [[1.5, 1.5]]) == pytest.approx(0.5)
    assert paired_overhead([[[1.0], [4.0]], [[2.0], [1.0]]], [[2.0], [2.0]]) == pytest.approx(1.5 - 1)
    with pytest.raises(ValueError, match="one time per worker and round"):
        paired_overhead([[[1.0, 1.0]]], [[1.0]])
