"""Per-worker Prometheus metrics of a training run: served on /metrics and/or pushed to a Pushgateway.

Every series carries the constant labels `job` (the run's name), `rank` (global Horovod rank) and `host`,
so one query tells workers and runs apart. Metrics live in the exporter's own CollectorRegistry: nothing
else in the process (libraries, the default registry) leaks into what a worker exposes.

The training loop calls `observe_step` once per step with plain Python numbers it already has; each call
only updates in-memory values under prometheus-client's locks (a few microseconds, see
docs/monitoring.md). Serving and pushing happen on background threads.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlparse

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, push_to_gateway
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)

LABELS = ("job", "rank", "host")

# Seconds, 1 ms .. 10 min: a step is milliseconds on a GPU and seconds to minutes with millions of
# classes on CPUs; waits and collectives span the same range.
STEP_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Checkpoints: 100 ms (a small model on local disk) .. 30 min (a large FC to object storage).
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class PortInUseError(RuntimeError):
    """The metrics port of this worker is already taken (another job, or two workers mapped to one port)."""


def resident_memory_bytes() -> float:
    """This process' resident set size in bytes (Linux /proc; read at scrape time, not per step)."""
    with open("/proc/self/statm") as f:
        return float(int(f.read().split()[1]) * _PAGE_SIZE)


