"""Issue 17, Break 1: with MAX_CONCURRENT_REQUESTS=0 (the default) the admission limit is the serving
engine's capacity, and follows the engine after a restart; `/ready` and a GPU that is expected but not
reachable (EXPECT_GPU, GPU_FALLBACK) with a fake VRAM probe.

The end-to-end test drives a real server (the appliance's granian configuration around the test double
engine, whose capacity is DOUBLE_MAX_CONCURRENCY: 4 for the first engine, 2 for the one after a restart).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from litestar.testing import TestClient

from qwenasr_appliance.api.app import build_litestar
from qwenasr_appliance.config import load_settings
from qwenasr_appliance.supervisor.probe import VramProbe
from tests.doubles import DoubleBehaviour, double_factory
from tests.hardening import metric_value, transcribe
from tests.servers import ServerProcess

NO_GPU = VramProbe(no_gpu="no NVIDIA driver (Driver Not Loaded)")


def queue(server: ServerProcess) -> dict[str, int]:
    return dict(httpx.get(server.url + "/status", timeout=5).json()["queue"])


def gauge(server: ServerProcess, name: str) -> float:
    return metric_value(httpx.get(server.url + "/metrics", timeout=5).text, name)


def wait_for_queue(server: ServerProcess, in_flight: int, queued: int, within: float = 10.0) -> dict[str, int]:
    """Poll /status until `in_flight` run and `queued` wait; fails with the last reading."""
    end = time.monotonic() + within
    last: dict[str, int] = {}
    while time.monotonic() < end:
        last = queue(server)
        if (last["in_flight"], last["queued"]) == (in_flight, queued):
            return last
        time.sleep(0.05)
    pytest.fail(f"expected {in_flight} in flight and {queued} queued, last /status queue: {last}")


def parallel(server: ServerProcess, count: int) -> list[concurrent.futures.Future[httpx.Response]]:
    pool = concurrent.futures.ThreadPoolExecutor(count)
    futures = [pool.submit(transcribe, server.url, timeout=60) for _ in range(count)]
    pool.shutdown(wait=False)
    return futures


@pytest.mark.slow
def test_default_admission_is_the_engine_capacity_and_follows_a_restart(tmp_path: Path) -> None:
    env = {
        "DOUBLE_MAX_CONCURRENCY": "4,2",  # the first engine admits 4; the one after the restart 2
        "DOUBLE_TOKEN_DELAY": "0.4",  # 4 tokens: 1.6 s per request, long enough to watch them run
        "DOUBLE_DIE_ON_CALL": "5",  # the fifth engine call kills the engine
        "ENGINE_RESTART_BACKOFF_SECONDS": "0.2",
        "DECODE_WORKERS": "2",
        "LOG_LEVEL": "info",
    }
    assert "MAX_CONCURRENT_REQUESTS" not in env  # the shipped default, 0
    server = ServerProcess.product_with_test_double(env, tmp_path / "server.log")
    try:
        server.wait_until("/ready", timeout=60)
        assert queue(server)["max_concurrent_requests"] == 4
        assert gauge(server, "qwenasr_concurrency_limit") == 4

        # Four parallel requests all run at once: none waits behind the others.
        first = parallel(server, 4)
        wait_for_queue(server, in_flight=4, queued=0)
        assert gauge(server, "qwenasr_requests_in_flight") == 4
        assert all(f.result(timeout=30).status_code == 200 for f in first)

        # The fifth call kills the engine; the supervisor restarts it, and the new one admits 2.
        assert transcribe(server.url, timeout=30).status_code == 503
        server.wait_until("/ready", timeout=30)
        status = httpx.get(server.url + "/status", timeout=5).json()
        assert status["engine"]["restarts"] == 1 and status["engine"]["engine"]["max_concurrency"] == 2
        assert status["queue"]["max_concurrent_requests"] == 2
        assert gauge(server, "qwenasr_concurrency_limit") == 2

        second = parallel(server, 3)
        wait_for_queue(server, in_flight=2, queued=1)
        assert all(f.result(timeout=30).status_code == 200 for f in second)
        assert '"event": "admission.limit"' in server.logs()
    finally:
        assert server.stop() == 0


def test_a_set_limit_is_kept_whatever_the_engine_says() -> None:
    with _client(NO_GPU, MAX_CONCURRENT_REQUESTS="3") as client:
        assert client.get("/status").json()["queue"]["max_concurrent_requests"] == 3


# -- /ready when the GPU that was expected cannot be reached (in process, fake VRAM probe) ---------------


def _wav() -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(16_000, dtype=np.float32) + 0.1, 16_000, format="WAV")
    return out.getvalue()


@contextlib.contextmanager
def _client(probe: VramProbe, **env: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    """The app in process around the test double, with `probe` as the VRAM probe, once an engine serves."""
    _, factory = double_factory(DoubleBehaviour())
    app = build_litestar(
        load_settings({"DECODE_WORKERS": "1", **env}),
        engine_factory=factory,  # type: ignore[arg-type]
        probe=lambda: probe,
    )
    with TestClient(app) as client:
        end = time.monotonic() + 10
        while client.get("/status").json()["engine"]["state"] not in {"ready", "degraded", "failed"}:
            assert time.monotonic() < end, "the engine did not load"
            time.sleep(0.02)
        # Readiness also waits for the decode worker to start (issue 12: a pool with no usable worker).
        while "worker process is usable" in (client.get("/ready").json().get("reason") or ""):
            assert time.monotonic() < end, "the decode worker did not start"
            time.sleep(0.02)
        yield client


@pytest.fixture
def expected_gpu_missing() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with _client(NO_GPU, EXPECT_GPU="true") as client:
        yield client


def test_expected_gpu_missing_is_degraded_but_ready_by_default(expected_gpu_missing: Any) -> None:
    client = expected_gpu_missing
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["state"] == "degraded"
    status = client.get("/status").json()
    assert status["ready"] is True and status["engine"]["plan"].startswith("cpu-")
    assert "a GPU is expected (EXPECT_GPU=true)" in status["engine"]["reason"]
    # The test engine's capacity (4) is the admission limit on whatever plan serves.
    assert status["queue"]["max_concurrent_requests"] == 4


def test_expected_gpu_missing_with_not_ready_answers_503_and_still_serves() -> None:
    with _client(NO_GPU, EXPECT_GPU="true", GPU_FALLBACK="not_ready") as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"]
        body = ready.json()
        assert body["ready"] is False and body["state"] == "degraded"
        assert "GPU is expected" in body["reason"] and "GPU_FALLBACK=not_ready" in body["reason"]
        status = client.get("/status").json()
        assert status["ready"] is False and status["engine"]["state"] == "degraded"
        # Taken out of the Service's endpoints, but a request that still arrives is served.
        files = {"file": ("a.wav", _wav(), "audio/wav")}
        answer = client.post("/v1/audio/transcriptions", files=files, data={"model": "Qwen/Qwen3-ASR-1.7B"})
        assert answer.status_code == 200, answer.text


def test_no_gpu_expected_on_a_cpu_host_is_ready_with_not_ready_fallback() -> None:
    with _client(NO_GPU, GPU_FALLBACK="not_ready") as client:
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["state"] == "ready"
