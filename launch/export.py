"""`pfc export CKPT OUT`: the backbone of a checkpoint as a SavedModel, images -> unit embeddings.

Signatures (all return `embeddings` float32 [N, D] of unit L2 norm: compare two faces by their
dot product; load with `tf.saved_model.load` or TF Serving; `pfc embed` runs it on folders and datasets):

* `serving_default`: `images` uint8 [N, H, W, 3] RGB of any H x W. Resized inside (bilinear, as
  the reader resizes) to the training size and scaled x / 127.5 - 1, as in training; no crop, so
  give it aligned, square crops (112 x 112 faces, the usual convention).
* `flip_sum`: the same input; the embedding of each image plus that of its horizontal mirror,
  then normalized: what `pfc eval` compares (with `eval.flip: true`, the default).
* `float_images`: `images` float32 [N, S, S, 3] already scaled to [-1, 1] at the training size S.

`--onnx FILE` also writes the model as ONNX (tf2onnx, opset 17; `make onnx` installs it): input
`images` uint8 [N, S, S, 3] RGB at the training size S (resize and align before it, as face
pipelines do), output `embeddings` float32 [N, D] unit norm; `--onnx-flip-sum` adds the mirror's
embedding as `flip_sum` does. The file is checked against the SavedModel with onnxruntime on
seeded random images before it is renamed into place (largest difference at most ONNX_TOLERANCE).
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
import tensorflow as tf

from launch import commands
from pipelines import images as images_lib


def add_parser(sub) -> None:
    p = commands.add(sub, "export")
    p.add_argument("checkpoint", help="checkpoint directory (…/checkpoints/ckpt-000001000)")
    p.add_argument("out", help="SavedModel directory to write (must not exist)")
    p.add_argument(
        "--onnx",
        metavar="FILE",
        default=None,
        help="also write an ONNX model here: uint8 [N, S, S, 3] at the training size -> "
        "unit embeddings (needs `make onnx`)",
    )
    p.add_argument(
        "--onnx-flip-sum",
        action="store_true",
        help="the ONNX model adds each image's mirror embedding before normalizing",
    )
    p.set_defaults(func=run_export)


# The largest |ONNX − SavedModel| an exported ONNX file may show on the check images.
ONNX_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """An export that cannot be written or does not reproduce the SavedModel."""


class Embedder(tf.Module):
    """The backbone between the serving signatures and unit embeddings (see the module docstring)."""

    def __init__(self, model, image_size: int):
        super().__init__()
        self.model = model
        self.image_size = image_size
        any_size = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
        self.serve = tf.function(self._serve, input_signature=any_size)
        self.serve_flip_sum = tf.function(self._serve_flip_sum, input_signature=any_size)
        self.serve_float = tf.function(
            self._serve_float,
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")],
        )

    def signatures(self) -> dict:
        return {"serving_default": self.serve, "flip_sum": self.serve_flip_sum, "float_images": self.serve_float}

    def _scaled(self, images):
        """uint8 [N, H, W, 3] -> float32 [N, S, S, 3] in [-1, 1], resized as the reader does."""
        size = [self.image_size, self.image_size]
        x = tf.cast(images, tf.float32)
        x = tf.cond(
            tf.reduce_all(tf.equal(tf.shape(images)[1:3], size)), lambda: x, lambda: images_lib.resize_levels(x, size)
        )
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

    def fixed_size(self, flip_sum: bool):
        """A tf.function uint8 [N, S, S, 3] at the training size -> {"embeddings": [N, D]} (ONNX)."""
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8, name="images")
        return tf.function(self._serve_flip_sum if flip_sum else self._serve, input_signature=[spec])


def load_backbone(checkpoint: str):
    """-> (the checkpoint's backbone, its training image size), rebuilt from the manifest's config."""
    from launch import backbones
    from launch import checkpoint as ckpt
    from launch.config import from_dict

    manifest = ckpt.read_manifest(checkpoint)
    if "config" not in manifest:
        raise ckpt.CheckpointError(f"{checkpoint}: the manifest holds no config to rebuild the backbone")
    cfg = from_dict(manifest["config"])
    model = backbones.from_config(cfg)
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


def export_onnx(module: Embedder, out: str, flip_sum: bool = False) -> float:
    """Write `module`'s fixed-size signature to the ONNX file `out` (new), checked against it
    with onnxruntime; -> the largest absolute difference seen."""
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists; choose a new file")
    tf2onnx, ort = _onnx_tools()
    fn = module.fixed_size(flip_sum)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=17)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(proto.SerializeToString())
    diff = _onnx_difference(fn, ort.InferenceSession(tmp, providers=["CPUExecutionProvider"]), module.image_size)
    if not diff <= ONNX_TOLERANCE:
        os.remove(tmp)
        raise ExportError(
            f"{out}: the ONNX model differs from the SavedModel by {diff:.2e} "
            f"(> {ONNX_TOLERANCE:.0e}) on the check images; nothing written"
        )
    os.rename(tmp, out)
    return diff


def _onnx_tools():
    try:
        import onnxruntime
        import tf2onnx
    except ImportError as e:
        raise ExportError(
            f"--onnx needs tf2onnx and onnxruntime ({e.name} is missing): run `make onnx` (or pip install '.[onnx]')"
        ) from None
    return tf2onnx, onnxruntime


def _onnx_difference(fn, session, size: int) -> float:
    """Largest |ONNX − TensorFlow| over 4 seeded uint8 images [4, S, S, 3]."""
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    want = fn(tf.constant(images))["embeddings"].numpy()
    (got,) = session.run(["embeddings"], {"images": images})
    return float(np.max(np.abs(got - want)))


def run_export(args: argparse.Namespace) -> int:
    if args.onnx:  # what would stop the ONNX file, before anything is written
        _onnx_tools()
        if os.path.exists(args.onnx):
            raise FileExistsError(f"{args.onnx}: already exists; choose a new file")
    path = export(args.checkpoint, args.out)
    print(
        f"exported {args.checkpoint} -> {path} (serving_default: uint8 images [N, H, W, 3] of any "
        "size -> embeddings [N, D], unit norm; flip_sum: the same with the mirror's embedding added)",
        flush=True,
    )
    if args.onnx:
        model, image_size = load_backbone(args.checkpoint)
        diff = export_onnx(Embedder(model, image_size), args.onnx, args.onnx_flip_sum)
        print(
            f"exported {args.checkpoint} -> {args.onnx} (ONNX: uint8 images [N, {image_size}, "
            f"{image_size}, 3] -> embeddings; largest difference from the SavedModel {diff:.1e})",
            flush=True,
        )
    return 0
