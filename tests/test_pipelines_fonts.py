"""`pfc data fonts`: coverage, styles and families, determinism, open-set splits, bad input.

Most tests use fonts built on the fly (tests/fonts_helpers.py); the ones marked for real
typefaces use Debian's (`make fonts-test`) and skip, saying how to get them, when absent.
"""

import os
import pickle

import pytest
import tensorflow as tf
from fonts_helpers import INSTALL_HINT, REAL_FONTS, build_font, font_set, sample_chars

from launch import cli
from pipelines import fonts, fonts_data, schema, typefaces, verification


def _plan(files, **kw):
    cfg = fonts.FontsConfig(**{"size": 32, "per_style": 2, "pairs": 40, "shards": 2, **kw})
    plan, sources = fonts.build_plan(cfg, list(files))
    return cfg, plan, sources


def _records(path):
    spec = schema.feature_spec(with_identity=True)
    out = []
    for file in sorted(tf.io.gfile.glob(os.path.join(path, "*.tfrecord"))):
        for raw in tf.data.TFRecordDataset(file):
            ex = tf.io.parse_single_example(raw, spec)
            out.append((int(ex[schema.LABEL_KEY]), ex[schema.SOURCE_KEY].numpy().decode()))
    return out


# --- coverage -------------------------------------------------------------------------------
def test_a_missing_empty_or_boxed_glyph_is_not_contained(tmp_path):
    chars = sample_chars()
    empty, boxed, absent = "丁", "七", "万"
    path = build_font(
        str(tmp_path / "f.ttf"),
        "Cover Test",
        chars=[c for c in chars if c not in (empty, boxed)],
        empty=[empty],
        boxed=[boxed],
    )
    src = typefaces.GlyphSource(typefaces.faces_in(path)[0])
    assert ord(empty) in src.cmap and ord(boxed) in src.cmap and ord(absent) not in src.cmap
    assert src.contains(chars[0]) and src.mask(chars[0], 32).max() >= typefaces.INK_LEVEL
    assert not src.contains(empty) and not src.contains(boxed) and not src.contains(absent)
    assert typefaces.coverage(src, [chars[0], empty, boxed, absent]) == {chars[0]}


@pytest.mark.skipif(not os.path.exists(REAL_FONTS["microhei"]), reason=INSTALL_HINT)
def test_a_real_face_lacks_what_its_cmap_lacks():
    src = typefaces.GlyphSource(typefaces.faces_in(REAL_FONTS["microhei"])[0])
    level1 = fonts.gb2312_level1()
    assert len(typefaces.coverage(src, level1)) == len(level1)  # a full GB2312 font
    assert not src.contains("\U0002a6d6")  # Extension B: not in the font


# --- styles and families --------------------------------------------------------------------
def test_twins_are_one_style_and_weights_one_family(tmp_path):
    f = font_set(tmp_path)
    cfg, plan, _ = _plan(f.values(), unseen_faces=0.4)
    by_file = {os.path.basename(face.path): i for i, face in enumerate(plan.faces)}
    style_of = {name: next(s for s, st in enumerate(plan.styles) if by_file[name] in st.faces) for name in by_file}
    assert style_of["synth-cn.ttf"] == style_of["synth-tw.ttf"]  # region variants: one style
    assert style_of["synth-bold.ttf"] != style_of["synth-cn.ttf"]  # another weight: another style
    assert style_of["other.ttf"] not in (style_of["synth-cn.ttf"], style_of["synth-bold.ttf"])
    family = {n: plan.styles[s].family for n, s in style_of.items()}
    assert family["synth-bold.ttf"] == family["synth-cn.ttf"] != family["other.ttf"]
    assert len(plan.styles) == 3
    # the unseen styles are whole families: the bold weight never sits apart from its regular
    unseen = {plan.styles[s].family for s in plan.unseen_styles}
    seen = {plan.styles[s].family for s in plan.train_styles}
    assert unseen and seen and not unseen & seen


