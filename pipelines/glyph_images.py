"""Glyph images: a character of one face rendered as an RGB sample with seeded augmentation.

Every sample is a function of (font file, face, character, size, augmentation draw): the draw
comes from a numpy Generator seeded by the caller, so the same seed and font files give the same
pixels and, through the same JPEG encoder, the same bytes. Imports no TensorFlow, so the dataset
writer's worker processes start quickly.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from pipelines import typefaces


@dataclasses.dataclass(frozen=True)
class Augment:
    """Ranges of the per-sample augmentation (fractions are of the image side)."""

    rotate_deg: float = 4.0  # uniform in [-r, r]
    shear: float = 0.08  # horizontal shear factor in [-s, s]
    scale: tuple[float, float] = (0.85, 1.05)  # em size relative to 0.8 x side
    shift: float = 0.05  # centre offset, each axis
    stroke_p: float = 0.5  # probability of thickening or thinning strokes by ~1/112 side
    blur: float = 0.01  # Gaussian radius up to blur x side
    noise: float = 8.0  # pixel noise std up to this (0..255 scale)
    ink: tuple[float, float] = (0.0, 90.0)  # ink grey level
    paper: tuple[float, float] = (165.0, 255.0)  # background grey level
    tint: float = 20.0  # per-channel colour offset up to this

    @classmethod
    def none(cls) -> Augment:
        return cls(0.0, 0.0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, (0.0, 0.0), (255.0, 255.0), 0.0)


def _affine(ink, size: int, aug: Augment, rng: np.random.Generator):
    """Ink [h, w] -> PIL 'L' [size, size]: centred, shifted, rotated and sheared about the centre."""
    from PIL import Image

    canvas = Image.fromarray(typefaces.centre(ink, size))
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    shear = rng.uniform(-aug.shear, aug.shear)
    dx, dy = rng.uniform(-aug.shift, aug.shift, 2) * size
    c, s, mid = np.cos(angle), np.sin(angle), size / 2
    # PIL maps output to input coordinates: the inverse of rotate(shear(p)) + shift.
    a, b, d, e = c, s + shear * c, -s, c - shear * s
    tx = mid - a * (mid + dx) - b * (mid + dy)
    ty = mid - d * (mid + dx) - e * (mid + dy)
    return canvas.transform(
        (size, size), Image.Transform.AFFINE, (a, b, tx, d, e, ty), resample=Image.Resampling.BILINEAR
    )


def _stroke(img, size: int, aug: Augment, rng: np.random.Generator):
    """Thicker or thinner strokes: a 3x3 max or min filter, at sizes where one pixel is subtle."""
    from PIL import ImageFilter

    u = rng.uniform()
    if size < 48 or u >= aug.stroke_p:
        return img
    return img.filter(ImageFilter.MaxFilter(3) if u < aug.stroke_p / 2 else ImageFilter.MinFilter(3))


def _paint(mask: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Ink coverage [S, S] uint8 -> RGB uint8 [S, S, 3]: ink and paper levels, tint, noise."""
    ink = rng.uniform(*aug.ink) + rng.uniform(-aug.tint, aug.tint, 3)
    paper = rng.uniform(*aug.paper) + rng.uniform(-aug.tint, aug.tint, 3)
    alpha = mask.astype(np.float32)[..., None] / 255.0
    img = paper * (1 - alpha) + ink * alpha
    img = img + rng.normal(0.0, rng.uniform(0.0, aug.noise), img.shape)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render(
    source: typefaces.GlyphSource, ch: str, size: int, rng: np.random.Generator, aug: Augment = Augment()
) -> np.ndarray:
    """One sample of `ch` in `source`'s face: uint8 [size, size, 3]."""
    from PIL import ImageFilter

    em = max(4, round(0.8 * size * rng.uniform(*aug.scale)))
    img = _stroke(_affine(source.ink(ch, em), size, aug, rng), size, aug, rng)
    radius = rng.uniform(0.0, aug.blur * size)
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    return _paint(np.asarray(img), aug, rng)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """RGB uint8 [H, W, 3] -> baseline JPEG bytes (4:2:0, no metadata: deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()
