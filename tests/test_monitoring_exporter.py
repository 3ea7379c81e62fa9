"""monitoring/exporter.py: what a worker serves on /metrics, port handling, Pushgateway pushes."""

import math
import socket
import subprocess
import time
import urllib.request

import pytest
from helpers import need_tool
from monitoring_helpers import feed, port_pair, scrape
from prometheus_client import REGISTRY

from monitoring import PortInUseError, TrainingMetrics
from monitoring.local_prometheus import free_port


def one(samples, name, **labels):
    """The value of the only sample `name` whose labels include `labels`."""
    hits = [s for s in samples[name] if labels.items() <= s.labels.items()]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0].value


def test_serves_expected_names_labels_and_values():
    base = port_pair()
    with TrainingMetrics(
        job="run7", rank=3, local_rank=1, world_size=4, host="hostA", bind="127.0.0.1", base_port=base, version="1.2.3"
    ) as m:
        assert m.port == base + 1  # base_port + local_rank
        feed(m, steps=3)
        s = scrape(base + 1)

    for samples in s.values():  # constant labels on every series
        for smp in samples:
            assert (smp.labels["job"], smp.labels["rank"], smp.labels["host"]) == ("run7", "3", "hostA"), smp
    assert one(s, "pfc_info", version="1.2.3", world_size="4", local_rank="1") == 1
    assert one(s, "pfc_samples_total") == 4 * 32
    assert one(s, "pfc_steps_total") == 4
    assert one(s, "pfc_global_step") == 4
    assert one(s, "pfc_loss") == 1.5 and one(s, "pfc_batch_accuracy") == 0.5
    assert one(s, "pfc_learning_rate") == 0.1 and one(s, "pfc_margin_lambda") == 5.0
    assert one(s, "pfc_epoch") == 0.05
    assert one(s, "pfc_step_seconds_count") == 4 and one(s, "pfc_step_seconds_sum") == pytest.approx(0.8)
    assert one(s, "pfc_step_seconds_bucket", le="0.1") == 0 and one(s, "pfc_step_seconds_bucket", le="0.25") == 4
    assert one(s, "pfc_data_wait_seconds_bucket", le="0.005") == 4
    assert one(s, "pfc_collective_seconds_sum") == pytest.approx(0.12)
    assert one(s, "pfc_checkpoint_write_seconds_count") == 1
    assert one(s, "pfc_checkpoint_write_seconds_bucket", le="1.0") == 0
    assert one(s, "pfc_checkpoint_write_seconds_bucket", le="2.5") == 1
    assert one(s, "pfc_last_checkpoint_step") == 3
    assert abs(one(s, "pfc_last_checkpoint_timestamp_seconds") - time.time()) < 60
    assert abs(one(s, "pfc_last_step_timestamp_seconds") - time.time()) < 60
    assert one(s, "pfc_verification_accuracy", set="lfw") == 0.97
    assert one(s, "pfc_verification_tar", set="lfw", far="0.001") == 0.91
    assert one(s, "pfc_corrupt_records_skipped_total") == 2
    assert one(s, "pfc_nonfinite_steps_total") == 1
    assert one(s, "pfc_fc_shard_classes") == 1000 and one(s, "pfc_fc_shard_bytes") == 1000 * 512 * 12
    with open("/proc/self/status") as f:
        vmrss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert 0.5 * vmrss < one(s, "pfc_resident_memory_bytes") < 2 * vmrss
    # an own registry: nothing from the process-wide default registry, and ours is not in it
    assert not [n for n in s if n.startswith(("python_", "process_"))]
    assert not [m for m in REGISTRY.collect() if m.name.startswith("pfc_")]


def test_nonfinite_step_shows_in_loss_and_counter():
    port = free_port()
    with TrainingMetrics(job="j", bind="127.0.0.1", base_port=port) as m:
        m.observe_step(step=1, samples=8, loss=3.0, accuracy=0.0, lr=0.1, lam=0.0, epoch=0.0, step_seconds=0.1)
        m.count_nonfinite(loss=math.inf)
        s = scrape(port)
    assert one(s, "pfc_loss") == math.inf and one(s, "pfc_nonfinite_steps_total") == 1


def test_port_in_use_is_a_clear_error_naming_the_port():
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} .*in use.*base_port {port - 1} \\+ local_rank 1"):
            TrainingMetrics(bind="127.0.0.1", base_port=port - 1, local_rank=1)


