"""A newcomer's first start: the server in a folder with a `.env`, environment variables over it."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, free_port

pytestmark = pytest.mark.slow

SAMPLE = Path(__file__).resolve().parent / "fixtures" / "samples" / "ds_LDC93S1.wav"


def _start_in(folder: Path, env: dict[str, str | None], port: int) -> ServerProcess:
    # ENV_FILE unset: the server finds `.env` in its working directory by itself.
    server = ServerProcess.appliance_in(folder, {"ENV_FILE": None, **env}, port, folder / "server.log")
    server.wait_until_answering(timeout=60)
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
    assert "\x1b[" not in server.logs(), "colour codes in a log written to a file"

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


def _closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


def _hub_env(tmp_path: Path, endpoint: str) -> dict[str, str | None]:
    """The default MODEL_ID (a hub repo id), an empty cache, the hub at `endpoint` on loopback."""
    return {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "ENGINE": "cpu",
            "DECODE_WORKERS": "1", "LOG_FORMAT": "json", "SHUTDOWN_GRACE_SECONDS": "5"}  # fmt: skip


def _failed_status(server: ServerProcess, within: float) -> dict[str, object]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status: dict[str, object] = httpx.get(server.url + "/status", timeout=5).json()["engine"]
        if status["state"] == "failed":
            return status
        time.sleep(0.2)
    raise AssertionError(f"not failed within {within} s: {status}")


@pytest.mark.parametrize("hub", ["unreachable", "offline"])
def test_no_hub_fails_in_seconds_permanently_with_what_to_do(tmp_path: Path, hub: str) -> None:
    env = _hub_env(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    server = ServerProcess.appliance(env, tmp_path / "server.log")  # type: ignore[arg-type]
    try:
        server.wait_until_answering(timeout=60)
        began = time.monotonic()
        status = _failed_status(server, within=15)
        assert time.monotonic() - began < 10
        reason = str(status["reason"])
        attempts = status["attempts"]
        assert isinstance(attempts, list) and [a["outcome"] for a in attempts] == ["model_not_found"]
        assert "MODEL_ID=/path/to/dir" in reason and "HF_HUB_OFFLINE=1" in reason
        assert ("cannot be reached" if hub == "unreachable" else "HF_HUB_OFFLINE is set") in reason
        ready = httpx.get(server.url + "/ready", timeout=5)
        assert ready.status_code == 503 and "retry-after" not in ready.headers
        assert ready.json()["permanent"] is True and "will not recover without a restart" in ready.json()["reason"]
        # Liveness fails too: only a restart helps, which is what an orchestrator's liveness probe does.
        health = httpx.get(server.url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "MODEL_ID=/path/to/dir" in health.json()["reason"]
        refused = httpx.post(
            server.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", SAMPLE.read_bytes())},
            data={"model": "Qwen/Qwen3-ASR-1.7B"},
            timeout=30,
        )
        assert refused.status_code == 503 and "retry-after" not in refused.headers
        assert refused.json()["error"]["code"] == "engine_failed"
    finally:
        server.stop()
    lines = server.logs().splitlines()
    raw = [line for line in lines if line.strip() and not line.startswith("{")]
    assert not raw, f"lines outside the JSON log format: {raw[:5]}"
    events = [json.loads(line)["event"] for line in lines]
    assert "engine.failed" in events and "engine.load.step" in events


def test_status_shows_the_step_and_sigterm_stops_a_hanging_one(tmp_path: Path) -> None:
    with socket.socket() as hub:  # accepts connections (the kernel's backlog) but never answers
        hub.bind(("127.0.0.1", 0))
        hub.listen(8)
        endpoint = f"http://127.0.0.1:{hub.getsockname()[1]}"
        server = ServerProcess.appliance(_hub_env(tmp_path, endpoint), tmp_path / "server.log")  # type: ignore[arg-type]
        try:
            server.wait_until_answering(timeout=60)
            deadline, step = time.monotonic() + 20, None
            while time.monotonic() < deadline and not (step and endpoint in step["detail"]):
                step = httpx.get(server.url + "/status", timeout=5).json()["engine"]["step"]
                time.sleep(0.1)
            assert step is not None and step["step"] == "resolving_model", step
            assert endpoint in step["detail"] and step["seconds"] >= 0, step
            began = time.monotonic()
            code = server.stop(timeout=30)
            stopped_in = time.monotonic() - began
        finally:
            server.stop()
    assert stopped_in < 5 + 2, f"SIGTERM took {stopped_in:.1f} s during a hanging hub request"
    assert code == 0, server.logs()[-2000:]
