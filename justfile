# Maintainer tasks for qwenasr-appliance. `just` (or `just --list`) shows them.
# `pip install rust-just==1.59.0` gives `just` on any machine with Python (scripts/install-ops-tools.sh does).

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := false

python := env("PYTHON", "python")
version := `sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n1`
revision := `git rev-parse --short=12 HEAD 2>/dev/null || echo unknown`
image := env("IMAGE", "localhost/qwenasr-appliance")
container := env("CONTAINER_ENGINE", `command -v podman >/dev/null 2>&1 && echo podman || echo docker`)
chart := "helm/qwenasr-appliance"
promtool := env("PROMTOOL", justfile_directory() / ".tools/bin/promtool")
# bin/ of the interpreter's environment: hadolint, shellcheck, docker-compose come from pip (tools).
pybin := shell(python + ' -c "import os, sys; print(os.path.dirname(sys.executable))"')

# List the recipes.
default:
    @just --list --unsorted

# --- development ------------------------------------------------------------------------------

# Install the appliance (editable) with the test tools into the active virtual environment.
install:
    {{ python }} -m pip install -e '.[test]'

# Install the ops checkers: promtool into .tools/, helm/k8s/PromQL/hadolint/yamllint into the venv.
tools:
    PYTHON={{ python }} scripts/install-ops-tools.sh

# Serve on $HOST:$PORT (default 0.0.0.0:8001) with the settings of the environment.
serve *args:
    {{ python }} -m qwenasr_appliance serve {{ args }}

# Serve with the CPU engine (no GPU needed; slow).
serve-cpu *args:
    ENGINE=cpu {{ python }} -m qwenasr_appliance serve {{ args }}

# Validate the environment's settings and print them.
check-config:
    {{ python }} -m qwenasr_appliance check-config

# Run the whole test suite (pass pytest arguments, e.g. `just test -k metrics -x`).
test *args: tools
    {{ python }} -m pytest {{ args }}

# Only the ops checks: chart, rules, dashboard, Containerfile, compose, live /metrics.
test-ops *args: tools
    {{ python }} -m pytest tests/ops {{ args }}

