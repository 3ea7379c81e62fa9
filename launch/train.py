"""`pfc train --config X.yaml [--set KEY=VALUE ...]`: the training run, on one worker or under
`horovodrun -np N`. Worker 0 prints progress and writes `RUN_DIR/log.jsonl` (one JSON object per
line: progress lines with step/epoch/loss/accuracy/lr/samples_per_sec, eval lines with per-set
results); every worker serves its metrics; checkpoints every `checkpoint.every` steps and at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
import typing

import tensorflow as tf  # launch.config loads it anyway

from launch import commands
from launch.config import Config


def add_parser(sub) -> None:
    p = commands.add(sub, "train")
    p.add_argument("--config", required=True, help="the experiment's YAML config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=0.05 (repeatable)",
    )
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import cluster
    from launch.config import load_config

    cfg = load_config(args.config, args.overrides)
    comm = cluster.init()
    train(cfg, comm)  # a failure raises: run_guarded turns it into one error line and exit 1
    return 0


class _Log:
    """Worker 0's terminal lines and JSON log; silent elsewhere."""

    def __init__(self, cfg: Config, rank: int):
        self.on = rank == 0
        self.file = None
        if self.on:
            os.makedirs(cfg.train.run_dir, exist_ok=True)
            with open(os.path.join(cfg.train.run_dir, "config.yaml"), "w") as f:
                f.write(cfg.to_yaml())
            self.file = open(os.path.join(cfg.train.run_dir, "log.jsonl"), "a")

    def say(self, msg: str) -> None:
        if self.on:
            print(msg, flush=True)

    def record(self, obj: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"time": round(time.time(), 3), **obj}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What this invocation trains, decided at its start from the config and the data position.

    The run's length is in optimizer steps (train.steps) or in samples (train.epochs: epochs times
    the samples of an epoch), never in steps of another world size's global batch, so a resume at
    another world size trains what is left.
    """

    start_step: int  # optimizer steps applied before this invocation
    total_steps: int  # the schedule's length (lr, λ): planned applied steps of the run
    start_samples: int  # the data position: global samples taken before this invocation
    batches: int | None  # train.epochs: batches left to take; None: until total_steps apply
    steps_per_epoch: int | None
    global_batch: int

    def done(self, step: int, samples: int) -> bool:
        if self.batches is None:
            return step >= self.total_steps
        return samples >= self.start_samples + self.batches * self.global_batch

    def first_batch(self) -> tuple[int, int]:
        """-> (epoch, batches already taken in it) of the data position."""
        if not self.steps_per_epoch:
            return 0, self.start_samples // self.global_batch
        epoch_samples = self.steps_per_epoch * self.global_batch
        return (self.start_samples // epoch_samples, self.start_samples % epoch_samples // self.global_batch)


def make_plan(
    cfg: Config, step: int, samples: int, global_batch: int, steps_per_epoch: int | None, resumed: str | None
) -> Plan:
    """The plan from a data position; a resume with nothing left (or less than nothing) to do is
    an error, never a silent zero-step run."""
    from launch.trainer import TrainingError

    t = cfg.train
    if t.steps is not None:
        total, batches, left = t.steps, None, t.steps - step
        want = f"train.steps={t.steps}"
    else:
        planned = round(t.epochs * steps_per_epoch * global_batch)
        batches = math.ceil((planned - samples) / global_batch)
        total, left = step + batches, batches
        want = f"train.epochs={t.epochs:g}: {planned:,} samples ({steps_per_epoch} steps of {global_batch} per epoch)"
    if left <= 0 and resumed:
        raise TrainingError(
            f"{resumed} is at step {step} after {samples:,} samples, and the run "
            f"plans {want}: nothing is left to train. Raise the length, or start "
            "a new run (checkpoint.resume: none)"
        )
    return Plan(step, total, samples, batches, steps_per_epoch, global_batch)


def train(cfg: Config, comm, *, data=None, steps_per_epoch: int | None = None, num_classes: int | None = None) -> dict:
    """Run (or resume) the experiment; -> {"step", "loss", "eval", "checkpoint"} of the end.

    data / steps_per_epoch / num_classes: a function `first batch -> iterator of this worker's
    batches (images, labels, epoch)` (batch k of the run: the data position over the global batch)
    for tests and embedding; None opens `cfg.data.train`. Worker 0 holds the run directory's lock
    for the whole run: a second trainer on it fails at once.
    """
    with _locked(cfg, comm):
        return _train(cfg, comm, data, steps_per_epoch, num_classes)


@contextlib.contextmanager
def _locked(cfg: Config, comm):
    """Worker 0 locks the run and checkpoint directories; every worker learns the verdict, so
    none waits forever for a worker 0 that stopped."""
    from launch import run_lock
    from launch.trainer import TrainingError

    with contextlib.ExitStack() as stack:
        error = None
        if comm.rank == 0:
            try:
                stack.enter_context(run_lock.hold([cfg.train.run_dir, cfg.checkpoint_dir]))
            except run_lock.RunLockError as e:
                error = e
        failed = comm.size > 1 and float(comm.allreduce_max(tf.constant(float(error is not None))))
        if error is not None:
            raise error
        if failed:
            raise TrainingError(f"worker 0 could not lock {cfg.train.run_dir} (its output says why)")
        yield


def _train(cfg: Config, comm, data, steps_per_epoch, num_classes) -> dict:
    from launch.trainer import Trainer

    log = _Log(cfg, comm.rank)
    pipe, augment = None, None
    if data is None:  # what the data holds, from its manifest: the pipeline is opened once, below
        steps_per_epoch, num_classes = _data_shape(cfg, comm)
        augment = _augmenter(cfg, comm)
    trainer = Trainer(cfg, comm, num_classes=num_classes, augment=augment)
    if comm.rank == 0:
        _remove_partial(cfg.checkpoint_dir, log)
    resume = _resume(trainer, log)
    plan = make_plan(cfg, trainer.step, trainer.position.samples, trainer.global_batch, steps_per_epoch, resume)
    trainer.set_total_steps(plan.total_steps)
    epoch, skip = plan.first_batch()
    if data is not None:
        batches = data(plan.start_samples // plan.global_batch)
    else:  # the reader starts at the position's epoch and skips the batches already taken in it
        pipe = _open(cfg, comm, start_epoch=epoch)
        batches = iter(pipe.dataset.skip(skip))
    loop = _Loop(cfg, comm, trainer, log, plan, pipe, last_ckpt=resume)
    try:
        with _on_sigterm(loop.stopped):
            loop.run(batches)
            return loop.finish()
    except tf.errors.OpError as e:
        raise loop.peer_lost(e) from None
    finally:
        loop.close()


@contextlib.contextmanager
def _on_sigterm(message: typing.Callable[[], str]):
    """A worker ended by SIGTERM (the launcher ends every worker when one fails; a cancelled job)
    says so, with `message()`, and exits 143. The signal usually finds the main thread blocked in
    a collective whose peer is gone, where no Python handler would run: Python's own C handler
    writes the signal to a wakeup socket at once, and a watcher thread does the talking."""
    import signal
    import socket
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)

    def watch():
        if reader.recv(1):  # b"" when the run ended and the socket closed
            print(f"pfc train: error: {message()}", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    old_fd = signal.set_wakeup_fd(writer.fileno())
    threading.Thread(target=watch, daemon=True, name="pfc-sigterm").start()
    yield  # on an exception the watcher stays armed: the launcher's SIGTERM often lands while the
    # error is being reported, and would otherwise end the worker before its line is out
    signal.set_wakeup_fd(old_fd)
    signal.signal(signal.SIGTERM, previous)
    writer.close()
    reader.shutdown(socket.SHUT_RDWR)


def _remove_partial(directory: str, log) -> None:
    """Partial checkpoints of crashed runs (this run holds the lock: nobody else writes them)."""
    from launch import checkpoint as ckpt

    try:
        for stale in ckpt.remove_partial(directory):
            log.say(f"removed {stale}: a partial checkpoint of an interrupted run")
    except ckpt.CheckpointError as e:  # it only takes space: say so and train on
        log.say(f"warning: {e}")


def _resume(trainer, log) -> str | None:
    from launch import checkpoint as ckpt

    comm = trainer.comm
    resume, notes = trainer.resume_path()  # C and D checked before any work
    for note in notes:  # every worker says it: each one may read other files
        print(f"worker {comm.rank}: {note}", flush=True)
    if resume:
        trainer.restore(resume, verified=True)
        written = ckpt.read_manifest(resume)["world_size"]
        log.say(
            f"resumed from {resume} at step {trainer.step}, {trainer.position.samples:,} samples "
            f"(written by {written} workers, now {comm.size})"
        )
        log.record({"event": "resume", "step": trainer.step, "from": resume, "samples": trainer.position.samples})
    return resume


def _next(batches):
    """The next batch; a check of the reader that failed becomes a DataError naming the file,
    the record and the config key, without TensorFlow's wrapping."""
    try:
        return next(batches)
    except tf.errors.OpError as e:
        from pipelines.reader import reader_error
        from pipelines.schema import DataError

        message = reader_error(e)
        if message is None:
            raise
        raise DataError(
            message.replace("read with skip_corrupt=True", "set data.skip_corrupt: true to skip and count such records")
        ) from None