@pytest.mark.skipif(not all(os.path.exists(p) for p in REAL_FONTS.values()), reason=INSTALL_HINT)
def test_real_regional_and_derived_variants_are_twins_and_distinct_designs_are_not():
    faces = [f for p in REAL_FONTS.values() for f in typefaces.faces_in(p)]
    sources = [typefaces.GlyphSource(f) for f in faces]
    probes = fonts.gb2312_level1()[::120]
    covers = [typefaces.coverage(s, probes) for s in sources]
    groups = [sorted(faces[i].label for i in g) for g in typefaces.twin_groups(sources, covers, probes)]
    ukai = sorted(f.label for f in faces if "UKai" in f.label)
    hei = sorted(f.label for f in faces if "Micro Hei" in f.label or "Droid" in f.label)
    assert sorted(groups) == sorted([ukai, hei])  # UKai CN/HK/TW/TW MBE; Micro Hei, its Mono, Droid


# --- the plan -------------------------------------------------------------------------------
def test_default_min_faces_lowers_to_the_styles_at_hand_and_says_so(tmp_path):
    f = font_set(tmp_path)
    _, plan, _ = _plan(f.values())
    assert plan.min_faces == 3 and any("lowered" in n for n in plan.notes)
    with pytest.raises(typefaces.FontError, match="--min-faces 4 is larger than the number of distinct styles"):
        _plan(f.values(), min_faces=4)


def test_classes_need_min_faces_styles(tmp_path):
    chars = sample_chars()
    d = tmp_path
    fs = [
        build_font(str(d / "a.ttf"), "A", seed=1, chars=chars),
        build_font(str(d / "b.ttf"), "B", seed=2, chars=chars[:-5]),
        build_font(str(d / "c.ttf"), "C", seed=3, chars=chars[:-5]),
    ]
    _, plan, _ = _plan(fs, min_faces=3)
    assert set(plan.classes) | set(plan.unseen_chars) == set(chars[:-5])
    _, plan, _ = _plan(fs, min_faces=1)
    kept = set(plan.classes) | set(plan.unseen_chars)
    assert kept >= set(chars[:-5])
    assert kept == set(chars) or any("drawn only by unseen styles" in n for n in plan.notes)


# --- writing: splits, determinism, formats ----------------------------------------------------
@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fontsdata")
    f = font_set(tmp)
    cfg, plan, _ = _plan(f.values(), unseen_faces=0.4, unseen_classes=0.25)
    fonts_data.write_fonts(str(tmp / "a"), cfg, plan, processes=2)
    fonts_data.write_fonts(str(tmp / "b"), cfg, plan, processes=1)
    return tmp, cfg, plan


