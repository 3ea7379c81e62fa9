"""`pfc train --config X.yaml [--set KEY=VALUE ...]`: the training run, on one worker or under
`horovodrun -np N`. Worker 0 prints progress and writes `RUN_DIR/log.jsonl` (one JSON object per
line: progress lines with step/epoch/loss/accuracy/lr/samples_per_sec, eval lines with per-set
results); every worker serves its metrics; checkpoints every `checkpoint.every` steps and at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from launch.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train (one worker, or every worker under horovodrun)")
    p.add_argument("--config", required=True, help="the experiment's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=0.05 (repeatable)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    import cluster
    from launch.config import load_config

    cfg = load_config(args.config, args.overrides)
    comm = cluster.init()
    summary = train(cfg, comm)
    return 0 if summary is not None else 1


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


def train(cfg: Config, comm, *, data=None, steps_per_epoch: int | None = None,
          num_classes: int | None = None) -> dict:
    """Run (or resume) the experiment; -> {"step", "loss", "eval"} of the end.

    data / steps_per_epoch / num_classes: a function `first step -> iterator of this worker's
    batches (images, labels, epoch)` for tests and embedding; None opens `cfg.data.train`.
    """
    from launch import checkpoint as ckpt
    from launch import evaluate
    from launch.trainer import Trainer, TrainingError
    from partitioned_fc.margins import current_lambda

    log = _Log(cfg, comm.rank)
    pipe = None
    if data is None:
        pipe = _open(cfg, comm, start_epoch=0)
        steps_per_epoch = pipe.steps_per_epoch
        num_classes = pipe.manifest.num_classes
        if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
            raise TrainingError(f"data.num_classes is {cfg.data.num_classes} but the dataset "
                                f"{cfg.data.train[0]} has {num_classes} classes")
    trainer = Trainer(cfg, comm, num_classes=num_classes,
                      augment=pipe.augment if pipe is not None else None)
    total = cfg.train.steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    trainer.set_total_steps(total)
    resume = trainer.resume_path()  # C and D checked before any work
    if resume:
        trainer.restore(resume)
        log.say(f"resumed from {resume} at step {trainer.step} "
                f"(written by {ckpt.read_manifest(resume)['world_size']} workers, now {comm.size})")
    start = trainer.step
    if data is not None:
        data = data(start)
    else:
        # The reader starts at the epoch of `start` and skips the batches already taken in it.
        pipe = _open(cfg, comm, start_epoch=start // steps_per_epoch)
        data = iter(pipe.dataset.skip(start % steps_per_epoch))
    sets = evaluate.load_sets(cfg.eval_sets(), cfg.data.image_size) if comm.rank == 0 else {}
    metrics = _metrics(cfg, comm)
    if metrics is not None:
        metrics.set_fc_shard(trainer.fc.num_local_classes,
                             sum(v.shape.num_elements() * v.dtype.size
                                 for v in (trainer.fc.weight, *trainer.fc_opt.state().values())))
    global_batch = cfg.train.batch_size * comm.size
    log.say(f"training C={trainer.num_classes:,} D={cfg.model.embedding_dim} on {comm.size} worker(s), "
            f"global batch {global_batch}, steps {start}..{total}"
            + (f", {steps_per_epoch} per epoch" if steps_per_epoch else ""))
    last_ckpt = resume
    last_saved_step = start if resume else None
    result, eval_results = None, {}
    nonfinite = 0
    corrupt_seen = 0
    t_start, samples_done = time.perf_counter(), 0
    window_t, window_samples = time.perf_counter(), 0
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            images, labels, epoch = next(data)
            t1 = time.perf_counter()
            result = trainer.train_step(images, labels)
            t2 = time.perf_counter()
            samples_done += global_batch
            window_samples += global_batch
            done = step + 1
            if not result.applied:
                nonfinite += 1
                if metrics is not None:
                    metrics.count_nonfinite(loss=result.loss)
                if cfg.train.nonfinite == "stop":
                    raise TrainingError(
                        f"non-finite loss ({result.loss}) or gradient at step {step}: stopping. Nothing "
                        f"of this step was applied; the last checkpoint ({last_ckpt or 'none yet'}) is kept. "
                        "Lower optim.lr, set optim.clip_norm, or set train.nonfinite: skip")
                log.say(f"step {step}: non-finite loss ({result.loss}), step skipped ({nonfinite} so far)")
            lr = float(trainer.learning_rate(step))
            if metrics is not None:
                if pipe is not None:
                    corrupt = int(pipe.corrupt_records.numpy())
                    if corrupt > corrupt_seen:
                        metrics.count_corrupt(corrupt - corrupt_seen)
                        corrupt_seen = corrupt
                metrics.observe_step(step=done, samples=cfg.train.batch_size, loss=result.loss,
                                     accuracy=result.accuracy, lr=lr,
                                     lam=current_lambda(trainer.fc.margin, step),
                                     epoch=float(epoch), step_seconds=t2 - t0, data_wait_seconds=t1 - t0,
                                     comm_seconds=result.comm_seconds)
            if done % cfg.train.log_every == 0 or done == total:
                now = time.perf_counter()
                rate = window_samples / max(now - window_t, 1e-9)
                window_t, window_samples = now, 0
                eta = (total - done) * (now - t_start) / max(done - start, 1)
                log.say(f"step {done}/{total} epoch {int(epoch)} | loss {result.loss:.4f} "
                        f"acc {result.accuracy:.3f} | lr {lr:.4g} | {rate:,.1f} samples/s | ETA {_eta(eta)}")
                log.record({"step": done, "epoch": int(epoch), "loss": result.loss,
                            "accuracy": result.accuracy, "lr": lr, "samples_per_sec": round(rate, 2),
                            "grad_norm": result.grad_norm, "nonfinite_steps": nonfinite})
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != total:
                last_ckpt, last_saved_step = _save(trainer, metrics, log, epoch), done
            if cfg.eval.interval and done % cfg.eval.interval == 0 and done != total:
                eval_results = _evaluate(trainer, sets, cfg, comm, metrics, log, done)
        if last_saved_step != total:
            last_ckpt = _save(trainer, metrics, log, None)
        eval_results = _evaluate(trainer, sets, cfg, comm, metrics, log, total)
    finally:
        if metrics is not None:
            metrics.close()
        log.close()
    return {"step": total, "loss": result.loss if result else None, "eval": eval_results,
            "checkpoint": last_ckpt}


def _open(cfg: Config, comm, start_epoch: int):
    from pipelines.reader import open_dataset
    from pipelines.threads import cores_per_worker

    if len(cfg.data.train) != 1:
        raise SystemExit(f"data.train: one dataset (a directory, manifest, shard file or glob) is "
                         f"supported, got {len(cfg.data.train)}: {cfg.data.train}")
    return open_dataset(cfg.data.train[0], cfg.train.batch_size, rank=comm.rank, size=comm.size,
                        image_size=(cfg.data.image_size, cfg.data.image_size),
                        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, start_epoch=start_epoch,
                        skip_corrupt=cfg.data.skip_corrupt, flip=cfg.data.flip,
                        threads=cores_per_worker(comm.local_size))


def _metrics(cfg: Config, comm):
    if not cfg.monitoring.port and not cfg.monitoring.pushgateway:
        return None
    from launch.cli import version
    from monitoring.exporter import TrainingMetrics

    return TrainingMetrics(job=cfg.monitoring.job, rank=comm.rank, local_rank=comm.local_rank,
                           world_size=comm.size, bind=cfg.monitoring.bind, base_port=cfg.monitoring.port,
                           pushgateway=cfg.monitoring.pushgateway, version=version())


def _save(trainer, metrics, log, epoch) -> str:
    path = trainer.save({"epoch": None if epoch is None else int(epoch)})
    log.say(f"checkpoint {path} ({trainer.last_checkpoint_seconds:.1f}s)")
    if metrics is not None:
        metrics.observe_checkpoint(trainer.step, trainer.last_checkpoint_seconds)
    return path


def _evaluate(trainer, sets, cfg: Config, comm, metrics, log, step) -> dict:
    """Worker 0 evaluates (the backbone is replicated); the others wait."""
    from launch import evaluate

    results = {}
    if comm.rank == 0 and sets:
        results = evaluate.evaluate(lambda x: trainer.model(x, training=False).numpy(), sets,
                                    batch_size=cfg.eval.batch_size, folds=cfg.eval.folds,
                                    far=cfg.eval.far, flip=cfg.eval.flip)
        log.say(f"eval step {step}: {evaluate.summary_line(results, cfg.eval.far)}")
        # the report's schema names TAR by its FAR
        log.record({"step": step, "eval": {name: {**r, f"tar@far={cfg.eval.far:g}": r["tar"]}
                                           for name, r in results.items()}})
        if metrics is not None:
            for name, r in results.items():
                metrics.observe_eval(name, r["accuracy"], {cfg.eval.far: r["tar"]})
    comm.barrier()
    return results
