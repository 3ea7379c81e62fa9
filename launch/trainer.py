"""The training loop of `pfc train`: a data-parallel backbone, the model-parallel class matrix.

One step (compiled with `tf.function`):
  1. the backbone maps this worker's images to embeddings `[B_r, D]` under a tape;
  2. `PartitionedFC.train_step` computes the exact global loss, updates this worker's class rows
     with the sparse shard optimizer and returns d(loss)/d(embeddings) (nothing of the class matrix
     is ever reduced over workers);
  3. the backbone's gradients are SUMMED over workers in one allreduce: each worker's loss is the
     mean over the GLOBAL batch, so the sum is the exact gradient (docs/margins.md);
  4. optional clipping of that global gradient, then the backbone update.
A skipped step (a non-finite loss: the verdict is the same on every worker) applies nothing: the
state a forward pass changes outside the optimizers (batch-norm statistics, RNG and sampler states)
is put back, and only the data position and the skip count move.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

import cluster as cluster_lib
import partitioned_fc
from launch import backbones, recompute
from launch import checkpoint as ckpt
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
    comm_seconds: float  # in the backbone-gradient allreduce, waiting for the slowest worker included
    overflow: bool = False  # mixed_float16: the scaled backward overflowed; backbone step skipped


@dataclasses.dataclass
class Position:
    """Where the run is in its data and how many steps it skipped (checkpointed in the manifest).

    samples: global samples taken from the data, skipped batches included: the data position, valid
    at any world size (optimizer steps are not, once the global batch changes).
    """

    samples: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    overflows: int = 0  # mixed_float16 loss-scale overflows (not skips: the class rows moved)

    def meta(self) -> dict:
        return {"samples": self.samples, "skipped_steps": self.skipped}


class Trainer:
    """Builds the model, the class matrix and both optimizers from a `Config`; runs steps.

    num_classes: C when the config has none and no dataset is opened.
    augment: `(uint8 images [B_r, H, W, 3], global step) -> float32 images`, run inside the compiled
    step (the reader's `Pipeline.augment`: flip and normalization); None when the batches come
    float32 already.
    """

    def __init__(
        self,
        config: Config,
        comm: cluster_lib.Cluster | None = None,
        *,
        num_classes: int | None = None,
        log: Callable[[str], None] | None = None,
        augment: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None,
    ):
        self.config = config
        self.augment = augment
        self.comm = comm or cluster_lib.init()
        self._log = log or (lambda msg: print(msg, flush=True))
        cfg = config
        self.num_classes = int(cfg.data.num_classes or num_classes or 0)
        if self.num_classes < 1:
            raise TrainingError("the number of classes is unknown: set data.num_classes or open a dataset")
        # No global seed: every initializer and RNG is seeded explicitly from cfg.seed.
        self.model = backbones.from_config(cfg, precision=cfg.model.precision)
        self.loss_scale = LossScale() if cfg.model.precision == "mixed_float16" else None
        self.forward = self.model  # the training forward: images [B_r, H, W, 3] -> [B_r, D]
        if cfg.model.gradient_checkpointing:
            self.forward = recompute.CheckpointedBackbone(self.model, backbones.unit_ends(self.model))
        self.fc = partitioned_fc.PartitionedFC(
            self.num_classes,
            cfg.model.embedding_dim,
            cfg.loss.margin(),
            self.comm,
            seed=cfg.seed,
            sample_rate=cfg.fc.sample_rate,
            chunk_size=cfg.fc.chunk_size,
            compute_dtype=cfg.fc.compute_dtype,
            param_dtype=cfg.fc.param_dtype,
        )
        o = cfg.optim
        self.fc_opt = shard_opt.get(o.name, self.fc.weight, weight_decay=o.weight_decay, **o.rule_params())
        # The backbone's SGD decay is an L2 term of the step's gradient (`_step`); AdamW's is decoupled.
        decay = {"weight_decay": o.weight_decay} if o.name == "adamw" else {}
        keras_optimizer = {"sgd": keras.optimizers.SGD, "adamw": keras.optimizers.AdamW}[o.name]
        self.opt = keras_optimizer(learning_rate=o.lr, **o.rule_params(), **decay)
        self.opt.build(self.model.trainable_variables)
        # model.variables: weights, batch-norm statistics and the dropout RNG state (checkpointed).
        # Same seed everywhere already; the broadcast makes "identical replicas" a fact, not a hope.
        self.comm.broadcast_variables([v.value for v in self.model.weights], root=0)
        self.total_steps = 0  # set by `set_total_steps` before the first step
        self.position = Position()
        self._volatile = self._volatile_variables()
        self._step_fn = tf.function(self._step)
        self._compiled = False

    # --- the step ------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps applied (skipped steps not counted): drives lr and λ."""
        return int(self.fc.step.numpy())

    @property
    def global_batch(self) -> int:
        return self.config.train.batch_size * self.comm.size

    def set_total_steps(self, total: int) -> None:
        self.total_steps = int(total)

    def learning_rate(self, step) -> tf.Tensor:
        o = self.config.optim
        return learning_rate(
            step,
            lr=o.lr,
            total_steps=max(self.total_steps, 1),
            warmup_steps=o.warmup_steps,
            schedule=o.schedule,
            power=o.power,
            min_lr=o.min_lr,
        )

    def train_step(self, images, labels) -> StepResult:
        loss, acc, applied, fc_applied, norm, comm_s = self._step_fn(images, labels)
        if not self._compiled:
            # The first call traced and compiled the step: hand the compiler's freed scratch back
            # (pfc's allocator keeps freed memory for reuse; measured 0.04-0.1 GiB at 5M classes).
            release_free_memory()
            self._compiled = True
        overflow = bool(fc_applied) and not bool(applied)
        if overflow and self.loss_scale is None:
            raise TrainingError(
                f"step {self.step}: the loss ({float(loss)}) is finite but the backbone's gradient is "
                f"not (norm {float(norm)}): the class rows were updated and the backbone was not, so "
                "the step cannot be skipped; stopping. Lower optim.lr or check the data"
            )
        self._advance(bool(applied), overflow)
        return StepResult(float(loss), float(acc), bool(applied), float(norm), float(comm_s), overflow)

    def _advance(self, applied: bool, overflow: bool) -> None:
        p = self.position
        p.samples += self.global_batch
        p.overflows += overflow
        if not overflow:
            p.skipped += not applied
            p.skipped_in_a_row = 0 if applied else p.skipped_in_a_row + 1

    def _volatile_variables(self) -> list[tf.Variable]:
        """Variables a step changes outside the optimizers: batch-norm statistics, RNG states
        (dropout) and the Partial FC sampler's state. A skipped step puts them back."""
        trainable = {id(v) for v in self.model.trainable_variables}
        found = [v for v in self.model.variables if id(v) not in trainable]
        sampler = self.fc.sampler
        return found + ([sampler.state] if sampler is not None else [])

    def _step(self, images, labels):
        cfg = self.config
        step = self.fc.step
        lr = self.learning_rate(step)
        variables = self.model.trainable_variables
        if self.augment is not None:
            images = self.augment(images, step)
        # read before the forward pass changes them (stateful ops run in program order)
        before = [tf.identity(tf.convert_to_tensor(v)) for v in self._volatile]
        with tf.GradientTape() as tape:
            emb = self.forward(images, training=True)
        out = self.fc.train_step(emb, labels, self.fc_opt, lr * cfg.optim.fc_lr_scale, step=step)
        grads = self._backbone_grads(tape, emb, variables, out.d_embeddings)
        grads, comm_s = self._sum_over_workers(grads)
        if cfg.optim.name == "sgd" and cfg.optim.weight_decay:
            # coupled L2, as the class rows get it (and as InsightFace trains)
            grads = [g + cfg.optim.weight_decay * tf.convert_to_tensor(v) for g, v in zip(grads, variables)]
        norm = tf.linalg.global_norm(grads)
        if cfg.optim.clip_norm:
            grads, _ = tf.clip_by_global_norm(grads, cfg.optim.clip_norm, use_norm=norm)
        finite = tf.math.is_finite(norm)
        ok = out.applied & finite
        if self.loss_scale is not None:
            # An overflow of the scaled float16 backward is the scale's fault, not the data's: the
            # backbone step is skipped and the scale halves; the class rows were updated from
            # float32 embeddings outside the scaled backward, so their update stands.
            self.loss_scale.update(finite)

        def apply():
            self.opt.learning_rate.assign(lr)
            self.opt.apply_gradients(zip(grads, variables))
            return tf.constant(True)

        def put_back():
            for v, value in zip(self._volatile, before):
                v.assign(value)
            return tf.constant(False)

        tf.cond(ok, apply, put_back)
        step.assign_add(tf.cast(ok, step.dtype))
        return out.loss, out.accuracy, ok, out.applied, norm, comm_s

    def _backbone_grads(self, tape, emb, variables, d_emb):
        """d(loss)/d(backbone variables); through a loss scale with mixed_float16."""
        if self.loss_scale is None:
            return tape.gradient(emb, variables, output_gradients=d_emb)
        scale = self.loss_scale.value
        grads = tape.gradient(emb, variables, output_gradients=d_emb * scale)
        return [tf.cast(g, tf.float32) / scale for g in grads]

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
        return ckpt.FCState(
            self.fc.row_range,
            self.fc.weight,
            self.fc_opt.state(),
            self.fc.sampler,
            self.fc.margin.state(),
            self.fc.rows_per_class,
        )

    def save(self, meta: dict | None = None) -> str:
        cfg = self.config
        info = {
            "num_classes": self.num_classes,
            "embedding_dim": cfg.model.embedding_dim,
            "config": cfg.to_dict(),
            **self.position.meta(),
            **(meta or {}),
        }
        t0 = time.perf_counter()
        path = ckpt.save(
            cfg.checkpoint_dir,
            self.step,
            self.comm,
            self.fc_state(),
            self.model.variables,
            self._optimizer_variables(),
            info,
            keep=cfg.checkpoint.keep,
        )
        self.last_checkpoint_seconds = time.perf_counter() - t0
        return path

    def _optimizer_variables(self) -> list[tf.Variable]:
        """The backbone optimizer's variables, and the loss scale's with mixed_float16."""
        scale = [] if self.loss_scale is None else [self.loss_scale.value, self.loss_scale.good_steps]
        return [*self.opt.variables, *scale]

    def resume_path(self) -> tuple[str | None, list[str]]:
        """The checkpoint to start from per `checkpoint.resume`, verified and checked against C and
        D, or None; and notes on corrupt checkpoints `auto` passed over (every worker says them).
        An explicit path never falls back: a corrupt one is an error."""
        cfg = self.config
        mode, notes = cfg.checkpoint.resume, []
        if mode == "none":
            return None, notes
        if mode == "auto":
            path, notes = ckpt.choose_resume(cfg.checkpoint_dir, self.comm, self.fc.row_range)
        else:
            path = mode
        if path is None:
            return None, notes
        manifest = ckpt.read_manifest(path)
        ckpt.check_compatible(path, manifest, self.num_classes, cfg.model.embedding_dim)
        if mode != "auto":
            ckpt.verify(path, self.fc.row_range, self.comm)
        return path, notes

    def restore(self, path: str, *, verified: bool = False) -> dict:
        """Load `path` (verified first unless `resume_path` just did) into every variable."""
        manifest = ckpt.restore(
            path, self.comm, self.fc_state(), self.model.variables, self._optimizer_variables(), verified=verified
        )
        self.fc.step.assign(int(manifest["step"]))
        self.position = restored_position(manifest)
        return manifest

    def embed(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """[N, H, W, 3] in [-1, 1] -> [N, D] raw embeddings (inference mode)."""
        out = [
            self.model(images[i : i + batch_size], training=False).numpy() for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros([0, self.config.model.embedding_dim], np.float32)


class LossScale(tf.Module):
    """Dynamic loss scaling for a float16 backbone (as Keras' LossScaleOptimizer): the scale
    halves after a step whose scaled gradient was not finite and doubles after `period` finite
    steps in a row."""

    def __init__(self, initial: float = 2.0**15, period: int = 2000):
        super().__init__(name="loss_scale")
        self.value = tf.Variable(initial, dtype=tf.float32, trainable=False, name="value")
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")
        self.period = int(period)

    def update(self, finite: tf.Tensor) -> None:
        """finite [] bool: was this step's unscaled gradient finite."""
        grow = finite & (self.good_steps + 1 >= self.period)
        self.value.assign(tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5) * self.value)
        self.good_steps.assign(tf.where(finite & ~grow, self.good_steps + 1, 0))


def restored_position(manifest: dict) -> Position:
    """A checkpoint's data position; one written before positions were recorded took a global
    batch per step (it did not skip, or counted skips as steps)."""
    if "samples" in manifest:
        return Position(int(manifest["samples"]), int(manifest.get("skipped_steps", 0)))
    train = manifest.get("config", {}).get("train", {})
    return Position(int(manifest["step"]) * int(train.get("batch_size", 0)) * int(manifest["world_size"]))
