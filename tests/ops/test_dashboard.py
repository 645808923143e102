"""The Grafana dashboard: well-formed, templated (datasource, job, instance), every query parses as
PromQL (promql-parser) and names only metrics the server exports -- checked against the metric
definitions and against a live /metrics scrape of a real server process -- and the Helm chart ships an
identical copy.

Family names come from the `# TYPE` lines, present for every family even before its first sample
(labelled metrics have no samples until first used); `_bucket`/`_sum`/`_count`/`_total`/`_created`
series map to their family. vLLM's own `vllm:*` metrics exist only on GPU, in the same registry: they
are allowed from the explicit list `VLLM_GPU_ONLY_METRICS`, and only in the dashboard's vLLM row.
Live GPU and container panels read other exporters (DCGM exporter, cAdvisor): each such metric is
named in `EXTERNAL_METRICS` with its exporter, and allowed only in the dashboard's external row.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ops.opstools import (
    CHART,
    COMPOSE,
    DASHBOARD,
    EXTERNAL_METRICS,
    EXTERNAL_ROW,
    REPO,
    VLLM_GPU_ONLY_METRICS,
    dashboard_queries,
    dashboard_variable_queries,
    grafana_to_promql,
    iter_panels,
    metric_names,
    registry_exposition,
    sample_names,
    tool,
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
    # Issue 17: live GPU, container CPU and throttling, vLLM scheduler.
    "live GPU utilisation": "DCGM_FI_DEV_GPU_UTIL",
    "live GPU memory": "DCGM_FI_DEV_FB_USED",
    "container CPU": "container_cpu_usage_seconds_total",
    "CPU throttling": "container_cpu_cfs_throttled_periods_total",
    "vLLM queue time": "vllm:request_queue_time_seconds_bucket",
    "vLLM preemptions": "vllm:num_preemptions_total",
    "vLLM generated tokens": "vllm:generation_tokens_total",
    "vLLM prompt tokens": "vllm:prompt_tokens_total",
    # Issue 13: live transcription sessions.
    "live sessions open": "qwenasr_live_sessions_active",
    "live audio seconds": "qwenasr_live_audio_seconds_total",
    "live time to first delta": "qwenasr_live_first_delta_seconds_bucket",
    "live final latency after end of speech": "qwenasr_live_final_latency_seconds_bucket",
    # Worker processes and live refusals, beside their alerts.
    "worker processes by state": "qwenasr_worker_processes",
    "worker processes replaced": "qwenasr_worker_replacements_total",
    "live sessions limit": "qwenasr_live_sessions_limit",
    "live sessions refused by reason": "qwenasr_live_sessions_rejected_total",
    "live turns failed": "qwenasr_live_turns_total",
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


def row_panels(dashboard: dict[str, Any], title: str) -> set[str]:
    (row,) = [p for p in dashboard["panels"] if p.get("type") == "row" and p["title"] == title]
    return {p["title"] for p in row["panels"]}


def vllm_row_panels(dashboard: dict[str, Any]) -> set[str]:
    return row_panels(dashboard, VLLM_ROW)


def names_by_location(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> dict[str, set[str]]:
    used = {where: metric_names(grafana_to_promql(expr)) for where, expr in queries}
    used.update({where: variable_query_names(query) for where, query in dashboard_variable_queries(dashboard)})
    return used


def check_names_exported(dashboard: dict[str, Any], queries: list[tuple[str, str]], exposition: str) -> None:
    exported = sample_names(exposition)
    vllm_panels = vllm_row_panels(dashboard)
    external_panels = row_panels(dashboard, EXTERNAL_ROW)
    problems = []
    for where, names in names_by_location(dashboard, queries).items():
        for name in sorted(names - exported):
            panel = where.rsplit(" [", 1)[0]
            if name in VLLM_GPU_ONLY_METRICS and panel in vllm_panels:
                continue
            if name in EXTERNAL_METRICS and panel in external_panels:
                continue
            problems.append(f"{where}: {name}")
    assert not problems, "queries name metrics the server does not export:\n" + "\n".join(problems)


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "qwenasr-appliance" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job", "instance", "pod"} <= set(variables)
    assert variables["namespace"]["allValue"] == ".*"  # matches series without the label (plain scrape)
    external_panels = row_panels(dashboard, EXTERNAL_ROW)
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
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            if panel["title"] in external_panels:
                # Other exporters know pods, not the appliance's scrape job: scoped by the pod variable.
                assert 'pod=~"$pod"' in target["expr"], panel["title"]
                continue
            # Every query of the appliance's metrics is scoped by the job and instance variables.
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


def test_external_metrics_stay_in_their_row(dashboard: dict[str, Any], queries: list[tuple[str, str]]) -> None:
    external_panels = row_panels(dashboard, EXTERNAL_ROW)
    for where, names in names_by_location(dashboard, queries).items():
        if names & set(EXTERNAL_METRICS):
            assert where.rsplit(" [", 1)[0] in external_panels, where
    assert all(EXTERNAL_METRICS.values()), "every external metric names its exporter"


def test_one_off_gpu_memory_reading_says_so(dashboard: dict[str, Any]) -> None:
    """qwenasr_gpu_memory_* is read once at the engine's VRAM probe, before the model loads."""
    for panel in iter_panels(dashboard["panels"]):
        names = set().union(*(metric_names(grafana_to_promql(t["expr"])) for t in panel.get("targets", [])))
        if any(name.startswith("qwenasr_gpu_memory_") for name in names):
            assert "one-off" in panel["title"], panel["title"]


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


