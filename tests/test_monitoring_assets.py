"""monitoring/prometheus and monitoring/grafana: checked by promtool, and every PromQL expression names
only metrics a live exporter really serves (or that the rules record)."""

import json
import subprocess

import pytest
import yaml
from helpers import need_tool
from monitoring_helpers import feed, metric_names, scrape

from monitoring import TrainingMetrics
from monitoring.local_prometheus import ASSETS, free_port

RULES = ASSETS / "rules.yml"
RULES_TEST = ASSETS / "rules_test.yml"
CONFIG = ASSETS / "prometheus.yml"
DASHBOARD = ASSETS.parent / "grafana" / "pfc-dashboard.json"


def promtool(*args):
    binary = need_tool("promtool", "prometheus")
    proc = subprocess.run([binary, *args], cwd=ASSETS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_promtool_check_config():
    assert "SUCCESS" in promtool("check", "config", CONFIG.name)


def test_promtool_check_rules():
    assert "SUCCESS: 8 rules found" in promtool("check", "rules", RULES.name)


def test_promtool_test_rules():
    assert "SUCCESS" in promtool("test", "rules", RULES_TEST.name)


def alerts():
    return [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    expected = {
        "PfcWorkerDown",
        "PfcNoStepProgress",
        "PfcNonFiniteLoss",
        "PfcThroughputDrop",
        "PfcStragglerWorker",
        "PfcCheckpointTooOld",
    }
    assert set(alerts()) == expected
    for name in expected:
        assert any(c["alertname"] == name and c["exp_alerts"] for c in cases), f"{name}: no firing case"
        assert any(c["alertname"] == name and not c["exp_alerts"] for c in cases), f"{name}: no quiet case"


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    """Every sample name a fed exporter serves (with _total/_bucket/_sum/_count/_created suffixes)."""
    port = free_port()
    with TrainingMetrics(job="names", bind="127.0.0.1", base_port=port) as m:
        feed(m)
        return set(scrape(port))


def recorded_names() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def rule_exprs():
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_metric_name_extraction():
    assert metric_names('sum by (job) (rate(a_total{x="y"}[5m])) / on (job) group_left () b offset 5m > 1e-3 * c') == {
        "a_total",
        "b",
        "c",
    }
    assert metric_names('label_values(pfc_info{job="$job"}, rank)') == {"pfc_info"}
    assert metric_names("abs(x) != abs(x) or abs(x) == Inf or time() - y[$__rate_interval]") == {"x", "y"}


def test_rules_name_only_exported_metrics(exported_names):
    known = exported_names | recorded_names() | {"up"}  # `up`: Prometheus' own per-target series
    for expr in rule_exprs():
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= known, f"{expr!r} reads {sorted(names - known)}, which nothing exports"


def test_dashboard_names_only_exported_metrics(exported_names):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= exported_names, f"{expr!r} reads {sorted(names - exported_names)}, which nothing exports"


def test_dashboard_is_importable_with_a_datasource_variable():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    titles = [p["title"] for p in dash["panels"]]
    for needed in (
        "Throughput",
        "Loss",
        "accuracy",
        "Learning rate",
        "Step time quantiles",
        "Data wait",
        "Memory",
        "Verification accuracy",
        "Checkpoint age",
    ):
        assert any(needed in t for t in titles), needed
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
