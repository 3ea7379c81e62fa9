"""Real many-class data: CJK characters drawn by real typefaces (`pfc data fonts`), open-set.

A class is a character; its "photos" are its glyphs in 20-40 typeface styles, each rendered with
seeded augmentation. As with faces, the model learns from some identities and is verified on
pairs of identities it never saw, here also drawn in typefaces it never saw:

    OUT/train-*.tfrecord, manifest.json   training characters x training styles x per_style
    OUT/verification_seen_faces.bin       (a) unseen characters, drawn in training styles
    OUT/verification_unseen_faces.bin     (b) unseen characters, drawn in unseen styles
    OUT/closed/                           training characters in unseen styles, with their labels
    OUT/fonts.json                        faces, styles, families, the splits, label -> character

The plan (which faces, styles, classes and splits) is a function of the font files and the seed;
every image of a sample is a function of the plan and the sample's numbers, so the same seed and
font files give the same bytes. docs/data.md describes the choices and their defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from pipelines import glyph_images, typefaces
from pipelines.typefaces import Face, FontError

DEFAULT_MIN_FACES = 10
MIN_COVERAGE = 0.05  # found (not named) faces drawing less of the candidates are left out
CLASS_SETS = ("gb2312-1", "all")
SEEN_BIN = "verification_seen_faces.bin"
UNSEEN_BIN = "verification_unseen_faces.bin"
CLOSED_DIR = "closed"
DESCRIPTION = "fonts.json"
_PROBE_STRIDE = 120  # every 120th GB2312 level-1 character: 32 probes for the twin check


def gb2312_level1() -> list[str]:
    """The 3,755 characters of GB2312 level 1 (rows 16-55), in GB2312 order."""
    return [
        bytes([row, cell]).decode("gb2312")
        for row in range(0xB0, 0xD8)
        for cell in range(0xA1, 0xFF)
        if not (row == 0xD7 and cell > 0xF9)
    ]


def candidates(class_set: str) -> list[str]:
    """GB2312 level 1, or every CJK Unified Ideograph of the BMP (with Extension A)."""
    if class_set == "gb2312-1":
        return gb2312_level1()
    if class_set == "all":
        return [chr(c) for c in [*range(0x4E00, 0xA000), *range(0x3400, 0x4DC0)]]
    raise FontError(f"--classes must be one of {', '.join(CLASS_SETS)}, got {class_set!r}")


@dataclasses.dataclass(frozen=True)
class FontsConfig:
    """What `pfc data fonts` makes; docs/data.md gives the reasons for the defaults."""

    size: int = 112
    per_style: int = 4  # training samples per (character, style)
    min_faces: int | None = None  # styles a character needs; None: DEFAULT_MIN_FACES or fewer
    classes: str = "gb2312-1"
    unseen_classes: float = 0.1  # share of the characters held out of training
    unseen_faces: float = 0.2  # share of the styles held out (whole families)
    pairs: int = 6000  # per verification set, half genuine
    closed_per_style: int = 1  # closed-set samples per (training character, unseen style)
    shards: int = 8
    seed: int = 0
    jpeg_quality: int = 90
    max_classes: int | None = None  # keep only the first N classes (small runs, the demo)
    max_faces: int | None = None  # keep only the first N styles in name order (the demo)

    def validate(self) -> FontsConfig:
        for name in ("per_style", "pairs", "shards", "closed_per_style"):
            if getattr(self, name) < 1:
                raise FontError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.size < 16:
            raise FontError(f"--size must be >= 16 pixels, got {self.size}")
        if self.pairs % 20:
            raise FontError(f"--pairs must be a multiple of 20 (10 folds of genuine and impostor), got {self.pairs}")
        for name in ("unseen_classes", "unseen_faces"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise FontError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(self, name)}")
        if self.min_faces is not None and self.min_faces < 1:
            raise FontError(f"--min-faces must be >= 1, got {self.min_faces}")
        candidates(self.classes)
        return self


@dataclasses.dataclass(frozen=True)
class Style:
    """Faces drawing near-identical glyphs; `covers`: the characters at least one of them draws."""

    faces: tuple[int, ...]
    family: int
    covers: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything but the pixels: faces, styles, classes (label order) and the two splits."""

    faces: tuple[Face, ...]
    face_covers: tuple[frozenset[str], ...]
    styles: tuple[Style, ...]
    min_faces: int
    classes: tuple[str, ...]  # training characters; label = index
    unseen_chars: tuple[str, ...]
    train_styles: tuple[int, ...]
    unseen_styles: tuple[int, ...]
    notes: tuple[str, ...]

    def faces_for(self, style: int, ch: str) -> list[int]:
        return [f for f in self.styles[style].faces if ch in self.face_covers[f]]

    def styles_with(self, ch: str, among: Sequence[int]) -> list[int]:
        return [s for s in among if ch in self.styles[s].covers]


