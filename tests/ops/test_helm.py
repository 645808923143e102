"""The Helm chart: `helm lint --strict`, `helm template` for the default and the full-featured values,
every rendered manifest validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict),
values.schema.json rejecting bad values, the chart's own guards, and the objects agreeing with each
other and with the appliance (env names and values parse with the appliance's own config loader).

Helm itself is the real Helm v4 engine through `helm-python-sdk` (no helm CLI is installable here).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ops.opstools import CHART, DASHBOARD, REPO, RULES, module, tool

KUBE_VERSIONS = ("1.27.0", "1.37.0")  # Chart.yaml kubeVersion minimum, newest bundled schema
RELEASE, NAMESPACE = "asr", "speech"
VALUES_FILES = {
    "default": None,
    "full": CHART / "ci" / "full-values.yaml",
    "keda-cpu-airgapped": CHART / "ci" / "keda-values.yaml",
    "statefulset-keda": CHART / "ci" / "statefulset-values.yaml",
}
CRD_API_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
# The target label the chart's monitors add from the pods' app.kubernetes.io/instance label
# (podTargetLabels): the release's series are selected by it, never by a pod-name pattern.
RELEASE_LABEL = "app_kubernetes_io_instance"
SCRAPED: dict[str, Any] = {"metrics": {"serviceMonitor": {"enabled": True}}}  # KEDA needs a chart monitor


def load_values(name: str) -> dict[str, Any]:
    path = VALUES_FILES[name]
    return yaml.safe_load(path.read_text()) if path else {}


@pytest.fixture(scope="module")
def helm() -> Any:
    return module("helm_python")


@pytest.fixture(scope="module")
def chart(helm: Any) -> Iterator[Any]:
    loaded = helm.Chart.load(CHART)
    yield loaded
    loaded.close()


Rendered = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, Rendered]:
    """values set -> kind -> objects."""
    out: dict[str, Rendered] = {}
    for name in VALUES_FILES:
        manifests = chart.render(load_values(name), name=RELEASE, namespace=NAMESPACE, is_install=True)
        by_kind: Rendered = {}
        for path, text in manifests.items():
            if path.endswith("NOTES.txt"):
                by_kind.setdefault("NOTES", []).append({"text": text})
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("_template", path)
                    by_kind.setdefault(doc["kind"], []).append(doc)
        out[name] = by_kind
    return out


def one(objects: Rendered, kind: str) -> dict[str, Any]:
    assert len(objects.get(kind, [])) == 1, f"expected one {kind}, got {len(objects.get(kind, []))}"
    return objects[kind][0]


def hook_of(obj: dict[str, Any]) -> str | None:
    hook: str | None = obj["metadata"].get("annotations", {}).get("helm.sh/hook")
    return hook


def workload(objects: Rendered) -> dict[str, Any]:
    """The server's Deployment or StatefulSet (exactly one of them)."""
    found = objects.get("Deployment", []) + objects.get("StatefulSet", [])
    assert len(found) == 1, f"expected one Deployment or StatefulSet, got {len(found)}"
    return found[0]


