"""Faults, end to end, on real server processes:

* the engine dies mid-request: every request on it gets a clear 503 (or an SSE error event), /ready
  turns 503 while the supervisor restarts it with back-off, service resumes without restarting the
  server, and the restart is counted;
* SIGTERM under load: new connections are refused at once, in-flight requests finish within
  SHUTDOWN_GRACE_SECONDS, the process exits 0; requests still running when the grace period ends get
  503 `server_shutting_down` instead of being cut off;
* start-up failures (model path missing or corrupt, no GPU for ENGINE=vllm, no NVML): the process keeps
  serving /health, and /status, /ready, 503 bodies and the logs say exactly why.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from qwenasr_appliance.config import load_settings
from qwenasr_appliance.engines.base import EngineDeadError
from qwenasr_appliance.metrics import Metrics
from qwenasr_appliance.supervisor.probe import VramProbe
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.pipeline import RequestStats, TranscriptionRequest, TranscriptionService
from tests.doubles import DoubleBehaviour, double_factory
from tests.hardening import MODEL, TRANSCRIPTIONS, error_of, metric_value, tone_wav, transcribe
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def send(url: str, *, stream: bool = False, timeout: float = 60.0) -> httpx.Response | Exception:
    try:
        return transcribe(url, timeout=timeout, **({"stream": "true"} if stream else {}))
    except httpx.HTTPError as exc:
        return exc


def in_background(work: Callable[[], httpx.Response | Exception]) -> concurrent.futures.Future[Any]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def wait_for(predicate: Callable[[], bool], within: float, step: float = 0.05) -> float:
    """Seconds until `predicate()` held; fails after `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if predicate():
            return time.monotonic() - started
        time.sleep(step)
    pytest.fail(f"condition not met within {within} s")


def stream_events(url: str, first_delta: threading.Event) -> tuple[int, list[dict[str, Any]]]:
    """A streamed transcription, read event by event; `first_delta` is set when the first delta arrives."""
    files = {"file": ("clip.wav", tone_wav(), "audio/wav")}
    data = {"model": MODEL, "stream": "true"}
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", url + TRANSCRIPTIONS, files=files, data=data, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "transcript.text.delta":
                    first_delta.set()
        return response.status_code, events


def assert_worker_stopped_on_its_own(logs: str) -> None:
    """The worker finished its lifespan shutdown (`server.stopped`) before granian's kill.

    granian (2.8) can log "Killing worker-1 after it refused to gracefully stop" for a worker that has
    already exited: its watcher thread and its stop path both wait on the process, and when the watcher
    reaps it first `is_alive()` stays true for a moment (seen on a loaded 2-core CI machine; reproduced
    with plain `multiprocessing`, 2 in 200 under load). Such a line after `server.stopped` is that
    race; a kill before it would have cut the shutdown.
    """
    stopped = logs.find('"event": "server.stopped"')
    assert stopped >= 0, "the worker never finished its shutdown"
    killed = logs.find("Killing worker")
    assert killed < 0 or killed > stopped, "granian killed the worker before its shutdown finished"


def decodes(server: ServerProcess) -> float:
    metrics = httpx.get(server.url + "/metrics", timeout=5).text
    return metric_value(metrics, 'qwenasr_stage_duration_seconds_count{stage="decode"}')


def ready_status(server: ServerProcess) -> int:
    return httpx.get(server.url + "/ready", timeout=5).status_code


# --------------------------------------------------------------------------- the engine dies


def test_engine_death_mid_request_is_503_then_the_engine_comes_back(tmp_path: Path) -> None:
    env = {
        "DOUBLE_DIE_ON_CALL": "3",  # the third engine call kills the engine the first two run on
        "DOUBLE_TOKEN_DELAY": "0.3",  # 1.2 s per request: the first two are mid-request when it dies
        "MAX_CONCURRENT_REQUESTS": "4",
        "ENGINE_RESTART_BACKOFF_SECONDS": "1.5",
        "ENGINE_RESTART_MAX": "3",
    }
    server = ServerProcess.product_with_test_double(env, tmp_path / "server.log")
    try:
        server.wait_until("/ready", timeout=60)
        first_delta = threading.Event()
        streaming = in_background(lambda: stream_events(server.url, first_delta))
        plain = in_background(lambda: send(server.url))
        assert first_delta.wait(15)  # the stream is mid-request on the engine
        # ... and so is the plain request (both decoded, the engine's token takes 0.3 s)
        wait_for(lambda: decodes(server) == 2, within=5)
        killer = send(server.url)
        assert isinstance(killer, httpx.Response) and killer.status_code == 503, killer
        assert error_of(killer)["code"] == "engine_restarting"
        assert int(killer.headers["retry-after"]) >= 1

        # The other requests on the dead engine: a clear answer within a token's time, never a hang.
        other = plain.result(timeout=10)
        assert isinstance(other, httpx.Response) and other.status_code == 503, other
        assert error_of(other)["code"] == "engine_restarting"
        status, events = streaming.result(timeout=10)
        assert status == 200  # the stream had started
        assert events[0]["type"] == "transcript.text.delta"
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "engine_restarting"
        assert set(events[-1]["error"]) == {"message", "type", "param", "code"}  # OpenAI's error shape

        # While the supervisor waits out its back-off: not ready, and new requests get 503 with the reason.
        assert ready_status(server) == 503
        ready = httpx.get(server.url + "/ready").json()
        assert ready["state"] == "restarting" and "died" in ready["reason"]
        during = transcribe(server.url)
        assert during.status_code == 503 and error_of(during)["code"] == "engine_unavailable"
        assert "restarting" in str(error_of(during)["message"])
        assert int(during.headers["retry-after"]) >= 1
        assert httpx.get(server.url + "/health").status_code == 200

        # The supervisor brings a new engine up; the same server process serves again.
        recovered_after = wait_for(lambda: ready_status(server) == 200, within=15)
        assert transcribe(server.url).status_code == 200
        results = [send(server.url) for _ in range(3)]
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
        assert server.process.poll() is None

        status = httpx.get(server.url + "/status").json()
        assert status["engine"]["restarts"] == 1 and status["engine"]["state"] in {"ready", "degraded"}
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "qwenasr_engine_restarts_total") == 1
        assert metric_value(metrics, 'qwenasr_engine_errors_total{kind="dead"}') >= 1
        assert metric_value(metrics, 'qwenasr_transcriptions_total{outcome="engine_error"}') == 3
        logs = server.logs()
        assert '"event": "engine.dead"' in logs and '"event": "engine.restart"' in logs
        print(f"recovered {recovered_after:.2f} s after the restart was observed")
    finally:
        assert server.stop() == 0


def test_a_queued_request_runs_on_the_engine_that_serves_when_its_turn_comes() -> None:
    """In process: A holds the only slot and B waits while A's engine dies and is replaced; B must run
    on the new engine, not on the dead one it saw when it arrived."""
    settings = load_settings({"MAX_CONCURRENT_REQUESTS": "1", "ENGINE_RESTART_BACKOFF_SECONDS": "0"})
    metrics = Metrics(CollectorRegistry())
    made, factory = double_factory(DoubleBehaviour(token_delay=0.2))
    supervisor = EngineSupervisor(
        settings,
        engine_factory=factory,  # type: ignore[arg-type]
        probe=VramProbe,
        metrics=metrics,
        vllm_available=False,
        cpu_available=True,
    )
    admission = AdmissionController(max_concurrent=1, max_queue=4, queue_timeout=10, metrics=metrics)
    service = TranscriptionService(settings, supervisor, admission, metrics=metrics)
    request = TranscriptionRequest(
        audio=tone_wav(),
        filename="a.wav",
        language=None,
        prompt="",
        temperature=0.0,
        stream=False,
    )

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.005)

    async def scenario() -> None:
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        first = asyncio.create_task(service.transcribe(request, "a", RequestStats()))
        await until(lambda: len(made[0].calls) == 1)  # A runs on the first engine
        second = asyncio.create_task(service.transcribe(request, "b", RequestStats()))
        await until(lambda: admission.queued == 1)  # B waits for A's slot
        dead = made[0]
        dead.dead = True  # A notices at its next token, at most 0.2 s from now
        await supervisor.report_dead(dead, "killed by the test")
        assert await supervisor.wait_ready(5) and supervisor.engine is made[1]
        with pytest.raises(EngineDeadError):
            await first
        transcript = await second
        assert transcript.text == "chunk of 1.0 seconds"
        assert [call[2] for call in made[1].calls] == ["b-0"]
        await supervisor.stop()
        service.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))


# --------------------------------------------------------------------------- SIGTERM under load


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    env = {"DOUBLE_TOKEN_DELAY": "0.5", "MAX_CONCURRENT_REQUESTS": "4", "SHUTDOWN_GRACE_SECONDS": "10"}
    server = ServerProcess.product_with_test_double(env, tmp_path / "server.log")
    server.wait_until("/ready", timeout=60)
    futures = [in_background(lambda stream=(i == 0): send(server.url, stream=stream)) for i in range(4)]
    wait_for(lambda: httpx.get(server.url + "/status").json()["queue"]["in_flight"] == 4, within=5)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            httpx.get(server.url + "/health", timeout=1)
        except httpx.ConnectError:
            return True
        return False

    refused_after = wait_for(refused, within=2)
    responses = [future.result(timeout=15) for future in futures]
    exit_code = server.process.wait(15)
    exited_after = time.monotonic() - signalled
    server.stop()
    for response in responses:
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert sse_events(responses[0])[-1]["type"] == "transcript.text.done"
    assert all(r.json()["text"] == "chunk of 1.0 seconds" for r in responses[1:])  # type: ignore[union-attr]
    assert exit_code == 0
    assert exited_after < 10, "the drain took longer than the grace period"
    logs = server.logs()
    assert '"event": "shutdown.draining"' in logs
    assert_worker_stopped_on_its_own(logs)
    print(f"refused new connections after {refused_after:.2f} s, exited after {exited_after:.2f} s")


def test_requests_outlasting_the_grace_period_get_503_not_a_cut(tmp_path: Path) -> None:
    env = {
        "DOUBLE_TOKEN_DELAY": "1.5",  # 6 s per request, far past the grace period
        "MAX_CONCURRENT_REQUESTS": "2",  # two run, the rest wait in the queue
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    server = ServerProcess.product_with_test_double(env, tmp_path / "server.log")
    server.wait_until("/ready", timeout=60)
    streaming = in_background(lambda: send(server.url, stream=True))
    wait_for(lambda: httpx.get(server.url + "/status").json()["queue"]["in_flight"] == 1, within=5)
    time.sleep(1.6)  # the stream has sent its first delta
    others = [in_background(lambda: send(server.url)) for _ in range(3)]
    wait_for(lambda: httpx.get(server.url + "/status").json()["queue"]["queued"] == 2, within=5)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    responses = [future.result(timeout=15) for future in others]
    stream = streaming.result(timeout=15)
    exit_code = server.process.wait(15)
    exited_after = time.monotonic() - signalled
    server.stop()
    for response in responses:
        assert isinstance(response, httpx.Response) and response.status_code == 503, response
        assert error_of(response)["code"] == "server_shutting_down"
        assert response.headers["retry-after"] == "1"
    assert isinstance(stream, httpx.Response) and stream.status_code == 200
    events = sse_events(stream)
    assert events[0]["type"] == "transcript.text.delta"
    assert events[-1] == {"type": "error", "error": events[-1]["error"]}
    assert events[-1]["error"]["code"] == "server_shutting_down"
    assert exit_code == 0
    assert exited_after < 1 + 3, "the process did not exit right after the grace period"
    logs = server.logs()
    assert '"event": "shutdown.grace_expired"' in logs
    assert_worker_stopped_on_its_own(logs)
    print(f"exited {exited_after:.2f} s after SIGTERM with a 1 s grace period")


# --------------------------------------------------------------------------- start-up failures


@pytest.fixture
def corrupt_model(tmp_path: Path) -> Path:
    model = tmp_path / "corrupt-model"
    model.mkdir()
    (model / "config.json").write_text("{this is not json")
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    return model


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "does not exist"),
        ("corrupt", "not a valid JSON file"),
        ("no-gpu-for-vllm", "ENGINE=vllm but no GPU is visible"),
    ],
)
def test_start_up_failure_is_reported_and_the_process_keeps_serving(
    tmp_path: Path, corrupt_model: Path, case: str, needle: str
) -> None:
    env = {
        "missing": {"MODEL_ID": str(tmp_path / "nonexistent"), "ENGINE": "cpu"},
        "corrupt": {"MODEL_ID": str(corrupt_model), "ENGINE": "cpu"},
        "no-gpu-for-vllm": {"ENGINE": "vllm"},
    }[case]
    server = ServerProcess.appliance({**env, "LOG_LEVEL": "info"}, tmp_path / "server.log")
    try:
        server.wait_until_answering(timeout=60)

        def settled() -> bool:
            return httpx.get(server.url + "/status").json()["engine"]["state"] == "failed"

        wait_for(settled, within=90, step=0.2)
        status = httpx.get(server.url + "/status").json()
        assert needle in status["engine"]["reason"], status["engine"]
        # No GPU here: /status says so plainly (no NVIDIA driver or NVML bindings), and that is no error.
        vram = status["engine"]["vram"]
        assert vram["gpus"] == [] and "NVIDIA" in vram["no_gpu"] and vram["error"] is None
        ready = httpx.get(server.url + "/ready")
        assert ready.status_code == 503 and needle in ready.json()["reason"]
        model = env.get("MODEL_ID", MODEL)
        refused = httpx.post(
            server.url + TRANSCRIPTIONS, files={"file": ("a.wav", tone_wav(), "audio/wav")}, data={"model": model}
        )
        assert refused.status_code == 503 and needle in str(error_of(refused)["message"])
        time.sleep(1.0)  # no crash loop: the process is still the same one, still answering
        assert server.process.poll() is None
        health = httpx.get(server.url + "/health")  # failed for good: a liveness probe restarts it
        assert health.status_code == 503 and needle in health.json()["reason"]
        failed_lines = [line for line in server.logs().splitlines() if '"event": "engine.failed"' in line]
        assert len(failed_lines) == 1 and needle in failed_lines[0]
    finally:
        assert server.stop() == 0
    assert threading.active_count() >= 1
