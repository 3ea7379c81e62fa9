"""`pfc report`: plots from a synthetic JSON-lines log; schema errors name the file and line."""

import json

import pytest
from synthetic_log import write_log

from launch.cli import main
from launch.report import LogError, read_log

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_writes_four_pngs_and_a_summary(tmp_path, capsys):
    write_log(tmp_path, steps=600, every=10, eval_every=200)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("loss", "accuracy", "throughput", "verification"):
        data = (tmp_path / "report" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
        assert f"wrote {tmp_path / 'report' / name}.png" in out
    assert "steps 10..600 (60 records)" in out and "lfw: last accuracy" in out
    assert not list((tmp_path / "report").glob(".*"))  # no temporary files left


def test_log_is_read_in_file_order_with_evals_per_set(tmp_path):
    path = write_log(tmp_path, steps=100, every=10, eval_every=50)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    run = read_log(path)
    train = [r for r in records if "loss" in r]
    assert run.train["step"] == [r["step"] for r in train]
    assert run.train["samples_per_sec"] == [r["samples_per_sec"] for r in train]
    assert run.evals["lfw"]["tar@far=1e-3"] == [
        (r["step"], r["eval"]["lfw"]["tar@far=1e-3"]) for r in records if "eval" in r
    ]
    assert set(run.evals) == {"lfw", "cfp_fp"}


def test_without_evals_no_verification_plot(tmp_path, capsys):
    write_log(tmp_path, steps=50, every=10, eval_every=10**9)
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png", "loss.png", "throughput.png"]
    assert "verification.png not written" in capsys.readouterr().out


def test_nan_loss_and_a_line_being_written_are_tolerated(tmp_path, capsys):
    path = write_log(tmp_path, steps=50, every=10, eval_every=10**9)
    with open(path, "a") as f:
        f.write('{"time": 1, "step": 60, "epoch": 0.06, "loss": NaN, "accuracy": 0, "lr": 0.1, "samples_per_sec": 9}\n')
        f.write('{"time": 1, "step": 70, "ep')  # the writer is mid-line
    run = read_log(path)
    assert run.train["step"][-1] == 60 and run.skipped_partial_line
    assert main(["report", str(tmp_path)]) == 0
    assert "last line is incomplete" in capsys.readouterr().err


TRAIN = '{"time": 1, "step": 1, "epoch": 0, "loss": 2.0, "accuracy": 0.1, "lr": 0.1, "samples_per_sec": 5}'


@pytest.mark.parametrize(
    "lines, message",
    [
        ([TRAIN, "{oops", TRAIN], r"log.jsonl:2: not JSON"),
        ([TRAIN, TRAIN.replace('"loss": 2.0, ', "")], r"log.jsonl:2: missing key 'loss'"),
        ([TRAIN.replace('"lr": 0.1', '"lr": "fast"')], r"log.jsonl:1: key 'lr' is 'fast', expected a number"),
        ([TRAIN.replace('"step": 1', '"step": 1.5')], r"log.jsonl:1: key 'step' is 1.5, expected an integer"),
        (
            [TRAIN, '{"step": 5, "eval": {"lfw": {"tar@far=1e-3": 0.9}}}'],
            r"log.jsonl:2: eval set 'lfw' must be an object with 'accuracy'",
        ),
        ([TRAIN, '{"step": 5, "eval": {"lfw": {"accuracy": null}}}'], r"log.jsonl:2: key 'eval.lfw.accuracy' is None"),
        (["[1, 2]"], r"log.jsonl:1: expected a JSON object, got list"),
        (['{"event": "start"}'], r"log.jsonl: no training or evaluation records"),
    ],
)
def test_bad_log_names_file_and_line(tmp_path, capsys, lines, message):
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LogError, match=message):
        read_log(tmp_path / "log.jsonl")
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "log.jsonl") in err
    assert not (tmp_path / "report").exists()


def test_missing_log_is_named(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope' / 'log.jsonl'}: no such file" in capsys.readouterr().err


def test_a_tar_that_no_set_could_measure_is_said_not_drawn_empty(tmp_path, monkeypatch):
    """Small sets log TAR as null (the FAR needs more impostor pairs): the TAR panel says so
    instead of showing empty axes and an empty legend."""
    from launch import report

    lines = [
        json.dumps(
            {"time": 1.0, "step": 5, "epoch": 0.1, "loss": 3.0, "accuracy": 0.1, "lr": 0.1, "samples_per_sec": 100.0}
        ),
        json.dumps(
            {
                "time": 2.0,
                "step": 5,
                "eval": {"verification": {"accuracy": 0.9, "accuracy_std": 0.05, "tar@far=0.001": None}},
            }
        ),
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append((fig, path)))
    report.plot(read_log(tmp_path / "log.jsonl"), tmp_path / "out", "run")
    fig = next(f for f, p in figures if p.name == "verification.png")
    accuracy, tar = fig.axes
    assert accuracy.get_legend() is not None and accuracy.lines
    assert tar.get_legend() is None and not tar.lines
    assert any("not measurable" in t.get_text() for t in tar.texts)