# Lint everything: Python (ruff, mypy), YAML, Containerfile, shell scripts, chart.
lint: tools
    {{ python }} -m ruff check .
    {{ python }} -m ruff format --check .
    {{ python }} -m mypy
    {{ python }} -m yamllint -c deploy/yamllint.yaml deploy {{ chart }}/values.yaml {{ chart }}/ci
    {{ pybin }}/hadolint Containerfile
    {{ pybin }}/shellcheck scripts/*.sh
    just helm-lint

# Format the Python sources.
fmt:
    {{ python }} -m ruff format .
    {{ python }} -m ruff check --fix .

# Benchmark (see bench/): pass its arguments, e.g. `just bench --help`.
bench *args:
    {{ python }} -m bench.run_all {{ args }}

# --- container image --------------------------------------------------------------------------

# Build the GPU image (vLLM base) tagged with the project version and the git revision.
image tag=version:
    {{ container }} build -f Containerfile \
        --build-arg VERSION={{ version }} \
        --build-arg REVISION={{ revision }} \
        --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
        -t {{ image }}:{{ tag }} -t {{ image }}:{{ revision }} .

# Push the image (set IMAGE=registry.example.com/speech/qwenasr-appliance).
image-push tag=version:
    {{ container }} push {{ image }}:{{ tag }}
    {{ container }} push {{ image }}:{{ revision }}

# Lint the Containerfile (hadolint).
image-lint:
    {{ pybin }}/hadolint Containerfile

# Pre-fetch the model weights into a named volume (for air-gapped hosts: then copy the volume).
prefetch model="Qwen/Qwen3-ASR-1.7B" volume="qwenasr_models":
    {{ container }} run --rm --user 10001:0 -v {{ volume }}:/models --entrypoint hf {{ image }}:{{ version }} download {{ model }}

# --- Helm chart (helm CLI when present, else the Helm engine through helm-python-sdk) ------------

# helm lint --strict with the default values and every ci/*-values.yaml.
helm-lint:
    {{ python }} scripts/helm_offline.py lint {{ chart }}
    for f in {{ chart }}/ci/*-values.yaml; do {{ python }} scripts/helm_offline.py lint {{ chart }} -f "$f"; done

# Render the chart (default values, or e.g. `just helm-template helm/qwenasr-appliance/ci/full-values.yaml`).
helm-template values="":
    {{ python }} scripts/helm_offline.py template {{ chart }} {{ if values != "" { "-f " + values } else { "" } }}

# Render with default and ci values and validate every manifest against the Kubernetes schemas.
helm-validate:
    {{ python }} scripts/helm_offline.py validate {{ chart }}
    for f in {{ chart }}/ci/*-values.yaml; do {{ python }} scripts/helm_offline.py validate {{ chart }} -f "$f"; done

# Package the chart into dist/.
helm-package: helm-lint
    mkdir -p dist
    {{ python }} scripts/helm_offline.py package {{ chart }} -d dist

# --- monitoring -------------------------------------------------------------------------------

# promtool check rules + the rules' unit tests.
rules-check:
    {{ promtool }} check rules deploy/prometheus/rules/*.yaml
    {{ promtool }} test rules deploy/prometheus/tests/*.yaml

# Check that every dashboard query parses and names an exported metric, and the chart's copies match.
dashboards-check: tools
    {{ python }} -m pytest -q tests/ops/test_dashboard.py tests/ops/test_rules.py

# Copy the dashboard and rules (deploy/ is the source) into the chart's files/.
dashboards-sync:
    cp deploy/grafana/dashboards/qwenasr-appliance.json {{ chart }}/files/grafana-dashboard.json
    cp deploy/prometheus/rules/qwenasr-appliance.rules.yaml {{ chart }}/files/prometheus-rules.yaml

# promtool check metrics on a running server's /metrics (default: the local one).
metrics-lint url="http://127.0.0.1:8001":
    curl -fsS {{ url }}/metrics | {{ promtool }} check metrics

# --- single-host stack (deploy/compose.yaml) ----------------------------------------------------

# Validate deploy/compose.yaml.
compose-config:
    {{ pybin }}/docker-compose -f deploy/compose.yaml config --quiet

# Start the appliance + Prometheus + Grafana on this GPU host.
compose-up:
    QWENASR_IMAGE={{ image }}:{{ version }} docker compose -f deploy/compose.yaml up -d

# Stop the stack (volumes, hence downloaded weights, are kept).
compose-down:
    docker compose -f deploy/compose.yaml down

# --- release ----------------------------------------------------------------------------------

# Print the versions that must agree (pyproject, Chart appVersion) and the chart version.
versions:
    @echo "pyproject:        {{ version }}"
    @sed -n 's/^appVersion: "\(.*\)"$/chart appVersion: \1/p; s/^version: \(.*\)$/chart version:    \1/p' {{ chart }}/Chart.yaml

# Set the release version in pyproject.toml and the chart (appVersion, and the chart version).
bump new_version:
    sed -i 's/^version = ".*"$/version = "{{ new_version }}"/' pyproject.toml
    sed -i 's/^appVersion: ".*"$/appVersion: "{{ new_version }}"/; s/^version: .*$/version: {{ new_version }}/' {{ chart }}/Chart.yaml
    just versions

# Everything a release needs to pass: lint, tests (incl. ops), chart validation, rules.
release-check: lint test helm-validate rules-check
    test "$(sed -n 's/^appVersion: "\(.*\)"$/\1/p' {{ chart }}/Chart.yaml)" = "{{ version }}" \
        || { echo "Chart appVersion differs from pyproject version {{ version }}: run just bump"; exit 1; }
    test -z "$(git status --porcelain)" || { echo "the working tree is not clean"; exit 1; }

# Tag the release, build and push the image, package the chart (after release-check).
release: release-check
    git tag -a "v{{ version }}" -m "qwenasr-appliance {{ version }}"
    just image {{ version }}
    just image-push {{ version }}
    just helm-package
    @echo "Tagged v{{ version }}; push the tag (git push origin v{{ version }}) and publish dist/*.tgz."

# Remove build outputs and caches (not .tools/).
clean:
    rm -rf dist build .pytest_cache .ruff_cache .mypy_cache
    find . -name __pycache__ -type d -prune -exec rm -rf {} +