# ------------------------------------------------------------------------------------------
# faces and their coverage
# ------------------------------------------------------------------------------------------
def load_faces(files: Sequence[str] | None, dirs: Sequence[str]) -> tuple[list[Face], bool]:
    """(faces, explicit): the faces of `files`, or of every font file under `dirs`."""
    if files:
        return [f for p in files for f in typefaces.faces_in(_existing(p))], True
    paths = typefaces.font_files(dirs)
    if not paths:
        raise FontError(f"no font files under {', '.join(dirs)}: run `make fonts` or pass --fonts FILE ...")
    faces = []
    for p in paths:
        try:
            faces.extend(typefaces.faces_in(p))
        except FontError:
            continue  # a system directory may hold files that are not fonts we can read
    return faces, False


def _existing(path: str) -> str:
    import os

    if not os.path.isfile(path):
        raise FontError(f"{path}: no such font file")
    return path


def face_coverage(faces: Sequence[Face], chars: Sequence[str], explicit: bool):
    """(faces with CJK glyphs, their sources, their coverage).

    A named face that draws no candidate is an error; a found one drawing under MIN_COVERAGE of
    them (an extension-block font such as HanaMinB, a Latin font) is left out.
    """
    kept, sources, covers = [], [], []
    for face in faces:
        src = typefaces.GlyphSource(face)
        cover = typefaces.coverage(src, [c for c in chars if ord(c) in src.cmap])
        if len(cover) < (1 if explicit else MIN_COVERAGE * len(chars)):
            if explicit:
                raise FontError(
                    f"{face.path}: face {face.index} ({face.label}) draws none of the "
                    f"{len(chars)} candidate CJK characters"
                )
            continue
        kept.append(face)
        sources.append(src)
        covers.append(cover)
    if not kept:
        raise FontError("no face draws any candidate CJK character: run `make fonts` or pass --fonts")
    return kept, sources, covers


# ------------------------------------------------------------------------------------------
# the plan: styles, classes, splits
# ------------------------------------------------------------------------------------------
def make_styles(faces, sources, covers) -> tuple[Style, ...]:
    groups = typefaces.twin_groups(sources, covers, gb2312_level1()[::_PROBE_STRIDE])
    families = typefaces.family_groups(faces, groups)
    family_of = {s: fam for fam, members in enumerate(families) for s in members}
    return tuple(
        Style(tuple(g), family_of[i], frozenset().union(*(covers[f] for f in g))) for i, g in enumerate(groups)
    )


def effective_min_faces(requested: int | None, num_styles: int) -> tuple[int, str | None]:
    """The default lowers to the styles at hand (and says so); an explicit M must fit."""
    if requested is None:
        if num_styles < DEFAULT_MIN_FACES:
            return num_styles, (
                f"only {num_styles} styles among the chosen faces: --min-faces lowered "
                f"from its default {DEFAULT_MIN_FACES} to {num_styles}"
            )
        return DEFAULT_MIN_FACES, None
    if requested > num_styles:
        raise FontError(
            f"--min-faces {requested} is larger than the number of distinct styles "
            f"({num_styles}) among the chosen faces"
        )
    return requested, None


def choose_unseen_styles(styles: Sequence[Style], share: float, seed: int) -> list[int]:
    """Whole families, in a seeded order, until about `share` of the styles are unseen."""
    families = sorted({s.family for s in styles})
    if len(families) < 2:
        raise FontError(
            "the chosen faces form one family: an open-set split needs at least two (pass faces of another typeface)"
        )
    sizes = {fam: sum(1 for s in styles if s.family == fam) for fam in families}
    target = max(1, round(share * len(styles)))
    unseen: list[int] = []
    for fam in np.random.default_rng([seed, 11]).permutation(families):
        if len(unseen) >= target:
            break
        if not unseen or len(unseen) + sizes[fam] <= target:
            unseen.extend(i for i, s in enumerate(styles) if s.family == fam)
    if len(unseen) == len(styles):
        unseen = [i for i, s in enumerate(styles) if s.family == styles[unseen[0]].family]
    return sorted(unseen)