def test_no_unseen_character_or_face_leaks_into_training(written):
    tmp, cfg, plan = written
    unseen_faces = {plan.faces[f].key for s in plan.unseen_styles for f in plan.styles[s].faces}
    train = _records(str(tmp / "a"))
    assert len(train) == len(fonts.train_samples(plan, cfg)) > 0
    for label, source in train:
        _, face, code, _ = source.split(":")
        assert face not in unseen_faces
        assert chr(int(code[2:], 16)) == plan.classes[label] and plan.classes[label] not in plan.unseen_chars
    for label, source in _records(str(tmp / "a" / fonts.CLOSED_DIR)):
        _, face, code, _ = source.split(":")
        assert face in unseen_faces and chr(int(code[2:], 16)) == plan.classes[label]
    for name, styles in ((fonts.SEEN_BIN, plan.train_styles), (fonts.UNSEEN_BIN, plan.unseen_styles)):
        samples, same = fonts.pair_samples(plan, cfg, styles, 1 if name == fonts.SEEN_BIN else 2)
        assert {s.ch for s in samples} <= set(plan.unseen_chars)
        faces = {plan.faces[s.face].key for s in samples}
        assert (faces <= unseen_faces) == (name == fonts.UNSEEN_BIN) and faces
        assert sum(same) == len(same) // 2
        for i in range(0, len(samples), 2):
            assert (samples[i].ch == samples[i + 1].ch) == same[i // 2]


def test_same_seed_and_fonts_give_the_same_bytes(written):
    tmp, cfg, plan = written
    names = sorted(p for p in os.listdir(tmp / "a") if not p.startswith("."))
    for name in names:
        if os.path.isfile(tmp / "a" / name) and name != fonts.DESCRIPTION:
            assert (tmp / "a" / name).read_bytes() == (tmp / "b" / name).read_bytes(), name
    other = fonts.FontsConfig(**{**cfg.__dict__, "seed": 1})
    assert fonts.train_samples(plan, other)[0].seed != fonts.train_samples(plan, cfg)[0].seed


def test_bins_load_for_eval_and_the_description_traces_records(written):
    tmp, cfg, plan = written
    for name in (fonts.SEEN_BIN, fonts.UNSEEN_BIN):
        images, same = verification.load_bin(str(tmp / "a" / name), (32, 32))
        assert images.shape == (2 * cfg.pairs, 32, 32, 3) and same.sum() == cfg.pairs // 2
        assert -1.0 <= images.min() < images.max() <= 1.0
    images, labels = verification.load_labelled(str(tmp / "a" / fonts.CLOSED_DIR), (32, 32))
    assert len(images) == len(labels) == len(fonts.closed_samples(plan, cfg)) > 0
    import json

    desc = json.loads((tmp / "a" / fonts.DESCRIPTION).read_text())
    assert desc["classes"] == "".join(plan.classes) and desc["counts"]["train"] == len(_records(str(tmp / "a")))
    with open(tmp / "a" / fonts.SEEN_BIN, "rb") as f:
        assert isinstance(pickle.load(f), tuple)


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    f = font_set(tmp_path)
    cfg, plan, _ = _plan(f.values())
    monkeypatch.setattr(fonts, "pair_samples", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        fonts_data.write_fonts(str(tmp_path / "out"), cfg, plan)
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".out", "out"))]


# --- the command ----------------------------------------------------------------------------
def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_dataset(tmp_path, capsys):
    f = font_set(tmp_path)
    code, out, err = _run(
        capsys,
        "data",
        "fonts",
        str(tmp_path / "out"),
        "--fonts",
        *f.values(),
        "--size",
        "32",
        "--per-style",
        "1",
        "--pairs",
        "40",
        "--shards",
        "2",
        "--processes",
        "1",
    )
    assert code == 0, err
    assert "min-faces lowered" in out and "wrote" in out
    m = schema.Manifest.load(str(tmp_path / "out" / "manifest.json"))
    assert m.num_classes > 0 and m.verification == [fonts.SEEN_BIN, fonts.UNSEEN_BIN]


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_a_font", "not a font file that can be parsed"),
        ("no_cjk", "draws none of the"),
        ("min_faces", "--min-faces 9 is larger than the number of distinct styles (3)"),
        ("exists", "already exists"),
        ("one_family", "one family"),
    ],
)
def test_bad_input_exits_1_naming_it(tmp_path, capsys, case, message):
    f = font_set(tmp_path)
    files, extra, out = list(f.values()), [], tmp_path / "out"
    if case == "not_a_font":
        (tmp_path / "junk.ttf").write_bytes(b"not a font at all")
        files.append(str(tmp_path / "junk.ttf"))
    if case == "no_cjk":
        files.append(build_font(str(tmp_path / "latin.ttf"), "Latin", chars=list("abc")))
    if case == "min_faces":
        extra = ["--min-faces", "9"]
    if case == "exists":
        out.mkdir()
    if case == "one_family":
        files = [f["cn"], f["bold"]]
    code, _, err = _run(capsys, "data", "fonts", str(out), "--fonts", *files, *extra, "--pairs", "40")
    assert code == 1 and err.startswith("pfc data: error: ") and message in err, err
    if case in ("not_a_font", "no_cjk"):
        assert files[-1] in err
