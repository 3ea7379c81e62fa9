"""The training loop of `pfc train`: a data-parallel backbone, the model-parallel class matrix.

One step (compiled with `tf.function`):
  1. the backbone maps this worker's images to embeddings `[B_r, D]` under a tape;
  2. `PartitionedFC.train_step` computes the exact global loss, updates this worker's class rows
     with the sparse shard optimizer and returns d(loss)/d(embeddings) (nothing of the class matrix
     is ever reduced over workers);
  3. the backbone's gradients are SUMMED over workers in one allreduce: each worker's loss is the
     mean over the GLOBAL batch, so the sum is the exact gradient (MARGINS.md);
  4. optional clipping of that global gradient, then the backbone update. A non-finite loss
     updates nothing (the verdict is the same on every worker).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

import cluster as cluster_lib
import partitioned_fc
from launch import checkpoint as ckpt
from launch.backbones import build_backbone
from launch.config import Config
from launch.schedule import learning_rate
from partitioned_fc import optimizer as shard_opt
from partitioned_fc.memory import release_free_memory

Batch = tuple  # (images [B_r, H, W, 3] uint8 (with `augment`) or float32, labels [B_r] int64, epoch [] int64)


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad checkpoint, bad data): a message for the user."""


@dataclasses.dataclass
class StepResult:
    loss: float
    accuracy: float
    applied: bool
    grad_norm: float
    comm_seconds: float   # in the backbone-gradient allreduce, waiting for the slowest worker included