# Review 7: the GPU Operator's dcgm-exporter ServiceMonitor has honorLabels false, so the workload's
# labels arrive as exported_namespace/exported_pod (namespace/pod name the exporter's own pod); with
# honorLabels true (or a plain scrape) they are namespace/pod. Series of both schemes, an idle GPU and
# another workload's GPU: the panels show exactly the appliance's pods, labelled namespace/pod/gpu.
DCGM_SERIES = {
    # honorLabels true: the workload's labels as they are
    '{namespace="speech", pod="asr-qwenasr-appliance-0", gpu="0", job="dcgm", instance="10.0.0.5:9400"}': 80,
    # honorLabels false: the exporter's pod in namespace/pod, the workload's in exported_*
    '{namespace="gpu-operator", pod="nvidia-dcgm-exporter-x1", exported_namespace="speech", '
    'exported_pod="asr-qwenasr-appliance-1", gpu="0", job="dcgm", instance="10.0.0.6:9400"}': 60,
    '{namespace="gpu-operator", pod="nvidia-dcgm-exporter-x1", exported_namespace="ml", '
    'exported_pod="trainer-0", gpu="1", job="dcgm", instance="10.0.0.6:9400"}': 99,
    '{namespace="gpu-operator", pod="nvidia-dcgm-exporter-x1", gpu="2", job="dcgm", instance="10.0.0.6:9400"}': 0,
}
APPLIANCE_PODS = {"asr-qwenasr-appliance-0": 80, "asr-qwenasr-appliance-1": 60}


def with_variables(expr: str, **values: str) -> str:
    """Grafana's substitution of the dashboard variables (not `$1` of label_replace)."""
    expr = grafana_to_promql(expr)
    return re.sub(r"\$(namespace|job|instance|pod)\b", lambda m: values.get(m[1], ".*"), expr)


@pytest.mark.parametrize("metric", ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"])
def test_gpu_panels_read_both_dcgm_label_schemes(dashboard: dict[str, Any], tmp_path: Path, metric: str) -> None:
    (panel,) = [
        p for p in iter_panels(dashboard["panels"]) if any(metric in t.get("expr", "") for t in p.get("targets", []))
    ]
    (target,) = panel["targets"]
    assert "exported_namespace" in target["expr"] and "exported_pod" in target["expr"]
    series = [{"series": f"{metric}{labels}", "values": f"{value}x10"} for labels, value in DCGM_SERIES.items()]
    for pod in APPLIANCE_PODS:
        labels = f'namespace="speech", pod="{pod}", job="asr-qwenasr-appliance", instance="{pod}:8001"'
        series.append({"series": f"qwenasr_build_info{{{labels}}}", "values": "1x10"})

    def samples(pods: dict[str, int]) -> list[dict[str, Any]]:
        return [{"labels": f'{{namespace="speech", pod="{pod}", gpu="0"}}', "value": v} for pod, v in pods.items()]

    cases = [
        {"expr": with_variables(target["expr"]), "eval_time": "5m", "exp_samples": samples(APPLIANCE_PODS)},
        {
            "expr": with_variables(target["expr"], namespace="speech", pod="asr-qwenasr-appliance-1"),
            "eval_time": "5m",
            "exp_samples": samples({"asr-qwenasr-appliance-1": 60}),
        },
        {"expr": with_variables(target["expr"], namespace="ml"), "eval_time": "5m", "exp_samples": []},
    ]
    tests = {"rule_files": [], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}  # fmt: skip
    path = tmp_path / "dcgm.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([tool("promtool", "PROMTOOL"), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "{{pod}}" in target["legendFormat"]
