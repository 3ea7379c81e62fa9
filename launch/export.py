"""`pfc export CKPT OUT`: the backbone of a checkpoint as a SavedModel, images -> unit embeddings.

The SavedModel's `serving_default` signature takes `images` float32 [N, H, W, 3] with pixel
values scaled to [-1, 1] (x / 127.5 - 1, RGB), and returns `embeddings` float32 [N, D] of unit L2
norm: compare two faces by their dot product. It loads with `tf.saved_model.load` and TF Serving.
"""
from __future__ import annotations

import argparse
import os
import shutil

import tensorflow as tf

from launch import commands


def add_parser(sub) -> None:
    p = commands.add(sub, "export")
    p.add_argument("checkpoint", help="checkpoint directory (…/checkpoints/ckpt-000001000)")
    p.add_argument("out", help="SavedModel directory to write (must not exist)")
    p.set_defaults(func=run_export)


class _Embedder(tf.Module):
    def __init__(self, model, image_size: int):
        super().__init__()
        self.model = model
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                                        name="images")])

    def _serve(self, images):
        return {"embeddings": tf.math.l2_normalize(self.model(images, training=False), axis=1)}


def export(checkpoint: str, out: str) -> str:
    from launch import checkpoint as ckpt
    from launch.backbones import build_backbone
    from launch.config import from_dict

    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists; choose a new directory")
    manifest = ckpt.read_manifest(checkpoint)
    if "config" not in manifest:
        raise ckpt.CheckpointError(f"{checkpoint}: the manifest holds no config to rebuild the backbone")
    cfg = from_dict(manifest["config"])
    model = build_backbone(cfg.model.backbone, cfg.data.image_size, cfg.model.embedding_dim,
                           cfg.model.dropout, seed=cfg.seed, batch_norm=cfg.model.batch_norm)
    ckpt.restore_backbone(checkpoint, model.variables)
    module = _Embedder(model, cfg.data.image_size)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve})
    os.rename(tmp, out)  # a crash mid-write leaves no directory that looks complete
    return out


def run_export(args: argparse.Namespace) -> int:
    path = export(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {path} (serving_default: images [N, H, W, 3] in [-1, 1] "
          "-> embeddings [N, D], unit norm)", flush=True)
    return 0