def split_chars(chars: Sequence[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """(training, unseen) characters, each in candidate order; at least one of each."""
    if len(chars) < 2:
        raise FontError(f"{len(chars)} class(es): an open-set split needs at least two characters")
    n_unseen = min(len(chars) - 1, max(1, round(share * len(chars))))
    unseen = set(np.random.default_rng([seed, 12]).permutation(len(chars))[:n_unseen].tolist())
    return ([c for i, c in enumerate(chars) if i not in unseen], [c for i, c in enumerate(chars) if i in unseen])


def make_plan(cfg: FontsConfig, faces: Sequence[Face], sources, covers) -> Plan:
    styles = make_styles(faces, sources, covers)
    if cfg.max_faces is not None:
        styles = tuple(sorted(styles, key=lambda s: faces[s.faces[0]].label)[: cfg.max_faces])
    notes = []
    m, note = effective_min_faces(cfg.min_faces, len(styles))
    notes += [note] if note else []
    counts = {}
    for s in styles:
        for c in s.covers:
            counts[c] = counts.get(c, 0) + 1
    chars = [c for c in candidates(cfg.classes) if counts.get(c, 0) >= m][: cfg.max_classes]
    unseen_styles = choose_unseen_styles(styles, cfg.unseen_faces, cfg.seed)
    train_styles = [i for i in range(len(styles)) if i not in unseen_styles]
    train, unseen = split_chars(chars, cfg.unseen_classes, cfg.seed)
    without = [c for c in train if not any(c in styles[s].covers for s in train_styles)]
    if without:
        notes.append(f"{len(without)} characters drawn only by unseen styles left out of training")
        train = [c for c in train if c not in without]
    return Plan(
        tuple(faces),
        tuple(covers),
        styles,
        m,
        tuple(train),
        tuple(unseen),
        tuple(train_styles),
        tuple(unseen_styles),
        tuple(notes),
    )


def build_plan(
    cfg: FontsConfig, files: Sequence[str] | None = None, dirs: Sequence[str] = typefaces.DEFAULT_FONT_DIRS
) -> tuple[Plan, list]:
    """(plan, glyph sources by face index) from font files or the system's font directories."""
    cfg.validate()
    faces, explicit = load_faces(files, dirs)
    faces, sources, covers = face_coverage(faces, candidates(cfg.classes), explicit)
    return make_plan(cfg, faces, sources, covers), sources


# ------------------------------------------------------------------------------------------
# samples: what to render, as plain numbers (so worker processes can render them)
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sample:
    """One image to render: character, face, label (-1 outside training) and its seed words."""

    ch: str
    face: int
    label: int
    seed: tuple[int, ...]


def _labelled_samples(plan: Plan, styles: Sequence[int], k: int, seed: tuple[int, int]) -> list[Sample]:
    """Training characters x the `styles` drawing them x k, each style's faces in turn."""
    out = []
    for label, ch in enumerate(plan.classes):
        for s in plan.styles_with(ch, styles):
            faces = plan.faces_for(s, ch)
            out += [Sample(ch, faces[i % len(faces)], label, (*seed, ord(ch), s, i)) for i in range(k)]
    return out


def train_samples(plan: Plan, cfg: FontsConfig) -> list[Sample]:
    """Training characters x training styles drawing them x per_style."""
    return _labelled_samples(plan, plan.train_styles, cfg.per_style, (cfg.seed, 1))


def closed_samples(plan: Plan, cfg: FontsConfig) -> list[Sample]:
    """Training characters in unseen styles, with their training labels."""
    return _labelled_samples(plan, plan.unseen_styles, cfg.closed_per_style, (cfg.seed, 2))


def _pick_face(plan: Plan, rng, ch: str, style: int) -> int:
    faces = plan.faces_for(style, ch)
    return faces[int(rng.integers(len(faces)))]


def pair_samples(plan: Plan, cfg: FontsConfig, styles: Sequence[int], tag: int) -> tuple[list[Sample], list[bool]]:
    """LFW-like pairs of unseen characters in `styles`: 10 folds of genuine then impostor pairs.

    Genuine: one character in two different styles (the same style twice only when one style
    draws it); impostor: two different characters, each in a random style drawing it.
    """
    rng = np.random.default_rng([cfg.seed, 3, tag])
    chars = [c for c in plan.unseen_chars if plan.styles_with(c, styles)]
    if len(chars) < 2:
        raise FontError(
            f"fewer than two unseen characters are drawn by the styles of set {tag}: "
            "lower --min-faces or raise --unseen-classes"
        )
    samples, same, per_fold = [], [], cfg.pairs // 20

    def sample(ch: str, style: int, n: int) -> Sample:
        return Sample(ch, _pick_face(plan, rng, ch, style), -1, (cfg.seed, 4, tag, n))

    for _ in range(10):
        for genuine in (True, False):
            for _ in range(per_fold):
                a, b = (
                    (chars[int(rng.integers(len(chars)))],) * 2
                    if genuine
                    else [chars[i] for i in rng.choice(len(chars), 2, replace=False)]
                )
                sa = plan.styles_with(a, styles)
                sb = plan.styles_with(b, styles)
                s1 = sa[int(rng.integers(len(sa)))]
                rest = [s for s in sb if s != s1] if genuine and len(sb) > 1 else sb
                s2 = rest[int(rng.integers(len(rest)))]
                samples += [sample(a, s1, len(samples)), sample(b, s2, len(samples) + 1)]
                same.append(genuine)
    return samples, same


def render_sample(sources: Sequence[typefaces.GlyphSource], sample: Sample, size: int, quality: int) -> bytes:
    rng = np.random.default_rng(list(sample.seed))
    return glyph_images.encode_jpeg(glyph_images.render(sources[sample.face], sample.ch, size, rng), quality)


# ------------------------------------------------------------------------------------------
# rendering in worker processes
# ------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(faces: Sequence[Face], size: int, quality: int) -> None:
    _WORKER.update(sources=[typefaces.GlyphSource(f, cmap={}) for f in faces], size=size, quality=quality)


def _render_chunk(samples: Sequence[Sample]) -> list[bytes]:
    return [render_sample(_WORKER["sources"], s, _WORKER["size"], _WORKER["quality"]) for s in samples]


class Renderer:
    """Renders samples in order, in `processes` spawned workers (1: in this process)."""

    def __init__(self, plan: Plan, cfg: FontsConfig, processes: int):
        self.args = (plan.faces, cfg.size, cfg.jpeg_quality)
        self.processes = processes
        self._pool = None

    def __enter__(self) -> Renderer:
        if self.processes > 1:
            import multiprocessing

            self._pool = multiprocessing.get_context("spawn").Pool(
                self.processes, initializer=_init_worker, initargs=self.args
            )
        else:
            _init_worker(*self.args)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def images(self, samples: Sequence[Sample], chunk: int = 256) -> Iterator[bytes]:
        chunks = [samples[i : i + chunk] for i in range(0, len(samples), chunk)]
        mapped = self._pool.imap(_render_chunk, chunks) if self._pool else map(_render_chunk, chunks)
        for images in mapped:
            yield from images


# ------------------------------------------------------------------------------------------
# the description written beside the data
# ------------------------------------------------------------------------------------------
def describe(plan: Plan, cfg: FontsConfig) -> dict:
    """fonts.json: what was rendered from what, so a record's face and character can be traced."""

    def style(i: int) -> dict:
        s = plan.styles[i]
        return {
            "faces": [plan.faces[f].key for f in s.faces],
            "family": s.family,
            "name": plan.faces[s.faces[0]].label,
            "characters": len(s.covers),
        }

    return {
        "config": dataclasses.asdict(cfg),
        "min_faces": plan.min_faces,
        "notes": list(plan.notes),
        "faces": [
            {"key": f.key, "path": f.path, "index": f.index, "family": f.family, "subfamily": f.subfamily}
            for f in plan.faces
        ],
        "styles": [style(i) for i in range(len(plan.styles))],
        "train_styles": list(plan.train_styles),
        "unseen_styles": list(plan.unseen_styles),
        "classes": "".join(plan.classes),
        "unseen_characters": "".join(plan.unseen_chars),
    }


def source_text(plan: Plan, sample: Sample) -> str:
    """A record's image/source: 'fonts:<face key>:U+XXXX:<seed words>'."""
    return f"fonts:{plan.faces[sample.face].key}:U+{ord(sample.ch):04X}:{'.'.join(map(str, sample.seed[1:]))}"


def summary(plan: Plan) -> str:
    return (
        f"{len(plan.faces)} faces in {len(plan.styles)} styles "
        f"({len(plan.train_styles)} for training, {len(plan.unseen_styles)} unseen), "
        f"{len(plan.classes)} training characters, {len(plan.unseen_chars)} unseen, "
        f"min faces {plan.min_faces}"
    )
