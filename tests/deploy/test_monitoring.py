"""deploy/monitoring: the alert rules pass promtool's checks and unit tests, every rule is
complete, and every metric the rules and dashboards name is one the agent or the hub exports
(read from edge_agent/metrics.py and cloud_hub/metrics.py themselves) or a documented
external one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.metrics import create_metrics
from tests.deploy.conftest import DEPLOY, run, tool

MONITORING = DEPLOY / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
DASHBOARDS = [MONITORING / "grafana" / "edge.json", MONITORING / "grafana" / "fleet.json"]

# Metrics that do not come from the agent, and who exports them. Each must be named in the
# header of alerts.yaml (that is where they are documented).
EXTERNAL = {
    "up": "Prometheus (one series per scrape target)",
    "DCGM_FI_DEV_FB_USED": "NVIDIA DCGM exporter",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA DCGM exporter",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA DCGM exporter",
    "kube_job_status_failed": "kube-state-metrics",
}
# what the alerts must watch (the brief of the deployment issue)
MUST_ALERT_ON = {
    "edge_outbox_depth",
    "edge_outbox_oldest_unsynced_seconds",
    "edge_outbox_dead_letters",
    "edge_storage_pressure",
    "edge_storage_tier_used_ratio",
    "edge_storage_corrupt_files_total",
    "edge_inference_jobs_total",
    "edge_sync_connectivity",
    "edge_dicom_out_of_resources_total",
    "edge_model_rollbacks_total",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "up",
    "hub_database_up",
    "hub_http_requests_total",
    "hub_db_pool_connections",
    "hub_feed_oldest_pending_seconds",
    "hub_conflicts_opened_total",
}
# what the fleet dashboard must show of the hub (the brief of the hub-operations issue)
HUB_PANELS = {
    "hub_http_requests_total",
    "hub_http_request_seconds_bucket",
    "hub_push_records_total",
    "hub_conflicts_opened_total",
    "hub_conflicts_resolved_total",
    "hub_feed_pending_changes",
    "hub_feed_oldest_pending_seconds",
    "hub_db_pool_connections",
    "hub_db_pool_limit",
    "hub_unavailable_total",
    "hub_database_up",
}
METRIC = re.compile(r"\b(edge_[a-z0-9_]+|hub_[a-z0-9_]+|DCGM_FI_[A-Z0-9_]+|kube_[a-z0-9_]+|up)\b")


def series_of(families: Any) -> set[str]:
    """Every series name of these metric families (counters with _total/_created,
    histograms with _bucket/_sum/_count/_created)."""
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
    return names


def agent_series() -> set[str]:
    """Every series name the agent's /metrics can expose."""
    return series_of(create_metrics().registry.collect())


def hub_series() -> set[str]:
    """Every series name the hub's /metrics can expose (its fleet-wide figures read from a
    real, empty hub database)."""
    from cloud_hub.metrics import create_metrics as create_hub_metrics
    from cloud_hub.store import HubStore, connect

    store = HubStore(connect("sqlite://"))
    try:
        hub = create_hub_metrics(lambda: store, pool_limit=10, timeout_s=3.0)
        return series_of(hub.registry.collect())
    finally:
        store.engine.dispose()


def metrics_in(expr: str) -> set[str]:
    # label values ("edge-agent", "st-mary") and label names never match: metric names are
    # the identifiers with these prefixes outside quotes
    unquoted = re.sub(r'"[^"]*"', '""', expr)
    return set(METRIC.findall(unquoted))


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def check_names(names: set[str], where: str) -> None:
    known = agent_series() | hub_series()
    unknown = {n for n in names if n not in known and n not in EXTERNAL}
    assert not unknown, f"{where} names metrics that nothing exports: {sorted(unknown)}"


# ---------------------------------------------------------------------------------------
# promtool


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    out = run([promtool, "check", "rules", str(ALERTS)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    out = run([promtool, "test", "rules", str(MONITORING / "alerts.test.yaml")], cwd=MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    tests = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())["tests"]
    fired = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case.get("exp_alerts")
    }
    quiet = [case for t in tests for case in t["alert_rule_test"] if not case.get("exp_alerts")]
    assert {r["alert"] for r in rules()} == fired
    assert quiet, "at least one case must check that an alert does not fire"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool has no "check expression": the dashboards' queries go into a rules file as
    recording rules, with the template variables filled in."""
    promtool = tool("promtool", "apt-get install prometheus")
    recorded = []
    for path in DASHBOARDS:
        for i, expr in enumerate(dashboard_exprs(path)):
            expr = expr.replace("$instance", ".+").replace("$gpu_host", ".+")
            recorded.append({"record": f"check:{path.stem}:{i}", "expr": expr})
    rules_file = tmp_path / "dashboards.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dash", "rules": recorded}]}))
    out = run([promtool, "check", "rules", str(rules_file)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config_is_valid(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    config = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())
    token = tmp_path / "token"
    token.write_text("test-token\n")
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
        if "tls_config" in job:
            job["tls_config"]["ca_file"] = str(token)  # must exist; not parsed by the check
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = run([promtool, "check", "config", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------
# the rules themselves


def test_every_rule_is_complete() -> None:
    for r in rules():
        assert "for" in r, r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_alerts_use_real_metric_names() -> None:
    used: set[str] = set()
    for r in rules():
        used |= metrics_in(r["expr"])
    check_names(used, "alerts.yaml")
    assert used >= MUST_ALERT_ON, f"no alert on {sorted(MUST_ALERT_ON - used)}"
    header = ALERTS.read_text().split("groups:", 1)[0]
    for name in used & set(EXTERNAL):
        documented = re.search(rf"^#\s+.*\b{name}\b", header, flags=re.M)
        assert documented, f"external metric {name} is not documented in alerts.yaml"
    failed_rate = next(r for r in rules() if "edge_inference_jobs_total" in r["expr"])
    assert 'outcome="failed"' in failed_rate["expr"]
    offline = next(r for r in rules() if "edge_sync_connectivity" in r["expr"])
    assert 'state="offline"' in offline["expr"]


# ---------------------------------------------------------------------------------------
# Grafana


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_importable(path: Path) -> None:
    dash = json.loads(path.read_text())
    assert dash["schemaVersion"] == 39
    assert dash["uid"] and dash["title"]
    (ds_input,) = dash["__inputs"]
    assert ds_input["name"] == "DS_PROMETHEUS" and ds_input["pluginId"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dash["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    for var in dash["templating"]["list"]:
        assert var["datasource"]["uid"] == "${DS_PROMETHEUS}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_uses_real_metric_names(path: Path) -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(path):
        found = metrics_in(expr)
        assert found, f"{path.name}: a query names no metric: {expr}"
        used |= found
    dash = json.loads(path.read_text())
    for var in dash["templating"]["list"]:
        used |= metrics_in(var["definition"])
    check_names(used, path.name)
    assert len({n for n in used if n.startswith("edge_")}) >= 10, sorted(used)


def test_edge_dashboard_covers_every_agent_metric() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(DASHBOARDS[0]):
        used |= metrics_in(expr)
    exported = {n for n in agent_series() if not n.endswith("_created")}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, f"not on the edge dashboard: {sorted(families - shown)}"


def test_fleet_dashboard_shows_the_hub() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs(DASHBOARDS[1]):
        used |= metrics_in(expr)
    assert used >= HUB_PANELS, f"not on the fleet dashboard: {sorted(HUB_PANELS - used)}"
    assert hub_series() >= HUB_PANELS
