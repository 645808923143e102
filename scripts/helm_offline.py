#!/usr/bin/env python3
"""helm lint / template / package without a helm binary or a cluster, plus Kubernetes schema checks.

There is no helm CLI in the package registries this project builds from, so this wraps the real Helm v4
engine shipped as a library by `helm-python-sdk` (pinned in scripts/install-ops-tools.sh), and validates
rendered manifests with `kubernetes-validate` (bundled OpenAPI schemas, strict mode).

    python scripts/helm_offline.py lint     helm/qwenasr-appliance [-f values.yaml ...]
    python scripts/helm_offline.py template helm/qwenasr-appliance [-f values.yaml ...] [--name R] [--namespace N]
    python scripts/helm_offline.py validate helm/qwenasr-appliance [-f values.yaml ...] [-k 1.27.0 -k 1.37.0]
    python scripts/helm_offline.py package  helm/qwenasr-appliance [-d dist]

Exit status: 0 when clean, 1 on lint errors/warnings, render failures or schema violations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

# Kubernetes versions checked by default: the chart's minimum (Chart.yaml kubeVersion) and the newest
# bundled with kubernetes-validate.
DEFAULT_KUBE_VERSIONS = ("1.27.0", "1.37.0")
# Custom resources: no bundled schema; tests/ops/test_helm.py checks their structure instead.
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge like repeated `helm -f`: maps merge recursively, everything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_values(files: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in files:
        loaded = yaml.safe_load(Path(name).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"{name}: values must be a mapping")
        values = deep_merge(values, loaded)
    return values


def render(chart: str, values: dict[str, Any], name: str, namespace: str) -> dict[str, str]:
    import helm_python

    loaded = helm_python.Chart.load(chart)
    try:
        return loaded.render(values, name=name, namespace=namespace, is_install=True)
    finally:
        loaded.close()


def manifests(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template path, object) for every non-empty YAML document, NOTES.txt left out."""
    docs: list[tuple[str, dict[str, Any]]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def validate_manifests(docs: list[tuple[str, dict[str, Any]]], kube_versions: list[str]) -> list[str]:
    """Schema violations as messages; custom resources are listed on stderr, not validated."""
    import kubernetes_validate

    problems: list[str] = []
    for path, doc in docs:
        label = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if str(doc.get("apiVersion", "")).startswith(CRD_GROUPS):
            print(f"custom resource, no bundled schema: {label}", file=sys.stderr)
            continue
        for version in kube_versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{label} (Kubernetes {version}): {exc.message} at {list(exc.path)}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{label} (Kubernetes {version}): no schema: {exc}")
    return problems


def cmd_lint(args: argparse.Namespace) -> int:
    import helm_python

    values = load_values(args.values)
    report = helm_python.lint(args.chart, values or None, strict=True, kube_version=f"v{args.kube_version[0]}")
    status = 0
    for message in report.get("messages", []):
        severity = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(message.get("severity"), "UNKNOWN")
        print(f"[{severity}] {message.get('path')}: {message.get('error')}".rstrip())
        if message.get("severity", 0) >= 2:
            status = 1
    # Lint only logs template `fail` calls: render too, so the chart's own consistency checks count.
    try:
        render(args.chart, values, args.name, args.namespace)
    except Exception as exc:
        print(f"[ERROR] render: {exc}")
        status = 1
    print(f"{args.chart} {' '.join(args.values) or '(default values)'}: {'FAILED' if status else 'ok'}")
    return status


def cmd_template(args: argparse.Namespace) -> int:
    rendered = render(args.chart, load_values(args.values), args.name, args.namespace)
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        sys.stdout.write(f"---\n# Source: {path}\n{text.strip()}\n")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    docs = manifests(render(args.chart, load_values(args.values), args.name, args.namespace))
    problems = validate_manifests(docs, args.kube_version)
    for problem in problems:
        print(problem)
    print(f"{len(docs)} manifests, Kubernetes {', '.join(args.kube_version)}: {len(problems)} problem(s)")
    return 1 if problems else 0


def cmd_package(args: argparse.Namespace) -> int:
    import helm_python

    Path(args.destination).mkdir(parents=True, exist_ok=True)
    print(helm_python.package(args.chart, destination=args.destination))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, handler in (("lint", cmd_lint), ("template", cmd_template), ("validate", cmd_validate)):
        sub = commands.add_parser(name)
        sub.add_argument("chart")
        sub.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
        sub.add_argument("--name", default="qwenasr", help="release name")
        sub.add_argument("--namespace", default="speech", help="release namespace")
        sub.add_argument(
            "-k", "--kube-version", action="append", default=None, help="Kubernetes version(s) to check against"
        )
        sub.set_defaults(handler=handler)
    sub = commands.add_parser("package")
    sub.add_argument("chart")
    sub.add_argument("-d", "--destination", default="dist")
    sub.set_defaults(handler=cmd_package)
    args = parser.parse_args(argv)
    if getattr(args, "kube_version", "unset") is None:
        args.kube_version = list(DEFAULT_KUBE_VERSIONS)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
