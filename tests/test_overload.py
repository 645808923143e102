"""Overload, measured: bench/loadtest.py drives a real server (the appliance's granian configuration
around the test double engine) well past MAX_CONCURRENT_REQUESTS + MAX_QUEUE_SIZE. Every request must
be answered 200 or 429 with Retry-After, none lost; the accepted ones all complete; memory stays flat;
the server is idle afterwards. Small scale, bounded in requests and time."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from bench.loadtest import LoadConfig, run_load

from tests.hardening import MODEL, metric_value
from tests.servers import REPO, ServerProcess

pytestmark = pytest.mark.slow

TOKEN_DELAY = 0.05  # the double writes 4 tokens: about 0.2 s of engine time per request


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "MAX_CONCURRENT_REQUESTS": "2",
        "MAX_QUEUE_SIZE": "4",
        "QUEUE_TIMEOUT_SECONDS": "30",
        "DOUBLE_TOKEN_DELAY": str(TOKEN_DELAY),
        "LOG_LEVEL": "warning",
    }
    process = ServerProcess.product_with_test_double(env, tmp_path_factory.mktemp("overload") / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        # Warm up first (decode worker processes, first-use imports) so RSS growth measures the load alone.
        warm_up = LoadConfig(url=process.url, model=MODEL, concurrency=2, requests=8, duration=30)
        assert asyncio.run(run_load(warm_up)).accepted == 8
        yield process
    finally:
        assert process.stop() == 0


def idle(server: ServerProcess) -> dict[str, int]:
    queue = httpx.get(server.url + "/status", timeout=10).json()["queue"]
    return {"in_flight": queue["in_flight"], "queued": queue["queued"]}


@pytest.mark.parametrize(
    ("rate", "minimum_accepted"),
    [(30.0, 40), (None, 6)],
    ids=["open-loop-3x-capacity", "closed-loop-retry-storm"],
)
def test_overload_is_refused_cleanly_and_nothing_is_lost(
    server: ServerProcess, rate: float | None, minimum_accepted: int
) -> None:
    """Capacity is 2 slots / 0.2 s = 10 requests/s. Open loop: 150 arrivals at 30/s. Closed loop: 16
    clients that resend the moment they are refused (ignoring Retry-After)."""
    before = httpx.get(server.url + "/metrics").text
    config = LoadConfig(
        url=server.url, model=MODEL, concurrency=16, requests=150, rate=rate, duration=60, pid=server.process.pid
    )
    report = asyncio.run(run_load(config))
    print(report.as_dict())  # the numbers in docs/reliability.md
    assert report.sent == 150 and report.not_sent == 0
    assert report.lost_total == 0, report.lost
    assert report.errors_total == 0, report.errors
    assert report.unavailable == 0
    assert report.accepted + report.rejected == report.sent
    assert report.rejected >= 50, report.as_dict()
    assert report.accepted >= minimum_accepted, report.as_dict()
    # Accepted requests wait at most for the queue ahead of them: (4 + 2) / 2 rounds of 0.2 s, plus slack.
    assert report.latency_max is not None and report.latency_max < 5.0
    # A refusal is immediate: it never waits for a slot.
    assert report.rejected_latency_max is not None and report.rejected_latency_max < 1.0
    assert report.rss_before_mib and report.rss_peak_mib
    assert report.rss_peak_mib - report.rss_before_mib < 64, "server memory grew under overload"
    assert idle(server) == {"in_flight": 0, "queued": 0}
    after = httpx.get(server.url + "/metrics").text
    rejected = 'qwenasr_requests_rejected_total{reason="queue_full"}'
    assert metric_value(after, rejected) - metric_value(before, rejected) == report.rejected
    ok = 'qwenasr_transcriptions_total{outcome="ok"}'
    assert metric_value(after, ok) - metric_value(before, ok) == report.accepted


def test_queue_timeout_refuses_with_retry_after(tmp_path: Path) -> None:
    """Requests that wait longer than QUEUE_TIMEOUT_SECONDS are refused too, with Retry-After."""
    env = {
        "MAX_CONCURRENT_REQUESTS": "1",
        "MAX_QUEUE_SIZE": "50",
        # Not 0.5: with 1 s requests the requests queued at 0.5 s would time out at the very moment the
        # slot frees (a race this test lost now and then). At 0.7 s, those queued at 0.7 s get the slot
        # at 1.0 s with 0.4 s to spare, and the rest time out 0.3 s or more before a slot frees.
        "QUEUE_TIMEOUT_SECONDS": "0.7",
        "DOUBLE_TOKEN_DELAY": "0.25",  # 1 s per request
        "LOG_LEVEL": "warning",
    }
    server = ServerProcess.product_with_test_double(env, tmp_path / "server.log")
    try:
        server.wait_until("/ready", timeout=60)
        config = LoadConfig(url=server.url, model=MODEL, concurrency=6, requests=12, duration=30)
        report = asyncio.run(run_load(config))
        print(report.as_dict())
        assert report.lost_total == 0 and report.errors_total == 0, report.as_dict()
        assert report.accepted >= 2 and report.rejected >= 6, report.as_dict()
        assert report.accepted + report.rejected == report.sent == 12
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, 'qwenasr_requests_rejected_total{reason="queue_timeout"}') == report.rejected
        assert idle(server) == {"in_flight": 0, "queued": 0}
    finally:
        assert server.stop() == 0


def test_the_load_tool_command_line(server: ServerProcess) -> None:
    """`python -m bench.loadtest` as documented: a JSON report, exit status 0 when nothing was lost."""
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.loadtest", "--url", server.url, "--model", MODEL,
            "--concurrency", "8", "--requests", "24", "--duration", "30", "--pid", str(server.process.pid), "--json",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sent"] == 24 and report["lost_total"] == 0
    assert report["accepted"] + report["rejected"] == 24
    assert "accepted latency" in result.stderr and "server RSS" in result.stderr
