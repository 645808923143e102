"""A newcomer's first start: the server in a folder with a `.env`, environment variables over it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow


def _start_in(folder: Path, env: dict[str, str | None], port: int) -> ServerProcess:
    # ENV_FILE unset: the server finds `.env` in its working directory by itself.
    server = ServerProcess.appliance_in(folder, {"ENV_FILE": None, **env}, port, folder / "server.log")
    server.wait_until("/health", timeout=60)
    return server


def test_the_server_reads_dot_env_from_its_folder_and_the_environment_wins(tmp_path: Path) -> None:
    models = tmp_path / "models" / "qwen3-asr"
    models.mkdir(parents=True)  # a local model directory (without a checkpoint: loading fails at once)
    file_port = free_port()
    (tmp_path / ".env").write_text(
        f"HOST=127.0.0.1\nPORT={file_port}\nMODEL_ID={models}\nLOG_FORMAT=console\nENGINE=cpu\nDECODE_WORKERS=1\n"
    )
    server = _start_in(tmp_path, {}, file_port)
    try:
        status = httpx.get(server.url + "/status", timeout=5).json()
        assert status["model"] == str(models)
        assert [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=5).json()["data"]] == [str(models)]
    finally:
        server.stop()
    lines = [line for line in server.logs().splitlines() if "server.starting" in line]
    assert lines and not lines[0].lstrip().startswith("{"), "LOG_FORMAT=console from .env renders for humans"

    env_port = free_port()
    server = _start_in(
        tmp_path, {"PORT": str(env_port), "LOG_FORMAT": "json", "SERVED_MODEL_NAME": "env-name"}, env_port
    )
    try:
        assert httpx.get(server.url + "/status", timeout=5).json()["model"] == str(models)
        assert httpx.get(server.url + "/v1/models", timeout=5).json()["data"][0]["id"] == "env-name"
    finally:
        server.stop()
    starting = [json.loads(line) for line in server.logs().splitlines() if '"server.starting"' in line]
    assert starting and starting[0]["model"] == str(models)
