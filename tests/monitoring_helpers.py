"""Shared by the monitoring tests: PromQL metric-name extraction, a fed exporter, port helpers."""

from __future__ import annotations

import re
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from monitoring import TrainingMetrics

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL (or Grafana-templated PromQL) expression reads.

    Strips strings, label matchers, ranges, Grafana $variables and the label lists of
    by/without/on/ignoring/group_*; what is left that is an identifier not followed by `(` and not a
    keyword is a metric name.
    """
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr)
    e = label_values.group(1) if label_values else expr
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+\w+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if re.match(r"\s*\(", e[m.end() :]) or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def port_pair() -> int:
    """A port B on 127.0.0.1 such that B and B+1 are both free (two workers on one host)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", base + 1))
                    return base
                except OSError:
                    continue
    raise RuntimeError("no two consecutive free ports")


def scrape(port: int) -> dict[str, list]:
    """GET /metrics of 127.0.0.1:port, parsed: sample name -> [Sample, ...]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def feed(m: TrainingMetrics, steps: int = 3) -> None:
    """Calls every recording method at least once, so every series of the exporter exists."""
    for i in range(steps):
        m.observe_step(
            step=i + 1,
            samples=32,
            loss=2.0 - 0.1 * i,
            accuracy=0.1 * i,
            lr=0.1,
            lam=5.0,
            epoch=0.01 * (i + 1),
            step_seconds=0.2,
            data_wait_seconds=0.004,
            comm_seconds=0.03,
        )
    m.observe_checkpoint(step=steps, seconds=1.5)
    m.observe_eval("lfw", 0.97, {1e-3: 0.91})
    m.count_corrupt(2)
    m.count_nonfinite()
    m.observe_step(
        step=steps + 1,
        samples=32,
        loss=1.5,
        accuracy=0.5,
        lr=0.1,
        lam=5.0,
        epoch=0.05,
        step_seconds=0.2,
        data_wait_seconds=0.004,
        comm_seconds=0.03,
    )
    m.set_fc_shard(classes=1000, nbytes=1000 * 512 * 4 * 3)
