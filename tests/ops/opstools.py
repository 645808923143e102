"""Shared helpers of the ops checks: where the artifacts are, finding the external tools, and mapping
PromQL queries and /metrics expositions to metric names.

Tools are installed by scripts/install-ops-tools.sh (the project's test command runs it first). A
missing tool fails the test under CI (CI=true) and skips it locally, with the reason.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "qwenasr-appliance"
RULES = REPO / "deploy" / "prometheus" / "rules" / "qwenasr-appliance.rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "qwenasr-appliance.rules.test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "qwenasr-appliance.json"
COMPOSE = REPO / "deploy" / "compose.yaml"
CONTAINERFILE = REPO / "Containerfile"
INSTALL_HINT = "run scripts/install-ops-tools.sh"

# vLLM registers these in the same registry, on GPU only (the test server has no vLLM): queries may
# name them, in the dashboard's "vLLM engine (GPU only)" row.
VLLM_GPU_ONLY_METRICS = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:request_queue_time_seconds_bucket",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    }
)

# Series the appliance does not export, from other exporters every GPU cluster runs: allowed, by name,
# only in the dashboard's external row (EXTERNAL_ROW), whose panels select by namespace and pod.
EXTERNAL_METRICS: dict[str, str] = {
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA DCGM exporter (GPU Operator), per GPU with the pod it is assigned to",
    "DCGM_FI_DEV_FB_USED": "NVIDIA DCGM exporter (GPU Operator), framebuffer memory used in MiB",
    "container_cpu_usage_seconds_total": "cAdvisor (kubelet /metrics/cadvisor)",
    "container_cpu_cfs_throttled_periods_total": "cAdvisor (kubelet /metrics/cadvisor)",
    "container_cpu_cfs_periods_total": "cAdvisor (kubelet /metrics/cadvisor)",
}
EXTERNAL_ROW = "GPU and container (DCGM exporter, cAdvisor)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(reason: str) -> NoReturn:
    """Fail under CI, skip locally."""
    if in_ci():
        pytest.fail(f"{reason} ({INSTALL_HINT}); CI=true, so this is a failure", pytrace=False)
    pytest.skip(f"{reason} ({INSTALL_HINT})")


def tool(name: str, env_var: str | None = None) -> str:
    """Path of an executable: $ENV_VAR, then <repo>/.tools/bin, then the interpreter's bin, then PATH."""
    candidates: list[Path | str | None] = [
        os.environ.get(env_var) if env_var else None,
        REPO / ".tools" / "bin" / name,
        Path(sys.executable).parent / name,
        shutil.which(name),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    missing(f"`{name}` is not installed")


def module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"Python module `{name}` is not installed: {exc}")


# --- Prometheus exposition ----------------------------------------------------------------------

_TYPE_LINE = re.compile(r"^# TYPE (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*) (?P<type>\w+)\s*$")


def families(exposition: str) -> dict[str, str]:
    """Metric family name -> type, from the `# TYPE` lines (present even for families without samples)."""
    found: dict[str, str] = {}
    for line in exposition.splitlines():
        match = _TYPE_LINE.match(line)
        if match:
            found[match["name"]] = match["type"]
    return found


def sample_names(exposition: str) -> set[str]:
    """Every series name a query may use for the families exported in this text format 0.0.4 body."""
    names: set[str] = set()
    for family, kind in families(exposition).items():
        names.add(family)
        if kind == "counter":
            base = family.removesuffix("_total")
            names.update({f"{base}_total", f"{base}_created"})
        elif kind in {"histogram", "gaugehistogram"}:
            names.update({f"{family}_bucket", f"{family}_sum", f"{family}_count", f"{family}_created"})
        elif kind == "summary":
            names.update({f"{family}_sum", f"{family}_count", f"{family}_created"})
    return names


def registry_exposition() -> str:
    """The /metrics body the appliance's metric definitions produce (no server needed)."""
    prometheus_client = module("prometheus_client")
    module("qwenasr_appliance.metrics")  # registers the appliance's metrics in the default registry
    return str(prometheus_client.generate_latest(prometheus_client.REGISTRY).decode())


# --- PromQL ---------------------------------------------------------------------------------------

_GRAFANA_RANGE_VARS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<selector>.+),)?\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$")


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's interval macros by a duration so the expression parses as plain PromQL.
    Template variables used inside label matchers (`job=~"$job"`) are plain strings and stay."""
    return _GRAFANA_RANGE_VARS.sub("5m", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names of every selector in a PromQL expression (raises on a syntax error)."""
    promql = module("promql_parser")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if node is None:
            return
        if isinstance(node, promql.VectorSelector):
            name = node.name
            if not name:
                for matcher in node.matchers.matchers:
                    if matcher.name == "__name__" and matcher.op == promql.MatchOp.Equal:
                        name = matcher.value
            if not name:
                raise ValueError(f"selector without a metric name in {expr!r}")
            names.add(name)
        elif isinstance(node, promql.MatrixSelector):
            visit(node.vector_selector)
        elif isinstance(node, promql.Call):
            for arg in node.args:
                visit(arg)
        elif isinstance(node, promql.BinaryExpr):
            visit(node.lhs)
            visit(node.rhs)
        elif isinstance(node, promql.AggregateExpr):
            visit(node.expr)
            visit(node.param)
        elif isinstance(node, promql.SubqueryExpr | promql.ParenExpr | promql.UnaryExpr):
            visit(node.expr)

    visit(promql.parse(expr))
    return names


def variable_query_names(query: str) -> set[str]:
    """Metric names in a Grafana variable query (`label_values(metric{...}, label)` or plain PromQL)."""
    match = _LABEL_VALUES.match(query)
    if match:
        return metric_names(match["selector"]) if match["selector"] else set()
    return metric_names(grafana_to_promql(query))


def dashboard_queries(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(location, expr) for every PromQL expression of a dashboard: panel targets (rows included)
    and annotation queries. Variable queries are handled by `dashboard_variable_queries`."""
    if isinstance(node, dict):
        title = node.get("title") or node.get("name") or where
        if isinstance(node.get("expr"), str) and node["expr"].strip():
            yield f"{title} [{node.get('refId', '-')}]", node["expr"]
        for key, value in node.items():
            if key != "templating":
                yield from dashboard_queries(value, str(title))
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item, where)


def dashboard_variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        if query:
            yield f"variable {variable['name']}", str(query)


def iter_panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))
