"""Typefaces as identities' "cameras": finding faces, their CJK coverage, and styles.

A *face* is one font of a file (every face of a `.ttc`/`.otc` collection, every weight file).
A *style* is a group of faces that draw the same glyphs: a collection's regional variants
(AR PL UKai CN/HK/TW/TW MBE), Mono variants, and derived fonts (WenQuanYi Micro Hei from Droid
Sans Fallback) render nearly pixel for pixel alike, so they count as one style. A *family* is
the unit an open-set split moves whole: the styles that share a family name once weight,
region and width words are removed (every weight of Noto Sans CJK), joined with their twins.

Coverage: a face contains a character when its cmap maps it to a glyph other than `.notdef`
and that glyph renders with ink and differs from the face's missing-glyph box (some fonts map
characters they do not draw to a box or to an empty outline).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
PROBE_SIZE = 32  # pixels: coverage and twin checks
# Two faces are twins (one style) when at least TWIN_SHARE of the probe characters both draw come
# out the same: ink IoU >= SAME_IOU once each glyph is scaled to the same box (so a font that
# differs only in its em scale or advance widths matches). Measured on Debian's CJK fonts
# (docs/data.md): distinct weights of one family share at most 0.03 of their probes; regional
# variants 0.5 (Noto CJK JP / SC) to 1.0 (AR PL UKai CN / TW); derived fonts 0.44-1.0 (IPAex /
# IPA Gothic, VL Gothic / VL PGothic, Droid Sans Fallback / WenQuanYi Micro Hei).
SAME_IOU = 0.95
TWIN_SHARE = 0.3
INK_LEVEL = 128  # a pixel is ink at or above this coverage (0..255)
_NOTDEF_PROBES = (0x10FFFD, 0xFFFF, 0xE000, 0xF8FF)  # code points fonts rarely map


class FontError(ValueError):
    """A font file or face that cannot be used: the message names the file (and face)."""


_FAMILY_WORDS = re.compile(
    r"\b(CN|HK|TW|MBE|JP|KR|SC|TC|Mono|Sharp|Thin|ExtraLight|Light|DemiLight|Regular|Book|Medium|"
    r"SemiBold|DemiBold|Bold|ExtraBold|Black|Heavy)\b|\s+-\s+\w+$"
)


@dataclasses.dataclass(frozen=True)
class Face:
    """One face of a font file. `key` ("file.ttc#2") names it in manifests and messages."""

    path: str
    index: int
    family: str
    subfamily: str

    @property
    def key(self) -> str:
        return f"{os.path.basename(self.path)}#{self.index}"

    @property
    def label(self) -> str:
        return f"{self.family} {self.subfamily}"

    @property
    def family_key(self) -> str:
        """The family name without weight, region and width words: 'Noto Sans CJK'."""
        return " ".join(_FAMILY_WORDS.sub(" ", self.family).split()).lower()


def _open_fonts(path: str) -> list:
    """fontTools fonts of a file (one per face), lazily parsed; FontError naming the file."""
    from fontTools.ttLib import TTCollection, TTFont, TTLibError

    try:
        if path.lower().endswith((".ttc", ".otc")):
            return list(TTCollection(path, lazy=True).fonts)
        return [TTFont(path, lazy=True)]
    except (TTLibError, OSError, AssertionError, ValueError, KeyError) as e:
        raise FontError(f"{path}: not a font file that can be parsed ({type(e).__name__}: {e})") from None


def _names(font) -> tuple[str, str]:
    name = font["name"]
    family = name.getDebugName(16) or name.getDebugName(1) or "?"
    return family, name.getDebugName(17) or name.getDebugName(2) or "?"


def faces_in(path: str) -> list[Face]:
    """Every face of one font file."""
    return [Face(path, i, *_names(font)) for i, font in enumerate(_open_fonts(path))]


def font_files(dirs: Iterable[str]) -> list[str]:
    """Font files under `dirs` (recursively), each real file once, sorted."""
    found = set()
    for d in dirs:
        for root, _, files in os.walk(d):
            found.update(os.path.realpath(os.path.join(root, f)) for f in files if f.lower().endswith(FONT_SUFFIXES))
    return sorted(p for p in found if os.path.isfile(p))


def cmap_of(face: Face) -> dict[int, str]:
    """code point -> glyph name of the face's best Unicode cmap."""
    font = _open_fonts(face.path)[face.index]
    try:
        return dict(font.getBestCmap() or {})
    except Exception as e:  # a damaged cmap table raises many kinds
        raise FontError(f"{face.path}: face {face.index} has an unreadable cmap ({e})") from None


