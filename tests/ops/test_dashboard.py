"""The Grafana dashboard: well-formed, templated (datasource, job, instance), every query parses as
PromQL (promql-parser) and names only metrics the server exports -- checked against the metric
definitions and against a live /metrics scrape of a real server process -- and the Helm chart ships an
identical copy.

Family names come from the `# TYPE` lines, present for every family even before its first sample
(labelled metrics have no samples until first used); `_bucket`/`_sum`/`_count`/`_total`/`_created`
series map to their family. vLLM's own `vllm:*` metrics exist only on GPU, in the same registry: they
are allowed from the explicit list `VLLM_GPU_ONLY_METRICS`, and only in the dashboard's vLLM row.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import pytest
import yaml

from tests.ops.opstools import (
    CHART,
    COMPOSE,
    DASHBOARD,
    REPO,
    VLLM_GPU_ONLY_METRICS,
    dashboard_queries,
    dashboard_variable_queries,
    grafana_to_promql,
    iter_panels,
    metric_names,
    registry_exposition,
    sample_names,
    variable_query_names,
)

VLLM_ROW = "vLLM engine (GPU only)"

# What the issue asks the dashboard to show, by the metric that carries it.
REQUIRED_METRICS = {
    "request rate and errors by status": "qwenasr_http_requests_total",
    "latency p50/p95/p99": "qwenasr_http_request_duration_seconds_bucket",
    "audio seconds per second": "qwenasr_audio_processed_seconds_total",
    "real-time factor distribution": "qwenasr_real_time_factor_bucket",
    "queue depth": "qwenasr_requests_queued",
    "in-flight": "qwenasr_requests_in_flight",
    "engine state": "qwenasr_engine_state",
    "engine plan": "qwenasr_engine_plan_info",
    "fallbacks taken": "qwenasr_engine_fallbacks_total",
    "VRAM": "qwenasr_gpu_memory_free_bytes",
    "model load time": "qwenasr_model_load_duration_seconds",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


@pytest.fixture(scope="module")
def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    found = list(dashboard_queries(dashboard))
    assert len(found) >= 20
    return found


def vllm_row_panels(dashboard: dict[str, Any]) -> set[str]:
    (row,) = [p for p in dashboard["panels"] if p.get("type") == "row" and p["title"] == VLLM_ROW]
    return {p["title"] for p in row["panels"]}


def names_by_location(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> dict[str, set[str]]:
    used = {where: metric_names(grafana_to_promql(expr)) for where, expr in queries}
    used.update({where: variable_query_names(query) for where, query in dashboard_variable_queries(dashboard)})
    return used


def check_names_exported(dashboard: dict[str, Any], queries: list[tuple[str, str]], exposition: str) -> None:
    exported = sample_names(exposition)
    vllm_panels = vllm_row_panels(dashboard)
    problems = []
    for where, names in names_by_location(dashboard, queries).items():
        for name in sorted(names - exported):
            panel = where.rsplit(" [", 1)[0]
            if name in VLLM_GPU_ONLY_METRICS and panel in vllm_panels:
                continue
            problems.append(f"{where}: {name}")
    assert not problems, "queries name metrics the server does not export:\n" + "\n".join(problems)


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "qwenasr-appliance" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    panels = list(iter_panels(dashboard["panels"]))
    ids = Counter(p["id"] for p in panels)
    assert all(count == 1 for count in ids.values()), f"duplicate panel ids: {ids.most_common(3)}"
    for panel in panels:
        assert "gridPos" in panel, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # Every query is scoped by the job and instance variables.
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], panel["title"]


def test_every_query_parses_as_promql(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> None:
    errors = []
    for where, expr in queries:
        try:
            metric_names(grafana_to_promql(expr))
        except Exception as exc:  # promql_parser raises ValueError/RuntimeError with the position
            errors.append(f"{where}: {exc}\n    {expr}")
    for where, query in dashboard_variable_queries(dashboard):
        try:
            variable_query_names(query)
        except Exception as exc:
            errors.append(f"{where}: {exc}\n    {query}")
    assert not errors, "\n".join(errors)


def test_dashboard_shows_what_the_issue_asks(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> None:
    used = set().union(*names_by_location(dashboard, queries).values())
    missing = {topic: name for topic, name in REQUIRED_METRICS.items() if name not in used}
    assert not missing, missing
    assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= used


def test_queries_name_metrics_defined_by_the_appliance(
    dashboard: dict[str, Any], queries: list[tuple[str, str]]
) -> None:
    check_names_exported(dashboard, queries, registry_exposition())


def test_queries_name_metrics_the_live_server_exports(
    dashboard: dict[str, Any], queries: list[tuple[str, str]], live_server_url: str
) -> None:
    response = httpx.get(f"{live_server_url}/metrics", timeout=10)
    assert response.status_code == 200
    check_names_exported(dashboard, queries, response.text)


def test_vllm_metrics_stay_in_their_row(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> None:
    vllm_panels = vllm_row_panels(dashboard)
    for where, names in names_by_location(dashboard, queries).items():
        if any(name.startswith("vllm:") for name in names):
            assert where.rsplit(" [", 1)[0] in vllm_panels, where


def test_chart_ships_the_same_dashboard() -> None:
    copy = CHART / "files" / "grafana-dashboard.json"
    assert copy.read_bytes() == DASHBOARD.read_bytes(), "run `just dashboards-sync` after editing the dashboard"


def test_compose_provisions_the_dashboard_and_rules() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    grafana_mounts = {
        m.split(":")[1]: m.split(":")[0] for m in compose["services"]["grafana"]["volumes"] if m.startswith("./")
    }
    provider = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/qwenasr-appliance.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert (COMPOSE.parent / grafana_mounts[dashboards_path] / DASHBOARD.name).is_file()
    assert (COMPOSE.parent / grafana_mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yaml").is_file()
    prometheus_mounts = {
        m.split(":")[1]: m.split(":")[0] for m in compose["services"]["prometheus"]["volumes"] if m.startswith("./")
    }
    assert (COMPOSE.parent / prometheus_mounts["/etc/prometheus/rules"] / "qwenasr-appliance.rules.yaml").is_file()
    config = yaml.safe_load((COMPOSE.parent / prometheus_mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yaml"]
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["appliance:8001"]