@dataclasses.dataclass
class _Duty:
    """Something the loop does every `every` applied steps (0: never), and at the end if `final`."""

    every: int
    run: typing.Callable[[int], None]
    final: bool


class _Loop:
    """The training loop's state and its periodic duties (progress, checkpoint, evaluation)."""

    def __init__(self, cfg: Config, comm, trainer, log: _Log, plan: Plan, pipe, last_ckpt):
        from launch import evaluate

        self.cfg, self.comm, self.trainer, self.log, self.plan, self.pipe = cfg, comm, trainer, log, plan, pipe
        self.last_ckpt, self.saved_step = last_ckpt, (plan.start_step if last_ckpt else None)
        self.sets = evaluate.load_sets(cfg.eval_sets(), cfg.data.image_size) if comm.rank == 0 else {}
        self.metrics = _metrics(cfg, comm)
        self.result, self.eval_results, self.epoch, self.corrupt_seen = None, {}, 0, 0
        self.window_t = time.perf_counter()
        self.window_samples = 0
        self.first = None  # (time, step) after the first step: the ETA leaves its compilation out
        self.steps = plan.start_step  # applied steps, as a plain int for the SIGTERM watcher
        self.duties = [
            _Duty(cfg.train.log_every, self.progress, True),
            _Duty(cfg.checkpoint.every, self.checkpoint, False),
            _Duty(cfg.eval.interval, self.evaluate, False),
        ]
        self._announce()

    def _announce(self) -> None:
        t, fc, p = self.trainer, self.trainer.fc, self.plan
        if self.metrics is not None:
            self.metrics.set_fc_shard(
                fc.num_local_classes,
                sum(v.shape.num_elements() * v.dtype.size for v in (fc.weight, *t.fc_opt.state().values())),
            )
        self.log.say(
            f"training C={t.num_classes:,} D={self.cfg.model.embedding_dim} on {self.comm.size} "
            f"worker(s), global batch {p.global_batch}, steps {p.start_step}..{p.total_steps}"
            + (f", {p.steps_per_epoch} per epoch" if p.steps_per_epoch else "")
        )

    def run(self, batches) -> None:
        t = self.trainer
        while not self.plan.done(t.step, t.position.samples):
            t0 = time.perf_counter()
            images, labels, self.epoch = _next(batches)
            t1 = time.perf_counter()
            self.result = t.train_step(images, labels)
            self.observe(t0, t1, time.perf_counter())
            self.steps = t.step
            self.first = self.first or (time.perf_counter(), t.step)
            if not self.result.applied:
                if not self.result.overflow:  # an overflow only lowered the loss scale
                    self.skipped()
                continue
            for duty in self.duties:
                if duty.every and t.step % duty.every == 0 and not self._last_step():
                    duty.run(t.step)

    def _last_step(self) -> bool:
        return self.plan.done(self.trainer.step, self.trainer.position.samples)

    def finish(self) -> dict:
        step = self.trainer.step
        for duty in self.duties:
            if duty.final:
                duty.run(step)
        if self.saved_step != step:
            self.checkpoint(step)
        self.evaluate(step)
        return {
            "step": step,
            "loss": self.result.loss if self.result else None,
            "eval": self.eval_results,
            "checkpoint": self.last_ckpt,
        }

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.log.close()

    # --- per batch -------------------------------------------------------------------------------
    def observe(self, t0: float, t1: float, t2: float) -> None:
        from partitioned_fc.margins import current_lambda

        r, step = self.result, self.trainer.step
        self.window_samples += self.plan.global_batch
        if self.metrics is None:
            return
        self._count_corrupt()
        self.metrics.observe_step(
            step=step,
            samples=self.cfg.train.batch_size,
            loss=r.loss,
            accuracy=r.accuracy,
            lr=float(self.trainer.learning_rate(step)),
            lam=current_lambda(self.trainer.fc.margin, step),
            epoch=self.epochs_done(),
            step_seconds=t2 - t0,
            data_wait_seconds=t1 - t0,
            comm_seconds=r.comm_seconds,
        )

    def _count_corrupt(self) -> None:
        corrupt = self._corrupt_records()
        if corrupt > self.corrupt_seen:
            self.metrics.count_corrupt(corrupt - self.corrupt_seen)
            self.corrupt_seen = corrupt

    def skipped(self) -> None:
        from launch.trainer import TrainingError

        cfg, p, r, step = self.cfg.train, self.trainer.position, self.result, self.trainer.step
        if self.metrics is not None:
            self.metrics.count_nonfinite(loss=r.loss)
        if cfg.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss ({r.loss}) or gradient at step {step}: stopping. Nothing "
                f"of this step was applied; the last checkpoint ({self.last_ckpt or 'none yet'}) is kept. "
                "Lower optim.lr, set optim.clip_norm, or set train.nonfinite: skip"
            )
        self.log.say(f"step {step}: non-finite loss ({r.loss}), step skipped ({p.skipped} so far)")
        limit = math.ceil(cfg.max_skipped_share * self.plan.total_steps)
        if p.skipped_in_a_row > cfg.max_skipped_in_a_row or p.skipped > limit:
            raise TrainingError(
                f"{p.skipped} steps skipped ({p.skipped_in_a_row} in a row) at step {step}: more than "
                f"train.max_skipped_in_a_row={cfg.max_skipped_in_a_row} in a row or "
                f"train.max_skipped_share={cfg.max_skipped_share:g} of {self.plan.total_steps} steps "
                f"({limit}); stopping. The last checkpoint ({self.last_ckpt or 'none yet'}) is kept. "
                "Lower optim.lr, set optim.clip_norm, or check the data"
            )

    # --- duties ----------------------------------------------------------------------------------
    def progress(self, step: int) -> None:
        r, t = self.result, self.trainer
        if r is None:
            return
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_t, 1e-9)
        self.window_t, self.window_samples = now, 0
        lr = float(t.learning_rate(step))
        corrupt = self._corrupt_records_all() if self.cfg.data.skip_corrupt else 0
        self.log.say(
            f"step {step}/{self.plan.total_steps} epoch {int(self.epoch)} | loss {r.loss:.4f} "
            f"acc {r.accuracy:.3f} | lr {lr:.4g} | {rate:,.1f} samples/s | ETA {self._eta(step, now)}"
            + (f" | {corrupt:,} corrupt records skipped" if corrupt else "")
        )
        self.log.record(
            {
                "step": step,
                "epoch": int(self.epoch),
                "loss": r.loss,
                "accuracy": r.accuracy,
                "lr": lr,
                "samples_per_sec": round(rate, 2),
                "grad_norm": r.grad_norm,
                "nonfinite_steps": t.position.skipped,
                "samples": t.position.samples,
                **({"corrupt_records": corrupt} if self.cfg.data.skip_corrupt else {}),
            }
        )

    def _eta(self, step: int, now: float) -> str:
        """Time left at the pace of the steps after the first (which includes compiling)."""
        t0, step0 = self.first
        if step <= step0:
            return "?"
        return _eta((self.plan.total_steps - step) * (now - t0) / (step - step0))

    def epochs_done(self) -> float:
        """Epochs of data taken so far (fractional); the reader's epoch number without a plan."""
        p = self.plan
        if not p.steps_per_epoch:
            return float(self.epoch)
        return self.trainer.position.samples / (p.steps_per_epoch * p.global_batch)

    def _corrupt_records_all(self) -> int:
        """Records skipped as corrupt so far by every worker's reader (every worker calls this)."""
        mine = tf.constant(float(self._corrupt_records()))
        return int(self.comm.allreduce_sum(mine)) if self.comm.size > 1 else int(mine)

    def _corrupt_records(self) -> int:
        """Records this worker's reader skipped as corrupt so far (data.skip_corrupt: true)."""
        return int(self.pipe.corrupt_records.numpy()) if self.pipe is not None else 0

    def checkpoint(self, step: int) -> None:
        t = self.trainer
        self.last_ckpt = t.save({"epoch": int(self.epoch)})
        self.saved_step = step
        self.log.say(f"checkpoint {self.last_ckpt} ({t.last_checkpoint_seconds:.1f}s)")
        if self.metrics is not None:
            self.metrics.observe_checkpoint(step, t.last_checkpoint_seconds)

    def evaluate(self, step: int) -> None:
        """Worker 0 evaluates (the backbone is replicated); the others wait."""
        from launch import evaluate

        cfg, results = self.cfg, {}
        if self.comm.rank == 0 and self.sets:
            model = self.trainer.model
            results = evaluate.evaluate(
                lambda x: model(x, training=False).numpy(),
                self.sets,
                batch_size=cfg.eval.batch_size,
                folds=cfg.eval.folds,
                far=cfg.eval.far,
                flip=cfg.eval.flip,
            )
            self.log.say(f"eval step {step}: {evaluate.summary_line(results, cfg.eval.far)}")
            # the report's schema names TAR by its FAR
            self.log.record(
                {
                    "step": step,
                    "eval": {name: {**r, f"tar@far={cfg.eval.far:g}": r["tar"]} for name, r in results.items()},
                }
            )
            if self.metrics is not None:
                for name, r in results.items():
                    tar = {cfg.eval.far: r["tar"]} if r["tar"] is not None else {}
                    self.metrics.observe_eval(name, r["accuracy"], tar)
        self.comm.barrier()
        self.eval_results = results

    def _resume_note(self) -> str:
        return "A resume (checkpoint.resume: auto) starts from " + (
            self.last_ckpt or "the beginning (no checkpoint yet)"
        )

    def stopped(self) -> str:
        """What a worker ended by SIGTERM says (from the watcher thread: no TensorFlow calls)."""
        return (
            f"worker {self.comm.rank}: terminated (SIGTERM) at step {self.steps}: the launcher "
            "ends every worker when one fails (its output names the worker), or the job was "
            f"cancelled. {self._resume_note()}"
        )

    def peer_lost(self, error: Exception) -> Exception:
        """A collective failed: a peer stopped (killed, crashed, lost its host) or this worker's
        own step failed. Say which, and what a resume will start from."""
        from launch.trainer import TrainingError

        if not self.comm.peer_lost(error):
            return error
        step = self.trainer.step
        return TrainingError(
            f"worker {self.comm.rank}: lost contact with a peer worker at step {step} (it exited, was "
            f"killed or its host went away; the launcher's output names it): the job cannot go on. "
            f"{self._resume_note()}"
        )