class GlyphSource:
    """Renders one face's glyphs as ink masks: `mask(ch, size) -> uint8 [size, size]`, centred."""

    def __init__(self, face: Face, cmap: dict[int, str] | None = None):
        self.face = face
        self._cmap = cmap
        self._fonts: dict[int, object] = {}
        self._probes: dict[tuple[str, int], np.ndarray] = {}

    @property
    def cmap(self) -> dict[int, str]:
        if self._cmap is None:
            self._cmap = cmap_of(self.face)
        return self._cmap

    def font(self, em: int):
        from PIL import ImageFont

        if em not in self._fonts:
            try:
                self._fonts[em] = ImageFont.truetype(
                    self.face.path, em, index=self.face.index, layout_engine=ImageFont.Layout.BASIC
                )
            except OSError as e:
                raise FontError(f"{self.face.path}: face {self.face.index} cannot be rendered ({e})") from None
        return self._fonts[em]

    def ink(self, ch: str, em: int) -> np.ndarray:
        """The glyph's ink, uint8 [h, w] cropped to its bounding box ([0, 0] when empty)."""
        from PIL import Image

        mask = self.font(em).getmask(ch, mode="L")
        img = Image.frombytes("L", mask.size, bytes(mask)) if mask.size[0] * mask.size[1] else None
        if img is None or img.getbbox() is None:
            return np.zeros((0, 0), np.uint8)
        return np.asarray(img.crop(img.getbbox()))

    def mask(self, ch: str, size: int, em_fraction: float = 0.8) -> np.ndarray:
        """[size, size] uint8: the glyph at an em of em_fraction * size, centred by its ink box."""
        return centre(self.ink(ch, max(4, round(size * em_fraction))), size)

    def probe(self, ch: str, size: int) -> np.ndarray:
        """[size, size] uint8: the glyph scaled to fill 0.8 of the side, centred (cached)."""
        if (ch, size) not in self._probes:
            # rendered at 4x and averaged down: sub-pixel bearings (proportional variants) vanish
            self._probes[ch, size] = centre(fit(self.ink(ch, 4 * size), round(0.8 * size)), size)
        return self._probes[ch, size]

    def notdef(self, size: int) -> np.ndarray:
        """The missing-glyph box as drawn for a code point the cmap lacks."""
        missing = next((c for c in _NOTDEF_PROBES if c not in self.cmap), None)
        if missing is None:
            return np.zeros((size, size), np.uint8)
        if ("notdef", size) not in self._probes:
            self._probes["notdef", size] = self.mask(chr(missing), size)
        return self._probes["notdef", size]

    def contains(self, ch: str) -> bool:
        """Mapped, not to .notdef, with ink, and not drawn as the missing-glyph box."""
        glyph = self.cmap.get(ord(ch))
        if glyph is None or glyph == ".notdef":
            return False
        m = self.mask(ch, PROBE_SIZE)
        return m.max() >= INK_LEVEL and not np.array_equal(m >= INK_LEVEL, self.notdef(PROBE_SIZE) >= INK_LEVEL)


def centre(ink: np.ndarray, size: int) -> np.ndarray:
    """Place an ink crop [h, w] in the middle of a [size, size] canvas (cropping what overflows)."""
    out = np.zeros((size, size), np.uint8)
    h, w = ink.shape
    if not h or not w:
        return out
    top, left = (size - h) // 2, (size - w) // 2
    src = ink[max(0, -top) : h - max(0, top + h - size), max(0, -left) : w - max(0, left + w - size)]
    out[max(0, top) : max(0, top) + src.shape[0], max(0, left) : max(0, left) + src.shape[1]] = src
    return out


def fit(ink: np.ndarray, side: int) -> np.ndarray:
    """Scale an ink crop [h, w] so its longer side is `side` pixels (aspect kept)."""
    from PIL import Image

    h, w = ink.shape
    if not h or not w:
        return ink
    k = side / max(h, w)
    return np.asarray(Image.fromarray(ink).resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BOX))


def coverage(source: GlyphSource, chars: Sequence[str]) -> frozenset[str]:
    """The characters of `chars` the face really draws."""
    return frozenset(c for c in chars if source.contains(c))


def ink_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks' ink (1.0 for two empty masks)."""
    a, b = a >= INK_LEVEL, b >= INK_LEVEL
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def similarity(x: GlyphSource, y: GlyphSource, probes: Sequence[str]) -> float:
    """Share of the probe characters (both faces draw them) that the two faces draw the same."""
    same = [ink_iou(x.probe(c, PROBE_SIZE * 2), y.probe(c, PROBE_SIZE * 2)) >= SAME_IOU for c in probes]
    return float(np.mean(same)) if same else 0.0


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[max(self.find(i), self.find(j))] = min(self.find(i), self.find(j))

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return sorted(out.values())


def twin_groups(
    sources: Sequence[GlyphSource],
    covers: Sequence[frozenset[str]],
    probes: Sequence[str],
    threshold: float = TWIN_SHARE,
) -> list[list[int]]:
    """Indices of `sources` grouped into styles: faces that draw enough probes the same."""
    uf = _UnionFind(len(sources))
    for i in range(len(sources)):
        for j in range(i + 1, len(sources)):
            common = [c for c in probes if c in covers[i] and c in covers[j]]
            if uf.find(i) != uf.find(j) and similarity(sources[i], sources[j], common) >= threshold:
                uf.join(i, j)
    return uf.groups()


def family_groups(faces: Sequence[Face], styles: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of `styles` grouped into families: styles sharing a face's family key."""
    uf = _UnionFind(len(styles))
    first: dict[str, int] = {}
    for s, members in enumerate(styles):
        for f in members:
            uf.join(s, first.setdefault(faces[f].family_key, s))
    return uf.groups()
