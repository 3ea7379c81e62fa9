"""Run by `horovodrun -np N`: `launch.train.train` on deterministic global batches.

argv: OUT_DIR RUN_DIR STEPS [chunk [loss]] (chunk 0: none; loss: a key of LOSSES). Every
worker takes its slice of global batch `s` at step s, so the global batches are the same at
every world size; a checkpoint is written every
CKPT_EVERY steps and the run resumes from RUN_DIR's newest one. Saves the full class matrix, its
optimizer state and the backbone (as every worker sees them) to OUT_DIR/rank{r}.npz.
"""

import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster  # noqa: E402
from launch import train as train_lib  # noqa: E402
from launch.config import from_dict  # noqa: E402
from launch.trainer import Trainer  # noqa: E402

GLOBAL_BATCH = 6
NUM_CLASSES = 13
IMAGE = 16
CKPT_EVERY = 3
LOSSES = {
    "arcface": {"name": "arcface", "scale": 16.0, "margin": 0.3},
    "subcenter": {"name": "subcenter_arcface", "scale": 16.0, "margin": 0.3, "k": 3},
}


def config(run_dir: str, steps: int, chunk, loss: str = "arcface") -> dict:
    return {
        "seed": 3,
        "data": {"train": ["unused"], "num_classes": NUM_CLASSES, "image_size": IMAGE},
        "model": {"backbone": "tiny", "embedding_dim": 8, "dropout": 0.0, "batch_norm": False},
        "loss": dict(LOSSES[loss]),
        "fc": {"sample_rate": 1.0, "chunk_size": chunk},
        "optim": {
            "name": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "warmup_steps": 2,
            "schedule": "cosine",
            "clip_norm": 10.0,
        },
        "train": {
            "batch_size": GLOBAL_BATCH // cluster.init().size,
            "steps": steps,
            "log_every": 1,
            "run_dir": run_dir,
        },
        "checkpoint": {"every": CKPT_EVERY, "keep": 5},
        "eval": {"interval": 0},
        "monitoring": {"port": 0},
    }


def global_batch(step: int):
    rng = np.random.default_rng(100 + step)
    images = rng.uniform(-1, 1, (GLOBAL_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH)
    return images, labels


def state(trainer: Trainer) -> dict:
    comm = trainer.comm
    out = {"fc_weight": comm.allgather(tf.convert_to_tensor(trainer.fc.weight)).numpy()}
    for name, var in trainer.fc_opt.state().items():
        out[f"fc_{name}"] = comm.allgather(tf.convert_to_tensor(var)).numpy()
    for i, v in enumerate(trainer.model.variables):
        out[f"backbone_{i}"] = np.asarray(v.numpy())
    out["step"] = np.array(trainer.step)
    return out


def main(out_dir: str, run_dir: str, steps: int, chunk=None, loss: str = "arcface") -> None:
    comm = cluster.init()
    r, n = comm.rank, comm.size
    b = GLOBAL_BATCH // n
    cfg = from_dict(config(run_dir, steps, chunk, loss))

    def data(start):
        for s in range(start, steps):
            images, labels = global_batch(s)
            yield images[r * b : (r + 1) * b], labels[r * b : (r + 1) * b], s // 10

    res = {}
    # The state the run resumes from, as this world size re-splits it.
    probe = Trainer(cfg, comm, num_classes=NUM_CLASSES)
    path, _ = probe.resume_path()
    if path:
        probe.restore(path)
        res.update({f"resumed_{k}": v for k, v in state(probe).items()})
    summary = train_lib.train(cfg, comm, data=data, steps_per_epoch=10, num_classes=NUM_CLASSES)
    final = Trainer(cfg, comm, num_classes=NUM_CLASSES)
    final.restore(final.resume_path()[0])
    res.update({f"final_{k}": v for k, v in state(final).items()})
    res["loss"] = np.array(summary["loss"])
    np.savez(os.path.join(out_dir, f"rank{r}.npz"), **res)


if __name__ == "__main__":
    chunk = int(sys.argv[4]) if len(sys.argv) > 4 and int(sys.argv[4]) else None
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), chunk, *sys.argv[5:6])