def _data_shape(cfg: Config, comm) -> tuple[int, int]:
    """-> (batches per epoch, classes) of the training data, read from its manifest."""
    from launch.trainer import TrainingError
    from pipelines import reader

    manifest, plan = reader.worker_plan(cfg.data.train[0], cfg.train.batch_size, comm.rank, comm.size)
    if cfg.data.num_classes is not None and cfg.data.num_classes != manifest.num_classes:
        raise TrainingError(
            f"data.num_classes is {cfg.data.num_classes} but the dataset "
            f"{cfg.data.train[0]} has {manifest.num_classes} classes"
        )
    return plan.steps_per_epoch, manifest.num_classes


def _augmenter(cfg: Config, comm):
    """This worker's training augmentation, (uint8 images, global step) -> float32, as the
    pipeline's `augment` applies it (run inside the compiled step)."""
    from pipelines import reader

    seed = reader.worker_seed(cfg.seed, comm.rank)

    def augment(images, step):
        return reader.augment(images, seed, step, flip=cfg.data.flip)

    return augment


def _open(cfg: Config, comm, start_epoch: int):
    from pipelines.reader import open_dataset
    from pipelines.threads import cores_per_worker

    return open_dataset(
        cfg.data.train[0],
        cfg.train.batch_size,
        rank=comm.rank,
        size=comm.size,
        image_size=(cfg.data.image_size, cfg.data.image_size),
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.seed,
        start_epoch=start_epoch,
        skip_corrupt=cfg.data.skip_corrupt,
        flip=cfg.data.flip,
        threads=cores_per_worker(comm.local_size),
    )


def _metrics(cfg: Config, comm):
    if not cfg.monitoring.port and not cfg.monitoring.pushgateway:
        return None
    from launch.version import version
    from monitoring.exporter import TrainingMetrics

    return TrainingMetrics(
        job=cfg.monitoring.job,
        rank=comm.rank,
        local_rank=comm.local_rank,
        world_size=comm.size,
        bind=cfg.monitoring.bind,
        base_port=cfg.monitoring.port,
        pushgateway=cfg.monitoring.pushgateway,
        version=version(),
    )
