"""Small TrueType fonts built on the fly (fontTools), so font tests need no installed typeface.

A glyph is a few bars drawn from the code point and a design seed, `thickness` font units thick:
two fonts with the same seed and thickness draw the same glyphs (twins); another thickness is
another weight of the design; another seed another design.
"""

from __future__ import annotations

import random

from pipelines import fonts

REAL_FONTS = {
    "ukai": "/usr/share/fonts/truetype/arphic/ukai.ttc",
    "microhei": "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "droid": "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
}
INSTALL_HINT = "run `make fonts-test` (as root: Debian's fonts-arphic-ukai, fonts-wqy-microhei)"


def sample_chars(n: int = 40) -> list[str]:
    """The twin check's probes plus the first n GB2312 level-1 characters."""
    level1 = fonts.gb2312_level1()
    return sorted(set(level1[:n]) | set(level1[::120]), key=level1.index)


def _rect(pen, x0: int, y0: int, x1: int, y1: int) -> None:
    pen.moveTo((x0, y0))
    pen.lineTo((x0, y1))
    pen.lineTo((x1, y1))
    pen.lineTo((x1, y0))
    pen.closePath()


def _bars(pen, code: int, seed: int, thickness: int) -> None:
    rng = random.Random(code * 7919 + seed)
    for _ in range(rng.randint(3, 5)):
        a, b = sorted(rng.sample(range(100, 900, 20), 2))
        at = rng.randrange(100, 900 - thickness, 10)
        if rng.random() < 0.5:
            _rect(pen, a, at, b, at + thickness)
        else:
            _rect(pen, at, a, at + thickness, b)


def build_font(
    path: str,
    family: str,
    style: str = "Regular",
    *,
    seed: int = 0,
    thickness: int = 60,
    chars=None,
    empty=(),
    boxed=(),
) -> str:
    """Write a TTF drawing `chars`; `empty` map to an outline-less glyph, `boxed` to a copy of .notdef."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    chars = list(sample_chars() if chars is None else chars)
    names = [".notdef", "empty", "box"] + [f"u{ord(c):04X}" for c in chars]
    glyphs = {}
    for name in names:
        pen = TTGlyphPen(None)
        if name in (".notdef", "box"):
            _rect(pen, 100, 0, 700, 800)
        elif name != "empty":
            _bars(pen, int(name[1:], 16), seed, thickness)
        glyphs[name] = pen.glyph()
    cmap = {ord(c): f"u{ord(c):04X}" for c in chars}
    cmap.update({ord(c): "empty" for c in empty})
    cmap.update({ord(c): "box" for c in boxed})
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap(cmap)
    fb.setupGlyf(glyphs)
    fb.setupHorizontalMetrics({n: (1000, 0) for n in names})
    fb.setupHorizontalHeader(ascent=880, descent=-120)
    fb.setupNameTable({"familyName": family, "styleName": style})
    fb.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    fb.setupPost()
    fb.save(path)
    return path


def font_set(tmp_path) -> dict[str, str]:
    """Four fonts: a design in two regions (twins), its bold weight, and a second design."""
    d = tmp_path / "fonts"
    d.mkdir(exist_ok=True)
    return {
        "cn": build_font(str(d / "synth-cn.ttf"), "Synth Sans CN", seed=1),
        "tw": build_font(str(d / "synth-tw.ttf"), "Synth Sans TW", seed=1),
        "bold": build_font(str(d / "synth-bold.ttf"), "Synth Sans", "Bold", seed=1, thickness=140),
        "other": build_font(str(d / "other.ttf"), "Other Serif", seed=2),
    }
