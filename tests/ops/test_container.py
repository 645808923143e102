"""The Containerfile: hadolint clean, and the properties the issue requires, read from the file (no
image can be built here: no container engine daemon, no base image pull). Also the build context
allow-list, the compose file (Docker Compose v2 `config`), and the ops scripts (ShellCheck)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.opstools import COMPOSE, CONTAINERFILE, REPO, module, tool


@pytest.fixture(scope="module")
def containerfile() -> str:
    return CONTAINERFILE.read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, input=stdin, timeout=120)


def test_hadolint_is_clean() -> None:
    result = run(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(CONTAINERFILE))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_image_matches_the_pinned_vllm(containerfile: str) -> None:
    tomllib = module("tomllib")
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (pin,) = [req for req in gpu_extra if req.startswith("vllm==")]
    assert f"ARG VLLM_VERSION={pin.removeprefix('vllm==')}" in containerfile
    assert "ARG VLLM_IMAGE=docker.io/vllm/vllm-openai:v${VLLM_VERSION}" in containerfile


def test_runtime_stage_properties(containerfile: str) -> None:
    steps = instructions(containerfile)
    stages = [args for keyword, args in steps if keyword == "FROM"]
    assert len(stages) >= 2, "multi-stage build expected"
    runtime = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    keywords = {k for k, _ in runtime}
    user = [args for k, args in runtime if k == "USER"][-1]
    assert not user.startswith(("root", "0")), user
    assert re.fullmatch(r"\$\{APP_UID\}:0|\d+:0", user), "a fixed numeric non-root UID, group 0"
    assert [args for k, args in runtime if k == "EXPOSE"] == ["8001"]
    (healthcheck,) = [args for k, args in runtime if k == "HEALTHCHECK"]
    assert "/health" in healthcheck and "--start-period" in healthcheck
    (entrypoint,) = [args for k, args in runtime if k == "ENTRYPOINT"]
    assert json.loads(entrypoint)[:2] == ["dumb-init", "--single-child"], "exec form; SIGTERM to the appliance only"
    assert json.loads(entrypoint)[-1] == "qwenasr-appliance"
    assert json.loads([args for k, args in runtime if k == "CMD"][-1]) == ["serve"]
    assert {"LABEL", "STOPSIGNAL", "ENV", "WORKDIR"} <= keywords
    labels = " ".join(args for k, args in runtime if k == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses", "source", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    env = " ".join(args for k, args in runtime if k == "ENV")
    # Every cache a model load writes to is redirected to the /cache or /models volumes.
    for variable in ("HF_HOME=/models/", "VLLM_CACHE_ROOT=/cache/", "TRITON_CACHE_DIR=/cache/",
                     "TORCHINDUCTOR_CACHE_DIR=/cache/", "XDG_CACHE_HOME=/cache/", "HOME=/cache/"):  # fmt: skip
        assert variable in env, variable
    assert "PORT=8001" in env


def test_build_context_allow_list_admits_what_the_build_copies(containerfile: str) -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for keyword, args in instructions(containerfile):
        if keyword == "COPY" and "--from" not in args:
            copied.update(part.rstrip("/") for part in args.split()[:-1] if not part.startswith("--"))
    assert copied and copied <= allowed, f"COPY sources excluded from the build context: {copied - allowed}"
    assert "*" in ignore, "the build context is an allow-list"


def test_compose_file_is_valid() -> None:
    result = run(tool("docker-compose"), "-f", str(COMPOSE), "config", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr


def compose_seconds(duration: str) -> float:
    """A Go duration as compose writes it ("45s", "15m45s", "1h0m0s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, duration
    hours, minutes, seconds = (float(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_compose_seconds() -> None:
    assert [compose_seconds(d) for d in ("45s", "15m45s", "1h0m0s", "2m")] == [45, 945, 3600, 120]


def test_compose_appliance_service(tmp_path: Path) -> None:
    result = run(tool("docker-compose"), "-f", str(COMPOSE), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    appliance = json.loads(result.stdout)["services"]["appliance"]
    assert appliance["read_only"] is True
    assert appliance["cap_drop"] == ["ALL"]
    grace = compose_seconds(appliance["stop_grace_period"])  # normalized by compose, e.g. "15m45s"
    environment = appliance["environment"]
    drain = float(environment["SHUTDOWN_GRACE_SECONDS"])
    # The drain lets every admitted request finish (the app's default), and the stop outlasts it.
    assert drain >= float(environment.get("QUEUE_TIMEOUT_SECONDS", 30)) + float(
        environment.get("REQUEST_TIMEOUT_SECONDS", 900)
    )
    assert grace >= drain + 10, "SIGKILL before granian's own kill timeout (drain + 10 s)"
    assert environment["EXPECT_GPU"] == "true"  # the service reserves a GPU
    assert appliance["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {v["target"] for v in appliance["volumes"]} >= {"/models", "/cache"}
    assert "/ready" in " ".join(appliance["healthcheck"]["test"])
    source = yaml.safe_load(COMPOSE.read_text())
    assert set(source["services"]) == {"appliance", "prometheus", "grafana"}


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p) for p in (REPO / "scripts").glob("*.sh"))
    assert scripts
    result = run(tool("shellcheck"), *scripts)
    assert result.returncode == 0, result.stdout + result.stderr