def test_two_workers_on_one_host_use_consecutive_ports():
    base = port_pair()
    with (
        TrainingMetrics(job="j", rank=0, local_rank=0, bind="127.0.0.1", base_port=base) as a,
        TrainingMetrics(job="j", rank=1, local_rank=1, bind="127.0.0.1", base_port=base) as b,
    ):
        a.observe_step(step=1, samples=5, loss=1, accuracy=0, lr=0.1, lam=0, epoch=0, step_seconds=0.1)
        assert one(scrape(base), "pfc_samples_total") == 5
        assert one(scrape(base + 1), "pfc_samples_total") == 0  # separate registries
        assert b.port == base + 1


def test_port_zero_disables_the_endpoint():
    m = TrainingMetrics(base_port=0)
    assert m.port is None
    feed(m)  # recording still works, and is visible in the registry
    assert m.registry.get_sample_value("pfc_steps_total", {"job": "pfc", "rank": "0", "host": m.host}) == 4
    m.close()


def test_closed_exporter_frees_its_port():
    port = free_port()
    TrainingMetrics(bind="127.0.0.1", base_port=port).close()
    TrainingMetrics(bind="127.0.0.1", base_port=port).close()  # would be PortInUseError if still bound


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"base_port": -1}, "base_port must be >= 0"),
        ({"base_port": 65535, "local_rank": 2}, "65537 is above 65535"),
        ({"pushgateway": "gateway:9091"}, "pushgateway must be an http"),
        ({"pushgateway": "http://gw:9091", "push_interval_s": 0}, "push_interval_s must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingMetrics(**kwargs)


# A real Pushgateway (Debian's prometheus-pushgateway, installed by `make test-tools`) rather than a fake
# HTTP server: it parses and validates the pushed payload the way Prometheus would (types, label
# consistency, grouping keys), so a malformed push fails here instead of in production. Debian's
# default persists pushes to /var/lib/prometheus: --persistence.file= keeps them in memory only.
@pytest.fixture
def pushgateway():
    binary = need_tool("prometheus-pushgateway", "prometheus-pushgateway")
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file=", "--log.level=warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError(f"pushgateway on port {port} did not become ready")
        yield url, port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def gateway_value(port, name, **labels):
    s = scrape(port)
    hits = [x.value for x in s.get(name, []) if labels.items() <= x.labels.items()]
    return hits[0] if hits else None


@pytest.mark.slow
def test_pushes_at_intervals_and_at_close(pushgateway):
    url, port = pushgateway
    periodic = TrainingMetrics(job="batchjob", rank=0, host="h", pushgateway=url, push_interval_s=0.2)
    final_only = TrainingMetrics(job="batchjob", rank=1, host="h", pushgateway=url, push_interval_s=3600)
    feed(periodic, steps=3)
    feed(final_only, steps=9)
    deadline = time.monotonic() + 20
    while gateway_value(port, "pfc_steps_total", job="batchjob", rank="0", host="h") != 4:
        assert time.monotonic() < deadline, "periodic push never arrived"
        time.sleep(0.1)
    assert gateway_value(port, "pfc_steps_total", rank="1") is None  # its first push is at close()
    final_only.close()
    periodic.close()
    assert gateway_value(port, "pfc_steps_total", job="batchjob", rank="1", host="h") == 10
    assert gateway_value(port, "pfc_step_seconds_count", job="batchjob", rank="1") == 10
    assert gateway_value(port, "pfc_verification_accuracy", job="batchjob", rank="1", set="lfw") == 0.97
    assert gateway_value(port, "pfc_steps_total", job="batchjob", rank="0", host="h") == 4  # own group kept


def test_unreachable_pushgateway_is_counted_not_fatal(caplog):
    m = TrainingMetrics(job="j", pushgateway=f"http://127.0.0.1:{free_port()}", push_interval_s=3600)
    assert m.push() is False and m.push() is False
    m.close()  # the final push fails too, without raising
    assert m.registry.get_sample_value("pfc_push_failures_total", {"job": "j", "rank": "0", "host": m.host}) == 3
    assert sum("push to http://127.0.0.1" in r.message for r in caplog.records) == 1  # logged once


def test_unusable_bind_address_is_named():
    with pytest.raises(RuntimeError, match=r"cannot serve metrics on 192\.0\.2\.1:"):
        TrainingMetrics(bind="192.0.2.1", base_port=free_port())  # TEST-NET-1: not an address of this host
