"""How much of an FC backward could a tile-skipping kernel skip? (docs/benchmarks.md, "Below the bound")

    python bench/grad_tiles.py CKPT [CKPT ...] --data DATASET [--batch 256] [--out bench/grad_tiles_results.jsonl]

For each checkpoint: one batch of training images (drawn at random, seeded), its margin softmax
probabilities against every class (the checkpoint's own head), positives excluded, and the
fraction of [samples × classes] tiles whose largest probability is below a threshold: eps/32 of
float32 and of bfloat16 (Cut Cross-Entropy's filter) and 1e-6. Tiles are cut in two orders: the
natural one (class ids, samples as drawn), and a clustered one (classes grouped by spherical
k-means of their rows, samples by the cluster nearest to their embedding), to see whether an
ordering makes skippable entries form whole tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TILES = ((64, 256), (32, 128), (16, 64), (16, 4), (8, 2))
THRESHOLDS = {"fp32_eps/32": 2.0**-23 / 32, "bf16_eps/32": 2.0**-7 / 32, "1e-6": 1e-6}


def skippable(p: np.ndarray, rows: int, cols: int, threshold: float) -> float:
    """[B, C] probabilities (positives zeroed) -> fraction of whole rows × cols tiles with max < threshold."""
    b, c = (p.shape[0] // rows) * rows, (p.shape[1] // cols) * cols
    tiles = p[:b, :c].reshape(b // rows, rows, c // cols, cols).max(axis=(1, 3))
    return float(np.mean(tiles < threshold))


def spherical_kmeans(w: np.ndarray, k: int, seed: int = 0, iters: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """[C, D] unit rows -> (cluster of each row [C], unit centroids [k, D])."""
    rng = np.random.default_rng(seed)
    centers = w[rng.choice(len(w), k, replace=False)]
    for _ in range(iters):
        assign = np.argmax(w @ centers.T, axis=1)
        for j in range(k):
            members = w[assign == j]
            if len(members):
                v = members.sum(axis=0)
                centers[j] = v / max(np.linalg.norm(v), 1e-12)
    return np.argmax(w @ centers.T, axis=1), centers


def draw_batch(data: str, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`size` records of a dataset chosen uniformly at random -> (uint8 images, labels)."""
    from launch.embed import dataset_records
    from pipelines import images, reader, schema

    _, manifest, _, counts = reader.resolve(data)
    chosen = set(np.random.default_rng(seed).choice(sum(counts), size, replace=False).tolist())
    pixels, labels = [], []
    for n, (_, _, ex) in enumerate(dataset_records(data)):
        if n in chosen:
            pixels.append(images.decode(ex[schema.IMAGE_KEY].numpy(), f"record {n}").numpy())
            labels.append(int(ex[schema.LABEL_KEY].numpy()))
    return np.stack(pixels), np.array(labels)


def probabilities(checkpoint: str, pixels: np.ndarray, labels: np.ndarray):
    """-> (softmax of the checkpoint's margin logits [B, C] with positives zeroed, unit embeddings, unit rows)."""
    import tensorflow as tf

    import partitioned_fc
    from launch import checkpoint as ckpt
    from launch.config import from_dict
    from launch.evaluate import uint8_embed
    from launch.export import load_backbone

    model, size = load_backbone(checkpoint)
    emb = uint8_embed(model, size)(pixels)
    w = np.concatenate([rows for _, rows in ckpt.class_blocks(checkpoint)])
    margin = from_dict(ckpt.read_manifest(checkpoint)["config"]).loss.margin()
    logits, _ = partitioned_fc.dense_logits(tf.constant(emb, tf.float64), labels, tf.constant(w, tf.float64), margin)
    p = tf.nn.softmax(logits, axis=1).numpy()
    p[np.arange(len(labels)), labels] = 0.0
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    return p, unit(emb), unit(w)


def measure(checkpoint: str, pixels: np.ndarray, labels: np.ndarray) -> dict:
    from launch import checkpoint as ckpt

    p, emb, w = probabilities(checkpoint, pixels, labels)
    cluster, centers = spherical_kmeans(w, max(2, w.shape[0] // 256))
    order_c = np.argsort(cluster, kind="stable")
    order_b = np.argsort(np.argmax(emb @ centers.T, axis=1), kind="stable")
    out = {"checkpoint": checkpoint, "step": ckpt.read_manifest(checkpoint)["step"], "classes": p.shape[1]}
    out["entries_below"] = {
        name: float(np.mean(np.delete(p.ravel(), labels + p.shape[1] * np.arange(len(labels))) < t))
        for name, t in THRESHOLDS.items()
    }
    for order, q in (("natural", p), ("clustered", p[order_b][:, order_c])):
        out[order] = {f"{r}x{c}": {name: skippable(q, r, c, t) for name, t in THRESHOLDS.items()} for r, c in TILES}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", required=True, help="the training dataset the batch is drawn from")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "grad_tiles_results.jsonl")
    )
    args = ap.parse_args(argv)
    pixels, labels = draw_batch(args.data, args.batch)
    for path in args.checkpoints:
        row = measure(path, pixels, labels)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
