"""`pfc export CKPT OUT`: the backbone of a checkpoint as a SavedModel, images -> unit embeddings.

Signatures (all return `embeddings` float32 [N, D] of unit L2 norm: compare two faces by their
dot product; load with `tf.saved_model.load` or TF Serving; `pfc embed` runs it on folders and datasets):

* `serving_default`: `images` uint8 [N, H, W, 3] RGB of any H x W. Resized inside (bilinear, as
  the reader resizes) to the training size and scaled x / 127.5 - 1, as in training; no crop, so
  give it aligned, square crops (112 x 112 faces, the usual convention).
* `flip_sum`: the same input; the embedding of each image plus that of its horizontal mirror,
  then normalized: what `pfc eval` compares (with `eval.flip: true`, the default).
* `float_images`: `images` float32 [N, S, S, 3] already scaled to [-1, 1] at the training size S.
"""
from __future__ import annotations

import argparse
import os
import shutil

import tensorflow as tf

from launch import commands
from pipelines import images as images_lib


def add_parser(sub) -> None:
    p = commands.add(sub, "export")
    p.add_argument("checkpoint", help="checkpoint directory (…/checkpoints/ckpt-000001000)")
    p.add_argument("out", help="SavedModel directory to write (must not exist)")
    p.set_defaults(func=run_export)


class Embedder(tf.Module):
    """The backbone between the serving signatures and unit embeddings (see the module docstring)."""

    def __init__(self, model, image_size: int):
        super().__init__()
        self.model = model
        self.image_size = image_size
        any_size = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
        self.serve = tf.function(self._serve, input_signature=any_size)
        self.serve_flip_sum = tf.function(self._serve_flip_sum, input_signature=any_size)
        self.serve_float = tf.function(self._serve_float, input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])

    def signatures(self) -> dict:
        return {"serving_default": self.serve, "flip_sum": self.serve_flip_sum,
                "float_images": self.serve_float}

    def _scaled(self, images):
        """uint8 [N, H, W, 3] -> float32 [N, S, S, 3] in [-1, 1], resized as the reader does."""
        size = [self.image_size, self.image_size]
        x = tf.cast(images, tf.float32)
        x = tf.cond(tf.reduce_all(tf.equal(tf.shape(images)[1:3], size)), lambda: x,
                    lambda: images_lib.resize_levels(x, size))
        return x / 127.5 - 1.0

    def _raw(self, x):
        return self.model(x, training=False)

    def _serve(self, images):
        return {"embeddings": tf.math.l2_normalize(self._raw(self._scaled(images)), axis=1)}

    def _serve_flip_sum(self, images):
        x = self._scaled(images)
        both = self._raw(x) + self._raw(tf.reverse(x, axis=[2]))
        return {"embeddings": tf.math.l2_normalize(both, axis=1)}

    def _serve_float(self, images):
        return {"embeddings": tf.math.l2_normalize(self._raw(images), axis=1)}


def load_backbone(checkpoint: str):
    """-> (the checkpoint's backbone, its training image size), rebuilt from the manifest's config."""
    from launch import checkpoint as ckpt
    from launch.backbones import build_backbone
    from launch.config import from_dict

    manifest = ckpt.read_manifest(checkpoint)
    if "config" not in manifest:
        raise ckpt.CheckpointError(f"{checkpoint}: the manifest holds no config to rebuild the backbone")
    cfg = from_dict(manifest["config"])
    model = build_backbone(cfg.model.backbone, cfg.data.image_size, cfg.model.embedding_dim,
                           cfg.model.dropout, seed=cfg.seed, batch_norm=cfg.model.batch_norm)
    ckpt.restore_backbone(checkpoint, model.variables)
    return model, cfg.data.image_size


def export(checkpoint: str, out: str) -> str:
    """Write the SavedModel of `checkpoint`'s backbone to `out` (a new directory); -> out."""
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists; choose a new directory")
    model, image_size = load_backbone(checkpoint)
    module = Embedder(model, image_size)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures=module.signatures())
    os.rename(tmp, out)  # a crash mid-write leaves no directory that looks complete
    return out


def run_export(args: argparse.Namespace) -> int:
    path = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path} (serving_default: uint8 images [N, H, W, 3] of any "
          "size -> embeddings [N, D], unit norm; flip_sum: the same with the mirror's embedding added)",
          flush=True)
    return 0