def server_pod_spec(objects: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = workload(objects)["spec"]["template"]["spec"]
    return spec


def appliance_container(objects: Rendered) -> dict[str, Any]:
    (container,) = [c for c in server_pod_spec(objects)["containers"] if c["name"] == "appliance"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- lint and template ----------------------------------------------------------------------------


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_helm_lint_strict_is_clean(helm: Any, values_name: str) -> None:
    report = helm.lint(CHART, load_values(values_name) or None, strict=True, kube_version=f"v{KUBE_VERSIONS[0]}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings fail under --strict
    assert not problems and not report["errors"], json.dumps(report, indent=2)


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_rendered_manifests_pass_kubernetes_schemas(rendered: dict[str, Rendered], values_name: str) -> None:
    kubernetes_validate = module("kubernetes_validate")
    problems, checked = [], 0
    for kind, objects in rendered[values_name].items():
        if kind == "NOTES":
            continue
        for obj in objects:
            doc = {k: v for k, v in obj.items() if k != "_template"}
            if doc["apiVersion"].startswith(CRD_API_GROUPS):
                continue  # no bundled schema: see test_custom_resources_are_well_formed
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    problems.append(f"{kind}/{doc['metadata']['name']} @ {version}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked >= 2  # at least the Deployment and the Service
    assert not problems, "\n".join(problems)


def test_full_values_enable_every_feature(rendered: dict[str, Rendered]) -> None:
    full = rendered["full"]
    expected = {
        "Deployment", "Service", "ServiceAccount", "Secret", "PersistentVolumeClaim", "Ingress",
        "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule", "PodDisruptionBudget",
        "NetworkPolicy", "ConfigMap", "Pod",
    }  # fmt: skip
    assert expected <= set(full), f"missing: {expected - set(full)}"
    # One monitor per release (both scrape every pod twice): the PodMonitor renders in the KEDA values.
    assert "PodMonitor" not in full
    assert {"ScaledObject", "PodMonitor"} <= set(rendered["keda-cpu-airgapped"])
    assert "ServiceMonitor" not in rendered["keda-cpu-airgapped"]
    assert "HorizontalPodAutoscaler" not in rendered["keda-cpu-airgapped"]
    default = rendered["default"]
    assert {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "PodDisruptionBudget"} <= set(default)
    assert not {"Ingress", "ServiceMonitor", "PrometheusRule", "NetworkPolicy", "ScaledObject"} & set(default)


def test_custom_resources_are_well_formed(rendered: dict[str, Rendered]) -> None:
    """CRDs have no bundled schema: check what would break them (selectors, ports, required fields)."""
    service = one(rendered["full"], "Service")
    for name, kind, endpoints_key in (
        ("full", "ServiceMonitor", "endpoints"),
        ("keda-cpu-airgapped", "PodMonitor", "podMetricsEndpoints"),
    ):
        pod_labels = one(rendered[name], "Deployment")["spec"]["template"]["metadata"]["labels"]
        monitor = one(rendered[name], kind)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        target_labels = service["metadata"]["labels"] if kind == "ServiceMonitor" else pod_labels
        assert subset(monitor["spec"]["selector"]["matchLabels"], target_labels), kind
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"][endpoints_key]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    scaled = one(rendered["keda-cpu-airgapped"], "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert (
        scaled["spec"]["scaleTargetRef"]["name"]
        == one(rendered["keda-cpu-airgapped"], "Deployment")["metadata"]["name"]
    )
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
    assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata must be strings"
    promql = module("promql_parser")
    promql.parse(trigger["metadata"]["query"])


# --- the pods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_pod_security_and_probes(rendered: dict[str, Rendered], values_name: str) -> None:
    objects = rendered[values_name]
    spec = server_pod_spec(objects)
    container = appliance_container(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    for each in [container, *spec.get("initContainers", [])]:
        security = each["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
    # Readiness on /ready, liveness on /health (never on the engine), a startup budget of minutes.
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # Writable paths for a read-only root filesystem.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/cache", "/tmp", "/dev/shm", "/models"} <= mounts
    volume_names = {v["name"] for v in spec["volumes"]} | {
        t["metadata"]["name"] for t in workload(objects)["spec"].get("volumeClaimTemplates", [])
    }
    assert {m["name"] for m in container["volumeMounts"]} <= volume_names
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_termination_grace_exceeds_the_drain(rendered: dict[str, Rendered], values_name: str) -> None:
    objects = rendered[values_name]
    spec = server_pod_spec(objects)
    container = appliance_container(objects)
    drain = float(env_of(container)["SHUTDOWN_GRACE_SECONDS"])
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain


def test_gpu_resources(rendered: dict[str, Rendered]) -> None:
    for name in ("default", "full"):
        limits = appliance_container(rendered[name])["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1, name
    full_spec = server_pod_spec(rendered["full"])
    assert full_spec["runtimeClassName"] == "nvidia"
    assert full_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert full_spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in full_spec["affinity"]
    assert full_spec["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"]
    cpu = appliance_container(rendered["keda-cpu-airgapped"])
    assert not any("gpu" in key for key in cpu["resources"].get("limits", {}))


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_env_is_what_the_appliance_reads(rendered: dict[str, Rendered], values_name: str) -> None:
    """Every config variable is settable from values, and the rendered values load with the appliance's
    own parser (no `2.62144e+07`-style float rendering, every range respected)."""
    config = module("qwenasr_appliance.config")
    env = env_of(appliance_container(rendered[values_name]))
    settable = set(config.ENV_VARIABLES) - {"API_KEYS", "API_KEYS_FILE"}  # keys come from a Secret
    assert settable <= set(env), f"config variables the chart cannot set: {sorted(settable - set(env))}"
    literal = {name: value for name, value in env.items() if isinstance(value, str)}
    settings = config.load_settings(literal)  # raises ConfigError naming the bad variable
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"] | load_values(values_name).get("config", {})
    assert settings.max_upload_bytes == values["maxUploadBytes"]
    assert settings.model_id == values["modelId"]
    assert literal["HF_HOME"].endswith("/huggingface")


def test_api_keys_come_from_a_secret(rendered: dict[str, Rendered]) -> None:
    full = rendered["full"]
    secret = one(full, "Secret")
    env = env_of(appliance_container(full))
    assert env["API_KEYS"] == {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "api-keys"}}
    assert base64.b64decode(secret["data"]["api-keys"]).decode() == "sk-test-0123456789,sk-test-abcdefghij"
    external = env_of(appliance_container(rendered["keda-cpu-airgapped"]))
    assert external["API_KEYS"] == {"secretKeyRef": {"name": "qwenasr-api-keys", "key": "keys"}}
    assert "API_KEYS" not in env_of(appliance_container(rendered["default"]))
    assert "Secret" not in rendered["default"]


def test_model_cache_volume(rendered: dict[str, Rendered]) -> None:
    default = rendered["default"]
    claim = one(default, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    models = {v["name"]: v for v in server_pod_spec(default)["volumes"]}["models"]
    assert models["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    airgapped = rendered["keda-cpu-airgapped"]
    assert "PersistentVolumeClaim" not in airgapped
    volume = {v["name"]: v for v in server_pod_spec(airgapped)["volumes"]}["models"]
    assert volume["persistentVolumeClaim"] == {"claimName": "qwen3-asr-weights", "readOnly": True}
    assert env_of(appliance_container(airgapped))["HF_HUB_OFFLINE"] == "1"
    prefetch = server_pod_spec(rendered["full"])["initContainers"][0]
    assert prefetch["name"] == "prefetch-model"
    compile(prefetch["command"][2], "prefetch", "exec")


def test_selectors_tie_the_objects_together(rendered: dict[str, Rendered]) -> None:
    full = rendered["full"]
    deployment = one(full, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert subset(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(full, "Service")
    assert subset(service["spec"]["selector"], pod_labels)
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert subset(one(full, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert subset(one(full, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], pod_labels)
    hpa = one(full, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "qwenasr_requests_queued"
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    (ingress,) = [i for i in full["Ingress"] if i["metadata"]["name"] == deployment["metadata"]["name"]]
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert server_pod_spec(full)["serviceAccountName"] == one(full, "ServiceAccount")["metadata"]["name"]


def test_network_policy_admits_the_test_pod(rendered: dict[str, Rendered]) -> None:
    full = rendered["full"]
    policy = one(full, "NetworkPolicy")
    (test_pod,) = [p for p in full["Pod"] if hook_of(p) == "test"]
    allowed = [
        peer["podSelector"]["matchLabels"] for peer in policy["spec"]["ingress"][0]["from"] if "podSelector" in peer
    ]
    assert any(subset(selector, test_pod["metadata"]["labels"]) for selector in allowed)
    assert "Egress" in policy["spec"]["policyTypes"]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 443} <= egress_ports


# --- helm test hook -------------------------------------------------------------------------------


def test_helm_test_hook_transcribes_the_bundled_clip(rendered: dict[str, Rendered]) -> None:
    full = rendered["full"]
    (pod,) = [p for p in full["Pod"] if hook_of(p) == "test"]
    (config_map,) = [c for c in full["ConfigMap"] if hook_of(c) == "test"]
    container = pod["spec"]["containers"][0]
    env = env_of(container)
    service = one(full, "Service")
    assert (
        env["BASE_URL"] == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{service['spec']['ports'][0]['port']}"
    )
    assert env["API_KEY"]["secretKeyRef"]["name"] == one(full, "Secret")["metadata"]["name"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    clip = base64.b64decode(config_map["binaryData"]["test-clip.wav"])
    assert clip == (CHART / "files" / "test-clip.wav").read_bytes()
    assert clip[:4] == b"RIFF" and clip[8:12] == b"WAVE" and len(clip) < 100_000
    compile(config_map["data"]["check.py"], "check.py", "exec")
    assert "/v1/audio/transcriptions" in config_map["data"]["check.py"]


def test_helm_test_script_against_the_live_server(live_server_url: str, tmp_path: Path) -> None:
    """Run the hook's script exactly as the test pod does, against a real server process."""
    script = CHART / "files" / "helm-test-transcribe.py"
    env = {"BASE_URL": live_server_url, "EXPECT_SUBSTRING": "", "TIMEOUT_SECONDS": "60",
           "CLIP": str(CHART / "files" / "test-clip.wav"), "PATH": "/usr/bin:/bin"}  # fmt: skip
    result = subprocess.run([tool("python3"), "-B", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok:" in result.stdout


# --- monitoring objects -------------------------------------------------------------------------------


def test_prometheus_rule_is_the_deploy_rules(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    rule = one(rendered["full"], "PrometheusRule")
    source = yaml.safe_load(RULES.read_text())
    groups = {g["name"]: g for g in rule["spec"]["groups"]}
    for group in source["groups"]:
        rendered_rules = groups[group["name"]]["rules"]
        expected = [r for r in group["rules"] if r.get("alert") != "QwenASRNoTraffic"]  # disabled in full values
        assert len(rendered_rules) == len(expected)
        for got, want in zip(rendered_rules, expected, strict=True):
            if want.get("alert") == "QwenASRDown":  # per release: see test_chart_down_alert_is_per_release
                assert got["expr"].startswith("absent(qwenasr_build_info{namespace=")
                continue
            assert got["expr"] == want["expr"]
            assert got.get("annotations") == want.get("annotations")
            if "alert" in want:
                assert got["labels"] == {**want["labels"], "team": "speech"}
    assert "qwenasr-appliance.custom" in groups
    # The rendered groups (templates in annotations intact, extra group included) pass promtool.
    rules_file = tmp_path / "rendered.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [tool("promtool", "PROMTOOL"), "check", "rules", str(rules_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_of(objects: Rendered) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(ConfigMap, data key, dashboard) of the chart's dashboard ConfigMap."""
    (config_map,) = [c for c in objects["ConfigMap"] if hook_of(c) is None]
    ((key, text),) = config_map["data"].items()
    return config_map, key, json.loads(text)


def test_dashboard_config_map_is_the_deploy_dashboard(rendered: dict[str, Rendered]) -> None:
    config_map, key, dashboard = dashboard_of(rendered["full"])
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert key.endswith(".json")
    source = json.loads(DASHBOARD.read_text())
    # The same dashboard, made per release: uid, title and the namespace variable's default.
    per_release = {"uid", "title", "templating"}
    assert {k: v for k, v in dashboard.items() if k not in per_release} == {
        k: v for k, v in source.items() if k not in per_release
    }
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for variable in source["templating"]["list"]:
        if variable["name"] != "namespace":
            assert variables[variable["name"]] == variable


def test_notes_render(rendered: dict[str, Rendered]) -> None:
    notes = rendered["default"]["NOTES"][0]["text"]
    assert "port-forward service/asr-qwenasr-appliance" in notes
    assert "no API keys are configured" in notes
    assert "https://asr.example.com" in rendered["full"]["NOTES"][0]["text"]


# --- values.schema.json and the chart's guards ----------------------------------------------------------

BAD_VALUES = {
    "negative replicas": {"replicaCount": -1},
    "unknown quantMode": {"config": {"quantMode": "int8"}},
    "unknown engine": {"config": {"engine": "tensorrt"}},
    "gpu memory share above 1": {"config": {"gpuMemoryUtilization": 1.5}},
    "gpu memory share 0": {"config": {"gpuMemoryUtilization": 0}},
    "aligner memory share 0": {"config": {"alignerGpuMemoryUtilization": 0}},
    "chunk below 5 s": {"config": {"chunkSeconds": 2}},
    "negative drain": {"config": {"shutdownGraceSeconds": -5}},
    "string where a number goes": {"config": {"maxQueueSize": "lots"}},
    "typo in a config key": {"config": {"modelID": "x"}},
    "typo at the top level": {"replicas": 2},
    "empty model id": {"config": {"modelId": ""}},
    "zero GPUs": {"gpu": {"count": 0}},
    # Review 10: one engine per process and no tensor-parallel setting: a second GPU would sit idle.
    "two GPUs per pod": {"gpu": {"count": 2}},
    "bad service type": {"service": {"type": "External"}},
    "bad image digest": {"image": {"digest": "latest"}},
    "api key with a comma": {"apiKeys": {"keys": ["abcdefgh,ijklmnop"]}},
    "bad scrape interval": {"metrics": {"serviceMonitor": {"enabled": True, "interval": "often"}}},
    "unknown pull policy": {"image": {"pullPolicy": "Sometimes"}},
}


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_schema_rejects_bad_values(chart: Any, helm: Any, bad: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(BAD_VALUES[bad])
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)):
        chart.render(BAD_VALUES[bad], name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values_name", list(VALUES_FILES))
def test_schema_accepts_the_shipped_values(chart: Any, values_name: str) -> None:
    chart.validate_schema(load_values(values_name))


GUARDED = {
    "hpa and keda together": ({"autoscaling": {"enabled": True}, "keda": {"enabled": True}}, "alternatives"),
    "vllm without a gpu": ({"gpu": {"enabled": False}, "config": {"engine": "vllm"}}, "no GPU"),
    "grace shorter than the drain": ({"terminationGracePeriodSeconds": 20}, "killed mid-drain"),
    "prefetch of a local path": (
        {"config": {"modelId": "/models/x"}, "modelCache": {"prefetch": {"enabled": True}}},
        "local path",
    ),
    "max new tokens over the context": ({"config": {"maxModelLen": 256, "maxNewTokens": 512}}, "maxModelLen"),
    "aligner with chunks over 180 s": ({"config": {"alignerModelId": "x/y", "chunkSeconds": 300}}, "180"),
    # Issue 17: autoscaling on one shared ReadWriteOnce claim, KEDA from zero, a deadline under the budget.
    "hpa on a shared ReadWriteOnce claim": ({"autoscaling": {"enabled": True}}, "ReadWriteOnce model volume"),
    "keda on a shared ReadWriteOnce claim": (
        {"keda": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
        "workloadKind: StatefulSet",
    ),
    "hpa on a shared ReadWriteOncePod claim": (
        {"autoscaling": {"enabled": True}, "modelCache": {"accessModes": ["ReadWriteOncePod"]}},
        "ReadWriteOnce",
    ),
    "keda scaling to zero": (
        {"keda": {"enabled": True, "minReplicaCount": 0}, "workloadKind": "StatefulSet", **SCRAPED},
        "could never scale back up",
    ),
    "progress deadline under the startup budget": ({"progressDeadlineSeconds": 600}, "startup budget"),
    # Review 1: without a monitor of the chart nothing carries the labels the default query selects: no
    # data would read as no load (or, without vector(0), hold KEDA in its fallback for good).
    "keda without a service or pod monitor": (
        {"keda": {"enabled": True}, "workloadKind": "StatefulSet"},
        "ServiceMonitor or a PodMonitor",
    ),
    # Review 5: /health and /ready need the key, probes get 401, the pod restarts forever.
    "ops endpoints protected, probes without a key": (
        {"config": {"protectOpsEndpoints": True}, "apiKeys": {"existingSecret": "keys"}},
        "probes.httpHeaders",
    ),
    "ops endpoints protected, probes with another header": (
        {
            "config": {"protectOpsEndpoints": True},
            "apiKeys": {"existingSecret": "keys"},
            "probes": {"httpHeaders": [{"name": "X-Probe", "value": "kubelet"}]},
        },
        "Authorization",
    ),
    "ops endpoints protected, scraped without credentials": (
        {
            "config": {"protectOpsEndpoints": True},
            "apiKeys": {"existingSecret": "keys"},
            "probes": {"httpHeaders": [{"name": "Authorization", "value": "Bearer probe-key-0123"}]},
            "metrics": {"podMonitor": {"enabled": True}},
        },
        "metrics.podMonitor.authorization",
    ),
    # Review 13: a shared existing claim is as ReadWriteOnce as a created one unless declared otherwise.
    "hpa on an existing claim of unknown access": (
        {"autoscaling": {"enabled": True}, "modelCache": {"existingClaim": "weights"}},
        "modelCache.existingClaimAccessMode",
    ),
    "keda on an existing ReadWriteOnce claim": (
        {
            "keda": {"enabled": True},
            **SCRAPED,
            "workloadKind": "StatefulSet",
            "modelCache": {"existingClaim": "weights", "existingClaimAccessMode": "ReadWriteOnce"},
        },
        "ReadWriteMany",
    ),
    "extraEnv repeating a config variable": (
        {"extraEnv": [{"name": "MAX_NUM_SEQS", "value": "8"}]},
        "config.maxNumSeqs",
    ),
    "extraEnv repeating HF_HOME": ({"extraEnv": [{"name": "HF_HOME", "value": "/x"}]}, "modelCache.mountPath"),
    # Review 9: both monitors scrape every pod twice (dashboard totals and KEDA's load doubled).
    "service and pod monitors together": (
        {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
        "scrape every pod twice",
    ),
    "caches on a read-only model volume": (
        {"cache": {"volume": "modelVolume"}, "modelCache": {"readOnly": True}},
        "writable volume",
    ),
}


@pytest.mark.parametrize("case", list(GUARDED))
def test_template_guards_refuse_inconsistent_values(chart: Any, helm: Any, case: str) -> None:
    values, message = GUARDED[case]
    with pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_chart_app_version_is_the_project_version(chart: Any) -> None:
    tomllib = module("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart.metadata["appVersion"] == project["version"]


# --- issue 17: what breaks on a real GPU cluster ----------------------------------------------------


def render(chart: Any, values: dict[str, Any]) -> Rendered:
    by_kind: Rendered = {}
    for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True).items():
        if path.endswith("NOTES.txt"):
            by_kind.setdefault("NOTES", []).append({"text": text})
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def test_gpu_pods_get_the_nvidia_runtime_toleration_and_expect_gpu(rendered: dict[str, Rendered]) -> None:
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name in ("default", "full", "statefulset-keda"):
        spec = server_pod_spec(rendered[name])
        env = env_of(appliance_container(rendered[name]))
        assert spec["runtimeClassName"] == "nvidia", name
        assert spec["tolerations"].count(gpu_toleration) == 1, name  # full values list it too: not twice
        assert env["EXPECT_GPU"] == "true" and env["GPU_FALLBACK"] == "not_ready", name
    cpu = rendered["keda-cpu-airgapped"]
    spec = server_pod_spec(cpu)
    assert "runtimeClassName" not in spec and gpu_toleration not in spec.get("tolerations", [])
    assert env_of(appliance_container(cpu))["EXPECT_GPU"] == "false"


def test_schema_knows_gpu_fallback_modes(chart: Any, helm: Any) -> None:
    chart.validate_schema({"config": {"gpuFallback": "not_ready"}})
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"config": {"gpuFallback": "cpu"}})


def test_statefulset_gives_each_replica_its_own_model_volume(rendered: dict[str, Rendered]) -> None:
    objects = rendered["statefulset-keda"]
    assert "Deployment" not in objects and "PersistentVolumeClaim" not in objects
    sts = one(objects, "StatefulSet")
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "models"
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert template["spec"]["resources"]["requests"]["storage"] == "30Gi"
    assert "models" not in {v["name"] for v in server_pod_spec(objects)["volumes"]}
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenScaled": "Retain", "whenDeleted": "Retain"}
    services = {s["metadata"]["name"]: s for s in objects["Service"]}
    headless = services[sts["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    # The ServiceMonitor selects the main Service only (each pod scraped once).
    monitor = one(objects, "ServiceMonitor")
    selected = [
        n
        for n, svc in services.items()
        if subset(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    ]
    assert selected == [sts["metadata"]["name"]]
    scaled = one(objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }


def test_rollout_survives_a_first_start(rendered: dict[str, Rendered]) -> None:
    """progressDeadlineSeconds covers the startup probe's budget (download + compile: ~15 min)."""
    for name, objects in rendered.items():
        if "Deployment" not in objects:
            continue
        deployment = one(objects, "Deployment")
        startup = appliance_container(objects)["startupProbe"]
        budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
        assert deployment["spec"]["progressDeadlineSeconds"] > budget, name
    assert one(rendered["default"], "Deployment")["spec"]["progressDeadlineSeconds"] >= 900 + 300


def test_default_rollout_keeps_the_single_replica_serving(rendered: dict[str, Rendered]) -> None:
    strategy = one(rendered["default"], "Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_drain_covers_the_longest_request(rendered: dict[str, Rendered]) -> None:
    """The default drain lets an admitted request finish (queue wait + request timeout): no 503 for long
    jobs at every rollout; terminationGracePeriodSeconds covers preStop + drain."""
    objects = rendered["default"]
    env = env_of(appliance_container(objects))
    drain = float(env["SHUTDOWN_GRACE_SECONDS"])
    assert drain >= float(env["REQUEST_TIMEOUT_SECONDS"]) + float(env["QUEUE_TIMEOUT_SECONDS"])
    pre_stop = float(appliance_container(objects)["lifecycle"]["preStop"]["exec"]["command"][1])
    assert server_pod_spec(objects)["terminationGracePeriodSeconds"] > pre_stop + drain
    # An explicit drain is kept as given (full values: 60 s).
    assert env_of(appliance_container(rendered["full"]))["SHUTDOWN_GRACE_SECONDS"] == "60"


def test_resources_fit_the_work(rendered: dict[str, Rendered]) -> None:
    resources = appliance_container(rendered["default"])["resources"]
    assert float(resources["requests"]["cpu"]) >= 8  # an H200 at c=256 used 16 cores
    assert float(resources["limits"]["cpu"]) >= 16  # the quota DECODE_WORKERS=0 sizes from
    assert resources["requests"]["ephemeral-storage"] and resources["limits"]["ephemeral-storage"]


def test_compile_caches_persist_on_the_model_volume(rendered: dict[str, Rendered]) -> None:
    for name in ("default", "full", "statefulset-keda"):
        mounts = {m["mountPath"]: m for m in appliance_container(rendered[name])["volumeMounts"]}
        assert mounts["/cache"]["name"] == "models" and mounts["/cache"]["subPath"] == "cache", name
        assert "cache" not in {v["name"] for v in server_pod_spec(rendered[name])["volumes"]}, name
    # A read-only (air-gapped) model volume: the caches fall back to an emptyDir.
    airgapped = rendered["keda-cpu-airgapped"]
    mounts = {m["mountPath"]: m for m in appliance_container(airgapped)["volumeMounts"]}
    assert mounts["/cache"]["name"] == "cache"
    assert "emptyDir" in {v["name"]: v for v in server_pod_spec(airgapped)["volumes"]}["cache"]
    prefetch = server_pod_spec(rendered["full"])["initContainers"][0]
    assert {m["mountPath"]: m for m in prefetch["volumeMounts"]}["/cache"]["name"] == "models"


def test_keda_scales_on_capacity_with_a_fallback(rendered: dict[str, Rendered]) -> None:
    from tests.ops.opstools import metric_names, registry_exposition, sample_names

    for name, capacity in (("statefulset-keda", 64), ("keda-cpu-airgapped", 1)):
        scaled = one(rendered[name], "ScaledObject")
        spec = scaled["spec"]
        assert spec["minReplicaCount"] >= 1
        assert spec["fallback"] == {"failureThreshold": 3, "replicas": spec["maxReplicaCount"]}
        (trigger,) = spec["triggers"]
        assert trigger["metricType"] == "AverageValue"  # KEDA's fallback needs it
        query = trigger["metadata"]["query"]
        live, values_derived = split_or(query)  # no `or vector(0)`: missing data is not zero load
        # Each pod's load over its live admission limit (the engine's capacity when MAX_CONCURRENT_REQUESTS=0)...
        assert live.startswith("sum((") and "/ qwenasr_concurrency_limit{" in live, query
        # ...or, for pods of an image without that gauge, over the limit derived from the values.
        assert values_derived.endswith(f"/ {capacity})"), query
        assert trigger["metadata"]["ignoreNullValues"] == "false"
        assert "qwenasr_concurrency_limit" in metric_names(query)
        assert metric_names(query) <= sample_names(registry_exposition())
        assert query.count(f'namespace="{NAMESPACE}"') == 5
    assert float(one(rendered["statefulset-keda"], "ScaledObject")["spec"]["triggers"][0]["metadata"]["threshold"]) < 1
    # The default capacity is the vLLM engine's own limit (maxNumSeqs) when maxConcurrentRequests is 0.


def split_or(query: str) -> list[str]:
    """The top-level `or` operands of a PromQL expression (outside parentheses and braces)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(query):
        if char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        if depth == 0 and query.startswith(" or ", index):
            parts.append(query[start:index].strip())
            start = index + 4
    return [*parts, query[start:].strip()]


def test_keda_default_capacity_follows_the_engine(chart: Any) -> None:
    objects = render(chart, {"workloadKind": "StatefulSet", "keda": {"enabled": True}, **SCRAPED})
    query = one(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert split_or(query)[1].endswith("/ 256)")


def test_keda_default_query_on_sample_series(chart: Any, tmp_path: Path) -> None:
    """The default query's value for two pods: one running 256 of 256 with 64 queued, one idle
    that fell back to the CPU engine (limit 1): 1.25 + 0 replicas' worth of work. promtool evaluates it."""
    objects = render(chart, {"workloadKind": "StatefulSet", "keda": {"enabled": True}, **SCRAPED})
    rendered_query = one(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    selector = rendered_query[rendered_query.index("{") + 1 : rendered_query.index("}")]
    assert f'namespace="{NAMESPACE}"' in selector
    query = rendered_query.replace(selector, 'job="asr"')
    series = {
        "qwenasr_requests_in_flight": (256, 0),
        "qwenasr_requests_queued": (64, 0),
        "qwenasr_concurrency_limit": (256, 1),
    }
    lines = ["rule_files: []", "evaluation_interval: 1m", "tests:", "  - interval: 1m", "    input_series:"]
    for name, (gpu, cpu) in series.items():
        lines += [f'      - series: \'{name}{{job="asr", pod="gpu"}}\'', f"        values: '{gpu}x5'"]
        lines += [f'      - series: \'{name}{{job="asr", pod="cpu"}}\'', f"        values: '{cpu}x5'"]
    lines += [
        "    promql_expr_test:",
        f"      - expr: '{query}'",
        "        eval_time: 2m",
        "        exp_samples:",
        "          - labels: '{}'",
        "            value: 1.25",
    ]
    path = tmp_path / "keda-query-test.yaml"
    path.write_text("\n".join(lines) + "\n")
    result = subprocess.run([tool("promtool", "PROMTOOL"), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ingress_limits_follow_the_appliance(rendered: dict[str, Rendered]) -> None:
    objects = rendered["statefulset-keda"]
    ingresses = {i["metadata"]["name"]: i for i in objects["Ingress"]}
    name = one(objects, "StatefulSet")["metadata"]["name"]
    main, realtime = ingresses[name], ingresses[f"{name}-realtime"]
    notes = main["metadata"]["annotations"]
    env = env_of(appliance_container(objects))
    prefix = "nginx.ingress.kubernetes.io/"
    body = notes[prefix + "proxy-body-size"]
    assert body.endswith("m") and int(body[:-1]) * 1024 * 1024 > int(env["MAX_UPLOAD_BYTES"])
    longest = float(env["REQUEST_TIMEOUT_SECONDS"]) + float(env["QUEUE_TIMEOUT_SECONDS"])
    assert int(notes[prefix + "proxy-read-timeout"]) > longest
    assert int(notes[prefix + "proxy-send-timeout"]) > longest
    assert notes[prefix + "proxy-request-buffering"] == "off"
    # WebSocket path: its own Ingress, same hosts and backend, long timeouts.
    (rule,) = realtime["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/v1/realtime" and path["backend"] == main["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert int(realtime["metadata"]["annotations"][prefix + "proxy-read-timeout"]) >= 3600
    assert realtime["spec"]["ingressClassName"] == "nginx"
    # Explicit annotations win over the derived ones (full values: 100m, 900 s).
    (full_main,) = [i for i in rendered["full"]["Ingress"] if not i["metadata"]["name"].endswith("-realtime")]
    assert full_main["metadata"]["annotations"][prefix + "proxy-body-size"] == "100m"
    assert full_main["metadata"]["annotations"][prefix + "proxy-request-buffering"] == "off"


def test_hugging_face_token_and_offline_mode_are_values(rendered: dict[str, Rendered]) -> None:
    full = rendered["full"]
    token = {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env_of(appliance_container(full))["HF_TOKEN"] == token
    assert env_of(server_pod_spec(full)["initContainers"][0])["HF_TOKEN"] == token
    assert "HF_TOKEN" not in env_of(appliance_container(rendered["default"]))
    assert "HF_HUB_OFFLINE" not in env_of(appliance_container(rendered["default"]))
    assert env_of(appliance_container(rendered["keda-cpu-airgapped"]))["HF_HUB_OFFLINE"] == "1"


def test_helm_test_image_is_configurable_and_pinnable(rendered: dict[str, Rendered]) -> None:
    (pod,) = [p for p in rendered["full"]["Pod"] if hook_of(p) == "test"]
    image = pod["spec"]["containers"][0]["image"]
    assert image.startswith("registry.example.com/mirror/python@sha256:")
    (pod,) = [p for p in rendered["default"]["Pod"] if hook_of(p) == "test"]
    assert pod["spec"]["containers"][0]["image"] == "docker.io/library/python:3.12-alpine"


def test_notes_warn_when_monitors_have_no_selector_labels(chart: Any, rendered: dict[str, Rendered]) -> None:
    objects = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}, "prometheusRule": {"enabled": True}})
    notes = objects["NOTES"][0]["text"]
    assert "metrics.serviceMonitor.labels" in notes and "prometheusRule.labels" in notes
    assert "release: kube-prometheus-stack" in notes
    assert "metrics.serviceMonitor.labels" not in rendered["full"]["NOTES"][0]["text"]


def test_chart_down_alert_is_per_release(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """The chart's QwenASRDown watches its own release's pods: promtool shows it firing while another
    release (another namespace, same names) is up, and silent while this release is up."""
    rule = one(rendered["statefulset-keda"], "PrometheusRule")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert all(r["annotations"]["runbook_url"].startswith("https://runbooks.example.com/qwenasr#") for r in alerts)
    (down,) = [r for r in alerts if r["alert"] == "QwenASRDown"]
    assert down["expr"] == f'absent(qwenasr_build_info{{namespace="speech", {RELEASE_LABEL}="asr"}})'
    rules_file = tmp_path / "rendered.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    other = f'qwenasr_build_info{{namespace="other", {RELEASE_LABEL}="asr", pod="asr-qwenasr-appliance-0"}}'
    ours = f'qwenasr_build_info{{namespace="speech", {RELEASE_LABEL}="asr", pod="asr-qwenasr-appliance-0"}}'
    similar = f'qwenasr_build_info{{namespace="speech", {RELEASE_LABEL}="asr-x", pod="asr-x-qwenasr-appliance-0"}}'
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": other, "values": "1x40"},
                    {"series": similar, "values": "1x40"},
                    {"series": ours, "values": "1x10"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "QwenASRDown", "exp_alerts": []},
                    {
                        "eval_time": "35m",
                        "alertname": "QwenASRDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical", "namespace": "speech", RELEASE_LABEL: "asr"},
                                "exp_annotations": {
                                    **{k: v for k, v in down["annotations"].items() if k != "summary"},
                                    "summary": "No qwenasr-appliance target in speech has been scraped for 10 minutes.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    tests_file = tmp_path / "rendered.test.yaml"
    tests_file.write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [tool("promtool", "PROMTOOL"), "test", "rules", str(tests_file)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- platform-engineer review: each finding, rendered and validated -------------------------------


def validate_strict(objects: Rendered) -> int:
    """Every rendered non-CRD object against the Kubernetes schemas (kubernetes-validate, strict)."""
    kubernetes_validate = module("kubernetes_validate")
    problems, checked = [], 0
    for kind, docs in objects.items():
        if kind == "NOTES":
            continue
        for obj in docs:
            doc = {k: v for k, v in obj.items() if k != "_template"}
            if doc["apiVersion"].startswith(CRD_API_GROUPS):
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    problems.append(f"{kind}/{doc['metadata']['name']} @ {version}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert not problems, "\n".join(problems)
    return checked


def test_recreate_strategy_renders_no_rolling_update(chart: Any) -> None:
    """Review 6: `strategy: {type: Recreate}` merged the default rollingUpdate in: the API server refuses
    a Recreate strategy that carries rollingUpdate."""
    objects = render(chart, {"strategy": {"type": "Recreate"}})
    assert one(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    validate_strict(objects)
    notes = objects["NOTES"][0]["text"]
    assert "Recreate" in notes  # an upgrade stops every pod before the new ones have loaded the model
    rolling = render(chart, {"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}})
    assert one(rolling, "Deployment")["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }


def test_pod_disruption_budget_needs_one_bound(chart: Any, helm: Any) -> None:
    """Review 12: both bounds null passed the schema and rendered `maxUnavailable:` without a value."""
    both_null = {"podDisruptionBudget": {"maxUnavailable": None, "minAvailable": None}}
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(both_null)
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)):
        chart.render(both_null, name=RELEASE, namespace=NAMESPACE)
    # Either bound alone renders, and a disabled budget needs none.
    for values, expected in (
        ({"maxUnavailable": None, "minAvailable": 1}, {"minAvailable": 1}),
        ({"maxUnavailable": "50%"}, {"maxUnavailable": "50%"}),
        ({"minAvailable": "50%"}, {"minAvailable": "50%"}),
    ):
        objects = render(chart, {"podDisruptionBudget": values})
        spec = one(objects, "PodDisruptionBudget")["spec"]
        assert {k: v for k, v in spec.items() if k != "selector"} == expected, values
        validate_strict(objects)
    objects = render(chart, {"podDisruptionBudget": {"enabled": False, "maxUnavailable": None}})
    assert "PodDisruptionBudget" not in objects


def promtool_test(tmp_path: Path, tests: dict[str, Any], name: str = "case") -> None:
    path = tmp_path / f"{name}.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([tool("promtool", "PROMTOOL"), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


LONG_RELEASE = "speech-recognition-production-europe-west4-blue"  # fullname truncated to 63 characters


def generated_pod_name(base: str, suffix: str) -> str:
    """A pod name from generateName: Kubernetes truncates the base to 58 characters, then adds 5."""
    return base[:58] + suffix


@pytest.mark.parametrize("workload_kind", ["Deployment", "StatefulSet"])
def test_release_series_are_selected_by_an_exact_label(chart: Any, tmp_path: Path, workload_kind: str) -> None:
    """Review 8: the pod-name regex `<fullname>-[a-z0-9]+-[a-z0-9]+` missed every pod of a long release
    (the generated name is cut to 58 characters, the second dash is gone: QwenASRDown fired forever,
    KEDA read 0) and matched a sibling release `<fullname>-eu` (StatefulSet pods `<fullname>-eu-0`).
    The monitors add the pods' app.kubernetes.io/instance label as a target label, and the KEDA query
    and QwenASRDown select on it: promtool shows both right for a long name and next to a sibling."""
    values: dict[str, Any] = {
        "workloadKind": workload_kind,
        "keda": {"enabled": True},
        "metrics": {"podMonitor": {"enabled": True}},
        "prometheusRule": {"enabled": True},
    }
    if workload_kind == "Deployment":
        values["modelCache"] = {"accessModes": ["ReadWriteMany"]}
    by_kind: Rendered = {}
    for path, text in chart.render(values, name=LONG_RELEASE, namespace=NAMESPACE, is_install=True).items():
        if not path.endswith("NOTES.txt"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    by_kind.setdefault(doc["kind"], []).append(doc)
    validate_strict(by_kind)
    fullname = workload(by_kind)["metadata"]["name"]
    assert len(fullname) == 63
    pod_labels = workload(by_kind)["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app.kubernetes.io/instance"] == LONG_RELEASE
    assert one(by_kind, "PodMonitor")["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]
    # The ServiceMonitor adds the same label.
    service_monitor = render(chart, {"metrics": {"serviceMonitor": {"enabled": True}}})
    assert one(service_monitor, "ServiceMonitor")["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]
    selector = f'namespace="{NAMESPACE}", {RELEASE_LABEL}="{LONG_RELEASE}"'
    query = one(by_kind, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert "pod=~" not in query and query.count(selector) == 5, query
    rule = one(by_kind, "PrometheusRule")
    (down,) = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("alert") == "QwenASRDown"]
    assert down["expr"] == f"absent(qwenasr_build_info{{{selector}}})"

    if workload_kind == "Deployment":
        ours = [generated_pod_name(f"{fullname}-7d9f8c6b5", s) for s in ("x2k9q", "p8m4z")]
    else:
        ours = [f"{fullname}-0", f"{fullname}-1"]
    if workload_kind == "Deployment":  # the former pattern missed every pod of this release
        assert not any(re.fullmatch(f"{fullname}-[a-z0-9]+-[a-z0-9]+", pod) for pod in ours)
    sibling = f"{fullname}-eu"  # another release, fullnameOverride <fullname>-eu, StatefulSet pods
    series: list[dict[str, str]] = []
    for metric, (busy, limit) in {
        "qwenasr_requests_in_flight": ("32x20", None),
        "qwenasr_requests_queued": ("0x20", None),
        "qwenasr_concurrency_limit": (None, "64x20"),
        "qwenasr_build_info": ("1x20", "1x20"),
    }.items():
        for pod in ours:
            labels = f'namespace="{NAMESPACE}", {RELEASE_LABEL}="{LONG_RELEASE}", pod="{pod}"'
            series.append({"series": f"{metric}{{{labels}}}", "values": busy or limit or ""})
        for pod in (f"{sibling}-0", f"{sibling}-1"):  # busy sibling: 128 queued each, must not count
            labels = f'namespace="{NAMESPACE}", {RELEASE_LABEL}="{LONG_RELEASE}-eu", pod="{pod}"'
            value = {"qwenasr_requests_queued": "128x60", "qwenasr_requests_in_flight": "64x60"}.get(metric, "64x60")
            series.append({"series": f"{metric}{{{labels}}}", "values": "1x60" if metric.endswith("info") else value})
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    tests = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                # Two pods at 32 of 64: one replica's worth of work; the sibling's load is not ours.
                "promql_expr_test": [
                    {"expr": query, "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 1}]}
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "QwenASRDown", "exp_alerts": []},
                    # Ours gone after 20 m, the sibling still up: the alert fires for this release.
                    {
                        "eval_time": "40m",
                        "alertname": "QwenASRDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "namespace": NAMESPACE,
                                    RELEASE_LABEL: LONG_RELEASE,
                                },
                                "exp_annotations": {
                                    **{k: v for k, v in down["annotations"].items() if k != "summary"},
                                    "summary": f"No qwenasr-appliance target in {NAMESPACE} has been scraped for 10 minutes.",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    promtool_test(tmp_path, tests, f"release-{workload_kind}")
    # Rules without a monitor of the chart: NOTES name the label a scrape config of one's own must add.
    notes = render(chart, {"prometheusRule": {"enabled": True}})["NOTES"][0]["text"]
    assert RELEASE_LABEL in notes
    assert RELEASE_LABEL not in render(chart, {"prometheusRule": {"enabled": True}, **SCRAPED})["NOTES"][0]["text"]


def test_keda_falls_back_when_the_load_is_missing(chart: Any, rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """Review 1: the default query ended in `or vector(0)`, so missing series (no monitor, relabelling
    that drops the labels, a NetworkPolicy in Prometheus' way) read as zero load: KEDA's fallback, which
    acts only on query errors, never did, and KEDA scaled down. Now the query is empty without data and
    the trigger sets ignoreNullValues "false" (KEDA's default true turns an empty result into 0), so an
    empty result is an error and `fallback` holds maxReplicaCount."""
    for name in ("statefulset-keda", "keda-cpu-airgapped"):
        spec = one(rendered[name], "ScaledObject")["spec"]
        (trigger,) = spec["triggers"]
        query = trigger["metadata"]["query"]
        assert "vector(" not in query, query
        assert trigger["metadata"]["ignoreNullValues"] == "false"
        assert spec["fallback"]["replicas"] == spec["maxReplicaCount"]
    # The chart's own KEDA example is scraped (it enabled KEDA without any monitor).
    keda_values = load_values("keda-cpu-airgapped")["metrics"]
    assert keda_values["podMonitor"]["enabled"] or keda_values["serviceMonitor"]["enabled"]
    # Either monitor suffices; a custom query (the user's own selection) needs none.
    for values in (
        {"metrics": {"podMonitor": {"enabled": True}}},
        SCRAPED,
        {"keda": {"enabled": True, "prometheus": {"query": "sum(my_recorded_load)"}}},
    ):
        objects = render(chart, merged_values({"workloadKind": "StatefulSet", "keda": {"enabled": True}}, values))
        assert "ScaledObject" in objects
        validate_strict(objects)
    # promtool: only another release's series (no data for ours): the query is empty, not 0.
    query = one(rendered["statefulset-keda"], "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    others = f'namespace="{NAMESPACE}", {RELEASE_LABEL}="asr-eu", pod="asr-eu-qwenasr-appliance-0"'
    series = [
        {"series": f"{metric}{{{others}}}", "values": "5x10"}
        for metric in ("qwenasr_requests_queued", "qwenasr_requests_in_flight", "qwenasr_concurrency_limit")
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": query, "eval_time": "5m", "exp_samples": []}],
            }
        ],
    }
    promtool_test(tmp_path, tests, "keda-no-data")


def merged_values(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two values dicts (extra wins)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merged_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_keda_scales_down_as_slowly_as_the_hpa(chart: Any, rendered: dict[str, Rendered]) -> None:
    """Review 3: `keda.advanced` was empty, so the HPA KEDA creates scaled down after 300 s, any number
    of pods at once, each costing a model load of up to 15 min to get back. KEDA's HPA now gets
    autoscaling.behavior by default (horizontalPodAutoscalerConfig.behavior); cooldownPeriod is only
    KEDA's scale-to-zero delay (which the chart refuses), and values.yaml says so."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    for name in ("statefulset-keda", "keda-cpu-airgapped"):
        advanced = one(rendered[name], "ScaledObject")["spec"]["advanced"]
        behavior = advanced["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == defaults["autoscaling"]["behavior"], name
        scale_down = behavior["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= 900
        assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    # Explicit settings win, other advanced keys pass through.
    custom = {"scaleDown": {"stabilizationWindowSeconds": 1800}}
    objects = render(
        chart,
        {
            "workloadKind": "StatefulSet",
            **SCRAPED,
            "keda": {
                "enabled": True,
                "advanced": {
                    "restoreToOriginalReplicaCount": True,
                    "horizontalPodAutoscalerConfig": {"name": "asr-hpa", "behavior": custom},
                },
            },
        },
    )
    advanced = one(objects, "ScaledObject")["spec"]["advanced"]
    assert advanced == {
        "restoreToOriginalReplicaCount": True,
        "horizontalPodAutoscalerConfig": {"name": "asr-hpa", "behavior": custom},
    }
    values_text = (CHART / "values.yaml").read_text()
    comment = values_text[: values_text.index("  cooldownPeriod:")].rsplit("\n  # --", 1)[1]
    assert "zero" in comment and "before scaling to minReplicaCount" not in comment, comment


def test_gpu_pods_that_lost_the_gpu_are_not_ready_by_default(chart: Any, helm: Any) -> None:
    """Review 2: with GPU_FALLBACK=degraded a pod that lost its GPU served on the CPU as ready, with an
    admission limit of 1: its queue grew and KEDA scaled to max. When the chart requests a GPU it now
    sets not_ready (the pod leaves the Service, QwenASRFallbackToCPU still fires); an explicit
    config.gpuFallback wins, and without a GPU the setting does not matter (EXPECT_GPU=false)."""
    config = module("qwenasr_appliance.config")
    cases = {
        "default": ({}, "true", "not_ready"),
        "explicit degraded": ({"config": {"gpuFallback": "degraded"}}, "true", "degraded"),
        "explicit not_ready": ({"config": {"gpuFallback": "not_ready"}}, "true", "not_ready"),
        "cpu only": ({"gpu": {"enabled": False}, "config": {"engine": "cpu"}}, "false", "degraded"),
    }
    for case, (values, expect_gpu, fallback) in cases.items():
        objects = render(chart, values)
        validate_strict(objects)
        env = env_of(appliance_container(objects))
        assert (env["EXPECT_GPU"], env["GPU_FALLBACK"]) == (expect_gpu, fallback), case
        settings = config.load_settings({"EXPECT_GPU": env["EXPECT_GPU"], "GPU_FALLBACK": env["GPU_FALLBACK"]})
        assert settings.gpu_fallback == fallback
    assert yaml.safe_load((CHART / "values.yaml").read_text())["config"]["gpuFallback"] == ""
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"config": {"gpuFallback": "ready"}})


def test_app_outlasts_the_ingress_keepalive(chart: Any, helm: Any, rendered: dict[str, Rendered]) -> None:
    """Review 4: ingress-nginx keeps idle upstream connections 60 s (`upstream-keepalive-timeout`, a
    controller-wide ConfigMap setting) while the app closed idle keep-alive connections after
    CLIENT_TIMEOUT_SECONDS (30 s): nginx reused sockets the app had closed and POSTs failed with 502.
    With the Ingress on, the rendered CLIENT_TIMEOUT_SECONDS is at least
    ingress.upstreamKeepaliveTimeoutSeconds + 5."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["ingress"]["upstreamKeepaliveTimeoutSeconds"] == 60  # ingress-nginx's default
    ingress = {"ingress": {"enabled": True}}
    cases = {
        "no ingress: the app's setting": ({}, 30),
        "ingress: above nginx's 60 s": (ingress, 65),
        "a controller keeping connections 75 s": (
            {"ingress": {"enabled": True, "upstreamKeepaliveTimeoutSeconds": 75}},
            80,
        ),
        "controller without upstream keep-alive": (
            {"ingress": {"enabled": True, "upstreamKeepaliveTimeoutSeconds": 0}},
            30,
        ),
        "a longer explicit timeout stays": ({**ingress, "config": {"clientTimeoutSeconds": 120}}, 120),
    }
    config = module("qwenasr_appliance.config")
    for case, (values, expected) in cases.items():
        objects = render(chart, values)
        validate_strict(objects)
        env = env_of(appliance_container(objects))
        assert float(env["CLIENT_TIMEOUT_SECONDS"]) == expected, case
        assert (
            config.load_settings({"CLIENT_TIMEOUT_SECONDS": env["CLIENT_TIMEOUT_SECONDS"]}).client_timeout_seconds
            == expected
        )
    env = env_of(appliance_container(rendered["statefulset-keda"]))  # ci values with an Ingress
    assert float(env["CLIENT_TIMEOUT_SECONDS"]) > defaults["ingress"]["upstreamKeepaliveTimeoutSeconds"]
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"ingress": {"upstreamKeepaliveTimeoutSeconds": 3600}})  # app's cap: 3600


def test_protected_ops_endpoints_with_probe_credentials(chart: Any) -> None:
    """Review 5: with config.protectOpsEndpoints the probes need an Authorization header (refused
    without: see GUARDED); given one, every probe carries it and the monitor its authorization."""
    header = {"name": "authorization", "value": "Bearer probe-key-0123"}  # header names: any case
    objects = render(
        chart,
        {
            "config": {"protectOpsEndpoints": True},
            "apiKeys": {"existingSecret": "keys"},
            "probes": {"httpHeaders": [header]},
            "metrics": {
                "serviceMonitor": {
                    "enabled": True,
                    "authorization": {"type": "Bearer", "credentials": {"name": "scrape", "key": "token"}},
                }
            },
        },
    )
    container = appliance_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["httpHeaders"] == [header], probe
    assert one(objects, "ServiceMonitor")["spec"]["endpoints"][0]["authorization"]["type"] == "Bearer"
    assert env_of(container)["PROTECT_OPS_ENDPOINTS"] == "true"
    validate_strict(objects)


def test_extra_env_never_repeats_a_chart_variable(chart: Any, helm: Any, rendered: dict[str, Rendered]) -> None:
    """Review 13: extraEnv could repeat a variable the chart sets (MAX_NUM_SEQS, HF_HOME, ...): two env
    entries of one name, the later silently winning. Each name the chart renders, in the server or the
    prefetch container, is refused in extraEnv with the value to set instead; other names pass."""
    full = rendered["full"]
    names = set(env_of(appliance_container(full))) | set(env_of(server_pod_spec(full)["initContainers"][0]))
    names -= {item["name"] for item in load_values("full")["extraEnv"]}
    names |= {"HF_HUB_OFFLINE", "EXPECT_GPU", "GPU_FALLBACK"}
    config_keys = set(yaml.safe_load((CHART / "values.yaml").read_text())["config"])
    for name in sorted(names):
        with pytest.raises(
            helm.HelmRenderError, match=rf"extraEnv sets {name}, which the chart (sets|fixes)"
        ) as caught:
            chart.render({"extraEnv": [{"name": name, "value": "1"}]}, name=RELEASE, namespace=NAMESPACE)
        instead = re.search(r"use (\S+) instead", str(caught.value))
        assert instead, str(caught.value)
        if instead[1].startswith("config."):
            assert instead[1].removeprefix("config.") in config_keys, (name, instead[1])
    objects = render(chart, {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]})
    assert env_of(appliance_container(objects))["HTTPS_PROXY"] == "http://proxy:3128"


def test_existing_claim_declared_shared_may_autoscale(chart: Any) -> None:
    """Review 13: an existingClaim skipped the ReadWriteOnce check; now its declared access mode
    (modelCache.existingClaimAccessMode, default ReadWriteOnce: the chart cannot see the claim) decides."""
    for mode in ("ReadWriteMany", "ReadOnlyMany"):
        objects = render(
            chart,
            {
                "autoscaling": {"enabled": True},
                "modelCache": {
                    "existingClaim": "weights",
                    "existingClaimAccessMode": mode,
                    "readOnly": mode == "ReadOnlyMany",
                },
            },
        )
        assert "HorizontalPodAutoscaler" in objects
        validate_strict(objects)
    assert load_values("keda-cpu-airgapped")["modelCache"]["existingClaimAccessMode"] == "ReadOnlyMany"


def test_prefetch_has_bounded_resources(rendered: dict[str, Rendered], chart: Any) -> None:
    """Review 13: the prefetch init container ran without requests or limits (`resources: {}`)."""
    objects = render(chart, {"modelCache": {"prefetch": {"enabled": True}}})
    resources = server_pod_spec(objects)["initContainers"][0]["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    validate_strict(objects)


def test_dashboard_is_per_release(chart: Any) -> None:
    """Review 14: the dashboard's uid was fixed (`qwenasr-appliance`): two releases shipping it collided
    in Grafana's sidecar (one dashboard replaced the other; same title in a folder, same file name,
    and with grafanaDashboard.namespace the same ConfigMap name). Each release now gets its own uid,
    title, file and ConfigMap name; deploy/grafana stays the standalone dashboard (uid qwenasr-appliance)."""
    source = json.loads(DASHBOARD.read_text())
    assert source["uid"] == "qwenasr-appliance"
    seen: dict[str, set[str]] = {"uid": set(), "title": set(), "key": set(), "configmap": set()}
    releases = [
        ("asr", "speech"),
        ("asr", "other"),  # same release name in another namespace, same dashboard namespace
        ("asr-eu", "speech"),
        (LONG_RELEASE, "speech-recognition-production"),
    ]
    for release, namespace in releases:
        values = {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}
        by_kind: Rendered = {}
        for path, text in chart.render(values, name=release, namespace=namespace, is_install=True).items():
            if not path.endswith("NOTES.txt"):
                for doc in yaml.safe_load_all(text):
                    if doc:
                        by_kind.setdefault(doc["kind"], []).append(doc)
        config_map, key, dashboard = dashboard_of(by_kind)
        assert 0 < len(dashboard["uid"]) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", dashboard["uid"])
        assert release in dashboard["title"] and namespace in dashboard["title"]
        (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "namespace"]
        assert variable["current"]["value"] == [namespace]
        for kind, value in (
            ("uid", dashboard["uid"]), ("title", dashboard["title"]), ("key", key),
            ("configmap", config_map["metadata"]["name"]),
        ):  # fmt: skip
            assert value not in seen[kind], (kind, value)
            seen[kind].add(value)
        assert validate_strict(by_kind) >= 1
    # Stable across upgrades: the same release renders the same uid.
    again = render(chart, {"grafanaDashboard": {"enabled": True}})
    first = render(chart, {"grafanaDashboard": {"enabled": True}})
    assert dashboard_of(again)[2]["uid"] == dashboard_of(first)[2]["uid"]


def notes_of(chart: Any, values: dict[str, Any]) -> str:
    text: str = render(chart, values)["NOTES"][0]["text"]
    return text


def test_notes_warn_about_rollouts(chart: Any) -> None:
    """Review 11: NOTES warn (a) that a surge pod needing a ReadWriteOnce volume may stay Pending when
    the volume's node has no free GPU, (b) that a StatefulSet of one replica is an outage of a model load
    at every upgrade (stop first), (c) that modelCache.size/storageClass cannot change on a StatefulSet
    (volumeClaimTemplates are immutable)."""
    surge_rwo = "may stay Pending"
    one_replica = "StatefulSet of one replica"
    immutable = "volumeClaimTemplates"
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {surge_rwo}),
        ({"modelCache": {"accessModes": ["ReadWriteMany"]}}, set()),
        ({"modelCache": {"existingClaim": "w"}}, {surge_rwo}),
        ({"modelCache": {"existingClaim": "w", "existingClaimAccessMode": "ReadOnlyMany", "readOnly": True}}, set()),
        ({"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}, set()),
        ({"modelCache": {"enabled": False}}, set()),
        ({"workloadKind": "StatefulSet"}, {one_replica, immutable}),
        ({"workloadKind": "StatefulSet", "replicaCount": 2}, {immutable}),
        ({"workloadKind": "StatefulSet", "keda": {"enabled": True}, **SCRAPED}, {one_replica, immutable}),
        ({"workloadKind": "StatefulSet", "keda": {"enabled": True, "minReplicaCount": 2}, **SCRAPED}, {immutable}),
        ({"workloadKind": "StatefulSet", "replicaCount": 2, "modelCache": {"existingClaim": "w"}}, set()),
    ]
    for values, expected in cases:
        objects = render(chart, values)
        validate_strict(objects)
        notes = objects["NOTES"][0]["text"]
        found = {marker for marker in (surge_rwo, one_replica, immutable) if marker in notes}
        assert found == expected, (values, found)
    notes = notes_of(chart, {"workloadKind": "StatefulSet"})
    assert "modelCache.size" in notes and "modelCache.storageClass" in notes and "--cascade=orphan" in notes


def test_notes_follow_the_test_and_ingress_settings(chart: Any, rendered: dict[str, Rendered]) -> None:
    """Review 15: NOTES printed `helm test` with tests.enabled false, and port-forward/127.0.0.1
    instructions with an Ingress on; the helm test image is a mutable tag by default, and NOTES say
    how to pin it."""
    assert "helm test" not in notes_of(chart, {"tests": {"enabled": False}})
    assert "helm test asr" in notes_of(chart, {})
    # Full values: Ingress on /v1 with TLS.
    full = rendered["full"]["NOTES"][0]["text"]
    assert "curl -s https://asr.example.com/v1/audio/transcriptions" in full
    assert "127.0.0.1" not in full and "port-forward" not in full
    # /status is not under /v1: the in-cluster address, not a URL the Ingress does not route.
    assert "http://asr-qwenasr-appliance.speech.svc:80/status" in full
    # Ingress on / without TLS.
    sts = rendered["statefulset-keda"]["NOTES"][0]["text"]
    assert "curl -s http://asr.example.com/v1/audio/transcriptions" in sts and "http://asr.example.com/status" in sts
    assert "127.0.0.1" not in sts and "port-forward" not in sts
    default = rendered["default"]["NOTES"][0]["text"]
    assert "port-forward service/asr-qwenasr-appliance" in default and "http://127.0.0.1:8001/status" in default
    # The default test image is a tag: NOTES say how to pin it; a digest silences that.
    assert "tests.image.digest" in default
    assert "tests.image.digest" not in full
    assert "tests.image.digest" not in notes_of(chart, {"tests": {"enabled": False}})


def test_readme_no_longer_says_the_admission_limit_is_not_exported() -> None:
    """Review 15: the app exports qwenasr_concurrency_limit (KEDA's default query divides by it)."""
    readme = (CHART / "README.md").read_text()
    assert "admission limit is not exported" not in readme
    assert "qwenasr_concurrency_limit" in readme
