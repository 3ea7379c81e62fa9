"""`pfc eval` and verification during training: InsightFace-style `.bin` pair sets.

Each image and its horizontal flip are embedded and summed; pairs are compared by squared L2
distance of the normalized sums; 10-fold accuracy with a threshold chosen on the other folds, and
TAR at a fixed FAR (launch/verification.py has the metrics). `--ijb ROOT` adds the IJB-B / IJB-C
template protocol (launch/ijb.py).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np

from launch import commands, verification

EvalSets = dict  # name -> (images [2N, H, W, 3] float32 in [-1, 1], issame [N] bool)


def load_sets(paths: dict[str, str], image_size: int) -> EvalSets:
    if not paths:
        return {}
    from pipelines.verification import load_bin

    return {name: load_bin(path, (image_size, image_size)) for name, path in paths.items()}


def evaluate(
    embed: Callable[[np.ndarray], np.ndarray], sets: EvalSets, *, batch_size: int, folds: int, far: float, flip: bool
) -> dict[str, dict]:
    """embed: [n, H, W, 3] -> [n, D]. -> {set: VerificationResult.as_dict()}."""
    results = {}
    for name, (images, issame) in sets.items():
        if flip:
            emb = verification.flip_sum(embed, images, batch_size)
        else:
            emb = np.concatenate([embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        e1, e2 = verification.split_pairs(emb)
        results[name] = verification.evaluate_pairs(e1, e2, issame, folds=folds, far=far).as_dict()
    return results


def closed_top1(
    embed: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    class_blocks,
    *,
    batch_size: int,
    rows_per_class: int = 1,
) -> float:
    """Top-1 accuracy of argmax_c cos(embedding, W_c) over class-matrix blocks (first row, [n, D]);
    with g rows per class (sub-centers), a class's score is its best row's."""
    emb = np.concatenate([embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    best = np.full(len(emb), -np.inf)
    arg = np.zeros(len(emb), np.int64)
    for start, rows in class_blocks:
        cos = emb @ (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)).T  # [N, n]
        better = cos.max(1) > best
        arg[better] = start + cos.argmax(1)[better]
        best = np.maximum(best, cos.max(1))
    return float(np.mean(arg // rows_per_class == labels)) if len(labels) else float("nan")


def summary_line(results: dict[str, dict], far: float) -> str:
    return "  ".join(
        f"{name}: acc {r['accuracy']:.4f}±{r['accuracy_std']:.4f} TAR@FAR={far:g} {_tar(r, far)}"
        for name, r in results.items()
    )


def _tar(r: dict, far: float) -> str:
    if r["tar"] is not None:
        return f"{r['tar']:.4f}"
    return f"n/a ({r['num_pairs'] // 2} different pairs; FAR={far:g} needs {round(1 / far)})"


def add_parser(sub) -> None:
    p = commands.add(sub, "eval")
    p.add_argument("--config", required=True, help="the experiment's YAML config")
    p.add_argument(
        "--checkpoint", default=None, help="checkpoint directory (default: the newest in the config's checkpoint dir)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the results here as JSON")
    p.add_argument(
        "--ijb",
        default=None,
        metavar="ROOT",
        help="also run IJB 1:1 template verification on ROOT (loose_crop/, meta/: launch/ijb.py)",
    )
    p.add_argument(
        "--ijb-name",
        default="IJBC",
        type=str.upper,
        choices=("IJBB", "IJBC"),
        help="which IJB set ROOT holds (its meta file names; default IJBC)",
    )
    p.set_defaults(func=run_eval)


def uint8_embed(model, image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The backbone on uint8 [B, H, W, 3] faces -> [B, D]: resized to image_size as the reader
    resizes (bilinear, rounded to uint8 levels) when H, W differ, scaled x / 127.5 - 1."""
    import tensorflow as tf

    from pipelines.images import resize_levels

    def embed(images: np.ndarray) -> np.ndarray:
        x = tf.cast(images, tf.float32)
        if tuple(x.shape[1:3]) != (image_size, image_size):
            x = resize_levels(x, [image_size, image_size])
        return model(x / 127.5 - 1.0, training=False).numpy()

    return embed


def run_eval(args: argparse.Namespace) -> int:
    from launch import backbones
    from launch import checkpoint as ckpt
    from launch.config import load_config

    cfg = load_config(args.config, args.overrides)
    path = args.checkpoint or ckpt.latest(cfg.checkpoint_dir)
    if path is None:
        raise ckpt.CheckpointError(f"{cfg.checkpoint_dir}: no checkpoint to evaluate (pass --checkpoint)")
    manifest = ckpt.read_manifest(path)
    if manifest["embedding_dim"] != cfg.model.embedding_dim:
        raise ckpt.CheckpointError(
            f"{path}: embedding_dim {manifest['embedding_dim']} in the checkpoint, "
            f"{cfg.model.embedding_dim} in the config"
        )
    sets_paths = cfg.eval_sets()
    if not sets_paths and not args.ijb:
        raise SystemExit("pfc eval: the config lists no verification sets (data.val) and no --ijb was given")
    model = backbones.from_config(cfg)
    ckpt.restore_backbone(path, model.variables)
    sets = load_sets(sets_paths, cfg.data.image_size)
    embed = lambda x: model(x, training=False).numpy()  # noqa: E731
    results = evaluate(
        embed, sets, batch_size=cfg.eval.batch_size, folds=cfg.eval.folds, far=cfg.eval.far, flip=cfg.eval.flip
    )
    line = f"step {manifest['step']}" + (f"  {summary_line(results, cfg.eval.far)}" if results else "")
    out = {"checkpoint": path, "step": manifest["step"], "eval": results}
    if cfg.data.closed:
        from pipelines.verification import load_labelled

        images, labels = load_labelled(cfg.data.closed, (cfg.data.image_size,) * 2)
        out["closed_top1"] = closed_top1(
            embed,
            images,
            labels,
            ckpt.class_blocks(path),
            batch_size=cfg.eval.batch_size,
            rows_per_class=ckpt.rows_per_class(path),
        )
        line += f"  closed-set top-1 {out['closed_top1']:.4f} ({len(labels)} images)"
    if args.ijb:
        from launch import ijb

        out["ijb"] = ijb.evaluate_ijb(
            uint8_embed(model, cfg.data.image_size), args.ijb, args.ijb_name, batch_size=cfg.eval.batch_size
        )
        line += f"  {ijb.summary_line(out['ijb'])}"
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(out, f, indent=1)
    return 0
