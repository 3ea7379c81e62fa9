"""Synthetic face-like identities, learnable at 32x32 as at 112x112.

An identity is a smooth colour pattern: a base colour plus a few low-frequency 2-D waves
(1.5 to 4 cycles per image, random orientation, phase and per-channel amplitude), drawn from
(seed, identity). An image of it is a view: the pattern shifted, rotated and scaled a little,
with brightness/contrast jitter and pixel noise, drawn from (seed, identity, image). Patterns are
functions of continuous coordinates, so every size renders the same identities.

Views of one identity correlate, different identities hardly at all; the shifts and rotations
make raw pixels a weak metric (about 75 % verification accuracy at 32 and 112 pixels, measured),
so a model has something to learn. The verification set uses
identities the training set does not contain (numbers >= identities), as LFW does for real face
training: genuine pairs are two views of one held-out identity, impostor pairs views of two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from pipelines import storage, verification, writer

VERIFICATION_NAME = "verification.bin"
_WAVES = 5


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    identities: int
    images_per_identity: int
    size: int = 112
    seed: int = 0
    verification_pairs: int = 200  # genuine pairs; as many impostor pairs
    jpeg_quality: int = 90

    def validate(self) -> SynthConfig:
        for name in ("identities", "images_per_identity", "size", "verification_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        return self


def _identity_params(seed: int, identity: int) -> dict:
    rng = np.random.default_rng([seed, 1, identity])
    angle = rng.uniform(0, 2 * np.pi, _WAVES)
    freq = rng.uniform(1.5, 4.0, _WAVES)
    return {
        "base": rng.uniform(0.3, 0.7, 3),
        "k": np.stack([np.cos(angle), np.sin(angle)], 1) * freq[:, None] * 2 * np.pi,  # [W, 2]
        "phase": rng.uniform(0, 2 * np.pi, _WAVES),
        "amp": rng.normal(0, 0.18, (_WAVES, 3)),
    }


def render(seed: int, identity: int, view: int, size: int) -> np.ndarray:
    """One view of an identity: uint8 [size, size, 3]."""
    p = _identity_params(seed, identity)
    rng = np.random.default_rng([seed, 2, identity, view])
    shift = rng.uniform(-0.15, 0.15, 2)
    rot, scale = rng.uniform(-0.35, 0.35), rng.uniform(0.9, 1.1)
    c, s = np.cos(rot) * scale, np.sin(rot) * scale
    u = (np.arange(size) + 0.5) / size - 0.5
    x, y = np.meshgrid(u, u)  # [S, S], centred coordinates
    xs, ys = c * x - s * y + shift[0], s * x + c * y + shift[1]
    waves = np.cos(xs[..., None] * p["k"][:, 0] + ys[..., None] * p["k"][:, 1] + p["phase"])  # [S,S,W]
    img = p["base"] + waves @ p["amp"]  # [S, S, 3]
    img = (img - 0.5) * rng.uniform(0.85, 1.15) + 0.5 + rng.uniform(-0.08, 0.08)
    img = img + rng.normal(0, 0.06, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    return tf.io.encode_jpeg(img, quality=quality).numpy()


def shard_records(cfg: SynthConfig, shard: int, num_shards: int) -> Iterator[writer.Record]:
    """The records of one shard: record g = identity * K + view goes to shard g % num_shards."""
    k = cfg.images_per_identity
    for g in range(shard, cfg.identities * k, num_shards):
        identity, view = divmod(g, k)
        yield writer.Record(
            encode_jpeg(render(cfg.seed, identity, view, cfg.size), cfg.jpeg_quality),
            identity,
            name=f"synth-{identity:07d}",
            source=f"synth:{identity}/{view}",
        )


def verification_pairs(cfg: SynthConfig) -> tuple[list[bytes], list[bool]]:
    """Held-out identities: pair i < P genuine (identity N+i, two views), then P impostor pairs."""
    n, p = cfg.identities, cfg.verification_pairs
    rng = np.random.default_rng([cfg.seed, 3])
    views = 10**6  # view numbers far from the training views
    images, same = [], []
    for i in range(p):
        for v in (0, 1):
            images.append(encode_jpeg(render(cfg.seed, n + i, views + v, cfg.size), cfg.jpeg_quality))
        same.append(True)
    pool = max(p, 2)  # held-out identities for impostors (two at least, so a pair can differ)
    for i in range(p):
        a = int(rng.integers(pool))
        b = (a + 1 + int(rng.integers(pool - 1))) % pool  # never a itself
        a, b = n + a, n + b
        images.append(encode_jpeg(render(cfg.seed, a, views + 2 + i, cfg.size), cfg.jpeg_quality))
        images.append(encode_jpeg(render(cfg.seed, b, views + 3 + i, cfg.size), cfg.jpeg_quality))
        same.append(False)
    return images, same


def write_synth(out_dir: str, cfg: SynthConfig, num_shards: int, *, resume: bool = True, log=None):
    """Write the dataset (shards + manifest) and OUT/verification.bin; returns the Manifest."""
    cfg.validate()
    storage.prepare(out_dir)
    tf.io.gfile.makedirs(out_dir)
    images, same = verification_pairs(cfg)
    verification.save_bin(storage.join(out_dir, VERIFICATION_NAME), images, same)
    return writer.write_sharded(
        out_dir,
        num_shards,
        lambda k: shard_records(cfg, k, num_shards),
        num_classes=cfg.identities,
        image_size=(cfg.size, cfg.size),
        resume=resume,
        verification=[VERIFICATION_NAME],
        job={"synth": dataclasses.asdict(cfg)},
        log=log,
    )