class Trainer:
    """Builds the model, the class matrix and both optimizers from a `Config`; runs steps.

    num_classes: C when the config has none and no dataset is opened.
    augment: `(uint8 images [B_r, H, W, 3], global step) -> float32 images`, run inside the compiled
    step (the reader's `Pipeline.augment`: flip and normalization); None when the batches come
    float32 already.
    """

    def __init__(self, config: Config, comm: cluster_lib.Cluster | None = None, *,
                 num_classes: int | None = None, log: Callable[[str], None] | None = None,
                 augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None):
        self.config = config
        self.augment = augment
        self.comm = comm or cluster_lib.init()
        self._log = log or (lambda msg: print(msg, flush=True))
        cfg = config
        self.num_classes = int(cfg.data.num_classes or num_classes or 0)
        if self.num_classes < 1:
            raise TrainingError("the number of classes is unknown: set data.num_classes or open a dataset")
        # No global seed: every initializer and RNG is seeded explicitly from cfg.seed.
        self.model = build_backbone(cfg.model.backbone, cfg.data.image_size, cfg.model.embedding_dim,
                                    cfg.model.dropout, seed=cfg.seed, batch_norm=cfg.model.batch_norm)
        self.fc = partitioned_fc.PartitionedFC(
            self.num_classes, cfg.model.embedding_dim, cfg.loss.margin(), self.comm, seed=cfg.seed,
            sample_rate=cfg.fc.sample_rate, chunk_size=cfg.fc.chunk_size,
            compute_dtype=cfg.fc.compute_dtype, param_dtype=cfg.fc.param_dtype)
        o = cfg.optim
        if o.name == "sgd":
            self.fc_opt = shard_opt.SGD(self.fc.weight, momentum=o.momentum, nesterov=o.nesterov,
                                        weight_decay=o.weight_decay)
            self.opt = keras.optimizers.SGD(learning_rate=o.lr, momentum=o.momentum, nesterov=o.nesterov)
        else:
            self.fc_opt = shard_opt.AdamW(self.fc.weight, beta_1=o.betas[0], beta_2=o.betas[1],
                                          epsilon=o.eps, weight_decay=o.weight_decay)
            self.opt = keras.optimizers.AdamW(learning_rate=o.lr, beta_1=o.betas[0], beta_2=o.betas[1],
                                              epsilon=o.eps, weight_decay=o.weight_decay)
        self.opt.build(self.model.trainable_variables)
        # model.variables: weights, batch-norm statistics and the dropout RNG state (checkpointed).
        # Same seed everywhere already; the broadcast makes "identical replicas" a fact, not a hope.
        self.comm.broadcast_variables([v.value for v in self.model.weights], root=0)
        self.total_steps = 0  # set by `set_total_steps` before the first step
        self._step_fn = tf.function(self._step)
        self._compiled = False

    # --- the step ------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken (skipped non-finite steps included): drives lr and λ."""
        return int(self.fc.step.numpy())

    def set_total_steps(self, total: int) -> None:
        self.total_steps = int(total)

    def learning_rate(self, step) -> tf.Tensor:
        o = self.config.optim
        return learning_rate(step, lr=o.lr, total_steps=max(self.total_steps, 1),
                             warmup_steps=o.warmup_steps, schedule=o.schedule, power=o.power,
                             min_lr=o.min_lr)

    def train_step(self, images, labels) -> StepResult:
        loss, acc, applied, norm, comm_s = self._step_fn(images, labels)
        if not self._compiled:
            # The first call traced and compiled the step: hand the compiler's freed scratch back
            # (pfc's allocator keeps freed memory for reuse; measured 0.04-0.1 GiB at 5M classes).
            release_free_memory()
            self._compiled = True
        return StepResult(float(loss), float(acc), bool(applied), float(norm), float(comm_s))

    def _step(self, images, labels):
        cfg = self.config
        step = self.fc.step
        lr = self.learning_rate(step)
        variables = self.model.trainable_variables
        if self.augment is not None:
            images = self.augment(images, step)
        with tf.GradientTape() as tape:
            emb = self.model(images, training=True)
        out = self.fc.train_step(emb, labels, self.fc_opt, lr * cfg.optim.fc_lr_scale, step=step)
        grads = tape.gradient(emb, variables, output_gradients=out.d_embeddings)
        grads, comm_s = self._sum_over_workers(grads)
        if cfg.optim.name == "sgd" and cfg.optim.weight_decay:
            # coupled L2, as the class rows get it (and as InsightFace trains)
            grads = [g + cfg.optim.weight_decay * tf.convert_to_tensor(v) for g, v in zip(grads, variables)]
        norm = tf.linalg.global_norm(grads)
        if cfg.optim.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, cfg.optim.clip_norm, use_norm=norm)
        ok = out.applied & tf.math.is_finite(norm)

        def apply():
            self.opt.learning_rate.assign(lr)
            self.opt.apply_gradients(zip(grads, variables))
            return tf.constant(True)

        tf.cond(ok, apply, lambda: tf.constant(False))
        step.assign_add(1)
        return out.loss, out.accuracy, ok, norm, comm_s

    def _sum_over_workers(self, grads):
        """One allreduce of all backbone gradients, flattened: the exact global gradient, and the
        seconds spent in it (timestamps taken in the graph right before and after)."""
        if self.comm.size == 1:
            return grads, tf.constant(0.0, tf.float64)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        with tf.control_dependencies([flat]):
            t0 = tf.timestamp()
        with tf.control_dependencies([t0]):
            flat = self.comm.allreduce_sum(flat)
        with tf.control_dependencies([flat]):
            seconds = tf.timestamp() - t0
        sizes = [int(np.prod(g.shape)) for g in grads]
        return [tf.reshape(p, g.shape) for p, g in zip(tf.split(flat, sizes), grads)], seconds

    # --- state ---------------------------------------------------------------------------------
    def fc_state(self) -> ckpt.FCState:
        return ckpt.FCState(self.fc.class_range, self.fc.weight, self.fc_opt.state(),
                            getattr(self.fc, "sampler", None))

    def save(self, meta: dict | None = None) -> str:
        cfg = self.config
        info = {"num_classes": self.num_classes, "embedding_dim": cfg.model.embedding_dim,
                "config": cfg.to_dict(), **(meta or {})}
        t0 = time.perf_counter()
        path = ckpt.save(cfg.checkpoint_dir, self.step, self.comm, self.fc_state(),
                         self.model.variables, self.opt.variables, info, keep=cfg.checkpoint.keep)
        self.last_checkpoint_seconds = time.perf_counter() - t0
        return path

    def resume_path(self) -> str | None:
        """The checkpoint to start from per `checkpoint.resume`, checked against C and D, or None."""
        mode = self.config.checkpoint.resume
        if mode == "none":
            return None
        path = ckpt.latest(self.config.checkpoint_dir) if mode == "auto" else mode
        if path is None:
            return None
        manifest = ckpt.read_manifest(path)
        ckpt.check_compatible(path, manifest, self.num_classes, self.config.model.embedding_dim)
        return path

    def restore(self, path: str) -> dict:
        manifest = ckpt.restore(path, self.comm, self.fc_state(), self.model.variables, self.opt.variables)
        self.fc.step.assign(int(manifest["step"]))
        return manifest

    def embed(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """[N, H, W, 3] in [-1, 1] -> [N, D] raw embeddings (inference mode)."""
        out = [self.model(images[i:i + batch_size], training=False).numpy()
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros([0, self.config.model.embedding_dim], np.float32)
