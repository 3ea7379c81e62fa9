"""A real Prometheus server on 127.0.0.1 running the shipped scrape config and rules against given targets.

For tests and for looking at a local run: the shipped `prometheus/prometheus.yml` is rewritten to scrape
`targets` (host:port of each worker) at a short interval, with `rules.yml` loaded, and the server's HTTP
API is queried. Storage is a temporary directory removed by `stop()`.

    with LocalPrometheus(["127.0.0.1:9100", "127.0.0.1:9101"]) as prom:
        prom.wait_until('count(pfc_steps_total) == 2')
        prom.query('pfc_steps_total')   # [{"metric": {...}, "value": [t, "12"]}, ...]
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

ASSETS = Path(__file__).resolve().parent / "prometheus"
SHIPPED_CONFIG = ASSETS / "prometheus.yml"
SCRAPE_JOB = "pfc"


class PrometheusError(RuntimeError):
    """The server did not start, a query failed, or a condition was not met in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(
    targets: Sequence[str], scrape_interval: str, evaluation_interval: str, config: Path = SHIPPED_CONFIG
) -> dict:
    """The shipped config with the `pfc` job's targets replaced and rule files made absolute."""
    cfg = yaml.safe_load(config.read_text())
    cfg["global"].update(scrape_interval=scrape_interval, evaluation_interval=evaluation_interval)
    cfg["rule_files"] = [str((config.parent / p).resolve()) for p in cfg.get("rule_files", [])]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == SCRAPE_JOB]
    if len(jobs) != 1:
        raise PrometheusError(f"{config}: expected exactly one scrape job named {SCRAPE_JOB!r}, found {len(jobs)}")
    jobs[0]["static_configs"] = [{"targets": list(targets)}]
    return cfg


class LocalPrometheus:
    """A Prometheus server process scraping `targets`; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        port: int | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        config: Path = SHIPPED_CONFIG,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or shutil.which("prometheus") or "/usr/bin/prometheus"
        if not Path(self.binary).exists():
            raise PrometheusError(
                f"Prometheus server binary {self.binary} not found: `make test-tools` "
                f"(as root) installs Debian's prometheus package"
            )
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._cfg = render_config(targets, scrape_interval, evaluation_interval, Path(config))
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> LocalPrometheus:
        self._dir = Path(tempfile.mkdtemp(prefix="pfc-prometheus-"))
        cfg_path = self._dir / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(self._cfg, sort_keys=False))
        self._log = open(self._dir / "server.log", "wb")
        self._proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={cfg_path}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self._proc.returncode} at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(f"prometheus on port {self.port} not ready after {timeout}s")

    def log_tail(self, chars: int = 4000) -> str:
        return (self._dir / "server.log").read_text(errors="replace")[-chars:] if self._dir else ""

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>; returns `data`, raising PrometheusError on an error status."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: a bad expression; the body says why
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: a list of {"metric": labels, "value": [time, "value"]}."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"query {expr!r} gave a {data['resultType']}, expected an instant vector")
        return data["result"]

    def wait_until(
        self, expr: str, predicate: Callable[[list[dict]], bool] = bool, timeout: float = 30.0, poll: float = 0.5
    ) -> list[dict]:
        """Query `expr` until `predicate(result)` holds; return that result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"after {timeout}s, {expr!r} still gives {result}; targets: "
                    f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in self.api('targets')['activeTargets']]}"
                )
            time.sleep(poll)

    def stop(self) -> None:
        """Stop the server and delete its storage. Safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
            self._log.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