class TrainingMetrics:
    """The metrics of one worker.

    Args:
      job: the run's name, the `job` label of every series (and the Pushgateway job).
      rank, local_rank, world_size: the worker's place in the Horovod job; the port is
        `base_port + local_rank` so workers sharing a host do not collide.
      host: the `host` label; default `socket.gethostname()`.
      bind, base_port: HTTP endpoint; `base_port=0` serves nothing.
      pushgateway: e.g. "http://gateway:9091"; pushed every `push_interval_s` and at `close()`.
      version: the software version shown in `pfc_info`.

    Raises:
      PortInUseError: the port is taken (raised here, at start-up, never mid-run).
      RuntimeError: the address cannot be bound for another reason (e.g. not an address of this host).
      ValueError: a port outside 1..65535 or a pushgateway URL that is not http(s)://host[:port].
    """

    def __init__(
        self,
        *,
        job: str = "pfc",
        rank: int = 0,
        local_rank: int = 0,
        world_size: int = 1,
        host: str | None = None,
        bind: str = "0.0.0.0",
        base_port: int = 0,
        pushgateway: str | None = None,
        push_interval_s: float = 30.0,
        version: str = "unknown",
    ) -> None:
        if base_port < 0:
            raise ValueError(f"monitoring base_port must be >= 0 (0 disables), got {base_port}")
        if pushgateway is not None:
            parsed = urlparse(pushgateway)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"monitoring pushgateway must be an http(s)://host[:port] URL, got {pushgateway!r}")
            if push_interval_s <= 0:
                raise ValueError(f"monitoring push_interval_s must be > 0, got {push_interval_s}")
        self.job, self.rank, self.host, self.bind = job, int(rank), host or socket.gethostname(), bind
        self.registry = CollectorRegistry(auto_describe=True)
        self._define(version, world_size, local_rank)

        self.port: int | None = None
        self._server = self._server_thread = None
        if base_port:
            self.port = base_port + local_rank
            if self.port > 65535:
                raise ValueError(
                    f"monitoring port base_port {base_port} + local_rank {local_rank} = {self.port} is above 65535"
                )
            try:
                self._server, self._server_thread = start_http_server(self.port, addr=bind, registry=self.registry)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        f"metrics port {self.port} on {bind} is already in use (base_port {base_port} + "
                        f"local_rank {local_rank}); choose another monitoring base_port, or 0 to disable"
                    ) from e
                raise RuntimeError(f"cannot serve metrics on {bind}:{self.port}: {e}") from e

        self._gateway, self._push_interval = pushgateway, push_interval_s
        self._push_failed_logged = False
        self._stop = threading.Event()
        self._pusher = None
        if pushgateway:
            self._pusher = threading.Thread(target=self._push_loop, name="pfc-metrics-push", daemon=True)
            self._pusher.start()

    def _define(self, version: str, world_size: int, local_rank: int) -> None:
        r, lv = self.registry, (self.job, str(self.rank), self.host)

        def counter(name, doc):
            return Counter(name, doc, LABELS, registry=r).labels(*lv)

        def gauge(name, doc):
            return Gauge(name, doc, LABELS, registry=r).labels(*lv)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=r).labels(*lv)

        Info("pfc", "Static facts about this worker (value 1).", LABELS, registry=r).labels(*lv).info(
            {"version": str(version), "world_size": str(world_size), "local_rank": str(local_rank)}
        )
        gauge("pfc_start_time_seconds", "Unix time at which this worker's exporter started.").set(time.time())

        self._samples = counter("pfc_samples", "Training samples processed by this worker.")
        self._steps = counter("pfc_steps", "Training steps completed by this worker.")
        self._global_step = gauge("pfc_global_step", "The training step just completed (survives restarts).")
        self._last_step_time = gauge(
            "pfc_last_step_timestamp_seconds", "Unix time of the last completed step (exporter start before the first)."
        )
        self._last_step_time.set(time.time())
        self._loss = gauge("pfc_loss", "Training loss of the last step (NaN/Inf if it was not finite).")
        self._accuracy = gauge("pfc_batch_accuracy", "Top-1 accuracy of the last training batch, 0..1.")
        self._lr = gauge("pfc_learning_rate", "Learning rate of the last step.")
        self._lam = gauge("pfc_margin_lambda", "Margin lambda (SphereFace annealing) of the last step.")
        self._epoch = gauge("pfc_epoch", "Current epoch (fractional: steps done / steps per epoch).")
        self._step_s = histogram("pfc_step_seconds", "Wall time of one training step.", STEP_BUCKETS)
        self._wait_s = histogram("pfc_data_wait_seconds", "Time a step waited for its input batch.", STEP_BUCKETS)
        self._comm_s = histogram(
            "pfc_collective_seconds",
            "Time a step spent in collectives (allreduce/allgather), waits for slower workers included.",
            STEP_BUCKETS,
        )
        self._ckpt_s = histogram("pfc_checkpoint_write_seconds", "Time to write one checkpoint.", CHECKPOINT_BUCKETS)
        self._ckpt_step = gauge("pfc_last_checkpoint_step", "Step of the last checkpoint written (-1: none yet).")
        self._ckpt_step.set(-1)
        self._ckpt_time = gauge(
            "pfc_last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint written (exporter start before the first).",
        )
        self._ckpt_time.set(time.time())
        self._corrupt = counter("pfc_corrupt_records_skipped", "Input records skipped as corrupt.")
        self._nonfinite = counter("pfc_nonfinite_steps", "Steps whose loss or gradients were not finite.")
        self._push_failures = counter("pfc_push_failures", "Failed pushes to the Pushgateway.")
        gauge("pfc_resident_memory_bytes", "Resident memory (RSS) of this worker process.").set_function(
            resident_memory_bytes
        )
        self._fc_bytes = gauge("pfc_fc_shard_bytes", "Bytes of this worker's FC shard (weights + optimizer slots).")
        self._fc_classes = gauge("pfc_fc_shard_classes", "Classes (FC rows) owned by this worker.")
        self._eval = Gauge(
            "pfc_verification_accuracy",
            "Verification accuracy per evaluation set, 0..1.",
            LABELS + ("set",),
            registry=r,
        )
        self._tar = Gauge(
            "pfc_verification_tar",
            "Verification true-accept rate at a false-accept rate.",
            LABELS + ("set", "far"),
            registry=r,
        )

    # ---- called by the training loop -------------------------------------------------------------

    def observe_step(
        self,
        *,
        step: int,
        samples: int,
        loss: float,
        accuracy: float,
        lr: float,
        lam: float,
        epoch: float,
        step_seconds: float,
        data_wait_seconds: float = 0.0,
        comm_seconds: float = 0.0,
    ) -> None:
        """Record one completed step. Pass Python numbers (fetch tensors once, for logging and this)."""
        self._samples.inc(samples)
        self._steps.inc()
        self._global_step.set(step)
        self._last_step_time.set(time.time())
        self._loss.set(loss)
        self._accuracy.set(accuracy)
        self._lr.set(lr)
        self._lam.set(lam)
        self._epoch.set(epoch)
        self._step_s.observe(step_seconds)
        self._wait_s.observe(data_wait_seconds)
        self._comm_s.observe(comm_seconds)

    def observe_checkpoint(self, step: int, seconds: float, timestamp: float | None = None) -> None:
        """A checkpoint of `step` was written in `seconds`, finishing at `timestamp` (default now)."""
        self._ckpt_s.observe(seconds)
        self._ckpt_step.set(step)
        self._ckpt_time.set(time.time() if timestamp is None else timestamp)

    def observe_eval(self, set_name: str, accuracy: float, tar_at_far: Mapping[float, float] | None = None) -> None:
        """Verification result on one set: accuracy 0..1 and optionally {far: tar}."""
        self._eval.labels(self.job, str(self.rank), self.host, set_name).set(accuracy)
        for far, tar in (tar_at_far or {}).items():
            self._tar.labels(self.job, str(self.rank), self.host, set_name, f"{far:g}").set(tar)

    def count_corrupt(self, n: int = 1) -> None:
        self._corrupt.inc(n)

    def count_nonfinite(self, n: int = 1, loss: float = math.nan) -> None:
        """A step was not finite (and skipped); `pfc_loss` shows the offending value."""
        self._nonfinite.inc(n)
        self._loss.set(loss)

    def set_fc_shard(self, classes: int, nbytes: int) -> None:
        self._fc_classes.set(classes)
        self._fc_bytes.set(nbytes)

    # ---- pushing and shutdown --------------------------------------------------------------------

    def push(self) -> bool:
        """Push all metrics now (replacing this worker's group). Returns False after logging a failure."""
        try:
            push_to_gateway(
                self._gateway,
                job=self.job,
                registry=self.registry,
                grouping_key={"rank": str(self.rank), "host": self.host},
                timeout=10,
            )
            return True
        except OSError as e:  # URLError is an OSError: an unreachable gateway must not stop training
            self._push_failures.inc()
            if not self._push_failed_logged:
                log.warning("metrics push to %s failed (training goes on; logged once): %s", self._gateway, e)
                self._push_failed_logged = True
            return False

    def _push_loop(self) -> None:
        while not self._stop.wait(self._push_interval):
            self.push()

    def close(self) -> None:
        """Final push (if a Pushgateway is set), then stop the HTTP server. Safe to call twice."""
        if self._pusher is not None:
            self._stop.set()
            self._pusher.join()
            self._pusher = None
            self.push()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server_thread.join()
            self._server = None

    def __enter__(self) -> TrainingMetrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
