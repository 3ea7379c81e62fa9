"""A real Prometheus server (monitoring/local_prometheus.py) with the shipped config and rules: scraping two
exporters in this process (the dashboard's queries return data, the rules evaluate), and scraping two real
horovodrun workers."""

import json
import math
import os
import signal
import subprocess
import threading
import time

import pytest
from helpers import BIN, ROOT, need_tool, smoke_overrides, worker_env
from monitoring_helpers import port_pair

from monitoring import TrainingMetrics
from monitoring.local_prometheus import ASSETS, LocalPrometheus, PrometheusError

pytestmark = pytest.mark.slow  # a Prometheus server and pfc train processes

JOB = "e2e"


@pytest.fixture(scope="module", autouse=True)
def _prometheus_installed():
    need_tool("prometheus", "prometheus")


@pytest.fixture(scope="module")
def cluster():
    """Two exporters (local_rank 0 and 1 on consecutive ports), stepping every 50 ms, scraped every second."""
    base = port_pair()
    workers = [
        TrainingMetrics(job=JOB, rank=r, local_rank=r, world_size=2, bind="127.0.0.1", base_port=base, version="test")
        for r in (0, 1)
    ]
    for w in workers:
        w.set_fc_shard(classes=500, nbytes=500 * 128 * 4)
        w.observe_checkpoint(step=0, seconds=0.3)
        w.observe_eval("lfw", 0.9, {1e-3: 0.8})
        w.count_corrupt(1)
    stop = threading.Event()

    def step_forever():
        step = 0
        while not stop.wait(0.05):
            step += 1
            for w in workers:
                w.observe_step(
                    step=step,
                    samples=16,
                    loss=3.0 / (1 + 0.01 * step),
                    accuracy=0.5,
                    lr=0.1,
                    lam=1.0,
                    epoch=step / 1000,
                    step_seconds=0.05,
                    data_wait_seconds=0.002,
                    comm_seconds=0.01,
                )

    stepper = threading.Thread(target=step_forever, daemon=True)
    stepper.start()
    prom = LocalPrometheus([f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]).start()
    try:
        # two scrapes of each worker, so rates exist
        prom.wait_until(f'count(rate(pfc_steps_total{{job="{JOB}"}}[10s]) > 0) == 2', timeout=60)
        yield prom, workers
    finally:
        prom.stop()
        stop.set()
        stepper.join()
        for w in workers:
            w.close()


def by_rank(result):
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


def test_both_workers_are_scraped_and_counters_increase(cluster):
    prom, _ = cluster
    up = prom.query('up{job="pfc"}')
    assert len(up) == 2 and all(r["value"][1] == "1" for r in up), up
    first = by_rank(prom.query(f'pfc_steps_total{{job="{JOB}"}}'))
    assert set(first) == {"0", "1"}
    later = by_rank(
        prom.wait_until(
            f'pfc_steps_total{{job="{JOB}"}}',
            lambda res: len(res) == 2 and all(float(r["value"][1]) > first[r["metric"]["rank"]] for r in res),
        )
    )
    assert all(later[r] > first[r] for r in first)
    hosts = {r["metric"]["host"] for r in prom.query(f'pfc_info{{job="{JOB}"}}')}
    assert len(hosts) == 1 and "" not in hosts
    loss = by_rank(prom.query(f'pfc_loss{{job="{JOB}"}}'))
    assert all(math.isfinite(v) and 0 < v <= 3 for v in loss.values())


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "10s").replace('rank=~"$rank"', 'rank=~".*"').replace("$job", JOB)


def test_every_dashboard_query_returns_data(cluster):
    prom, _ = cluster
    dash = json.loads((ASSETS.parent / "grafana" / "pfc-dashboard.json").read_text())
    targets = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for title, expr in targets:
        promql = grafana_to_promql(expr)
        assert "$" not in promql, promql
        assert prom.query(promql), f"panel {title!r}: {promql!r} returned nothing"
    throughput = prom.query(grafana_to_promql(targets[[t for t, _ in targets].index("Throughput (samples/s)")][1]))
    assert {r["metric"]["rank"] for r in throughput} == {"0", "1"}


def test_rules_load_and_alert_only_on_trouble(cluster):
    prom, workers = cluster
    groups = prom.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"PfcWorkerDown", "PfcNonFiniteLoss", "PfcStragglerWorker"} <= set(rules)
    deadline = time.monotonic() + 30
    while not all(not r["lastEvaluation"].startswith("0001") and r["health"] == "ok" for r in rules.values()):
        assert time.monotonic() < deadline, {n: (r["health"], r.get("lastError")) for n, r in rules.items()}
        time.sleep(0.5)
        rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert prom.api("alerts")["alerts"] == []  # a healthy run: nothing pending or firing
    workers[1].count_nonfinite()  # the stepper keeps the loss finite; the counter moves
    firing = prom.wait_until('ALERTS{alertname="PfcNonFiniteLoss", alertstate="firing"}', timeout=30)
    assert [r["metric"]["rank"] for r in firing] == ["1"]


def test_bad_query_is_a_clear_error(cluster):
    prom, _ = cluster
    with pytest.raises(PrometheusError, match="bad_data"):
        prom.query("sum(")


def test_prometheus_scrapes_a_two_worker_pfc_train(tmp_path, synth_dataset):
    """A real `horovodrun -np 2 pfc train` serving on base_port + local_rank, scraped by a real
    Prometheus with the shipped config: both workers' series, steps increasing, loss finite."""
    base = port_pair()
    sets = smoke_overrides(
        synth_dataset,
        tmp_path / "run",
        100_000,
        f"monitoring.port={base}",
        "monitoring.bind=127.0.0.1",
        "monitoring.job=hvd-e2e",
        "checkpoint.every=0",
    )
    cmd = [
        str(BIN / "horovodrun"),
        "-np",
        "2",
        "-H",
        "localhost:2",
        "--gloo",
        str(BIN / "pfc"),
        "train",
        "--config",
        "configs/smoke.yaml",
        *sets,
    ]
    worker = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        with LocalPrometheus([f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]) as prom:
            q = 'pfc_steps_total{job="hvd-e2e"}'
            first = by_rank(prom.wait_until(q, lambda r: len(r) == 2, timeout=180))
            later = by_rank(
                prom.wait_until(
                    q, lambda r: all(float(x["value"][1]) > first[x["metric"]["rank"]] for x in r), timeout=60
                )
            )
            assert set(later) == {"0", "1"}
            loss = by_rank(prom.query('pfc_loss{job="hvd-e2e"}'))
            assert set(loss) == {"0", "1"} and all(math.isfinite(v) for v in loss.values()), loss
            # base_port + local_rank: the worker behind each port is the local rank it should be
            info = prom.query('pfc_info{job="hvd-e2e"}')
            assert {(r["metric"]["instance"], r["metric"]["local_rank"], r["metric"]["world_size"]) for r in info} == {
                (f"127.0.0.1:{base}", "0", "2"),
                (f"127.0.0.1:{base + 1}", "1", "2"),
            }
            shard = by_rank(prom.query('pfc_fc_shard_classes{job="hvd-e2e"}'))
            assert shard == {"0": 20.0, "1": 20.0}, shard  # 40 classes split over 2 workers
        assert worker.poll() is None, "the training ended early:\n" + worker.stdout.read()[-3000:]
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
