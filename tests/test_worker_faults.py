"""Worker-process faults, end to end on real server processes (issue 12, K4-K6): the appliance's own
granian configuration around the test double engine, with faults injected into its decode workers by
signals, as the OOM killer, a hung decoder or a crashing server would.

* a stuck decode worker (SIGSTOP): /ready says so at once, its task ends at the worker deadline with a
  retryable 504, the worker is killed and replaced, and the next request succeeds;
* a decode worker killed from outside during a valid file: the file is decoded on a fresh worker (200),
  never a 4xx;
* SIGTERM with stopped decode workers: the server exits promptly and no worker survives it;
* SIGKILL of the serving process mid-decode: its workers die with it, and the shared-memory files it
  left are removed when the next server starts.

Only this module's own processes and files are looked at (by pid, and by the owner pid in file names).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from tests.hardening import MODEL, TRANSCRIPTIONS, assert_still_serves, error_of, metric_value, tone_wav
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

SHM = Path("/dev/shm")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline


def granian_worker(server: ServerProcess) -> int:
    (worker,) = children(server.process.pid)
    return worker


def decode_workers(server: ServerProcess, count: int, within: float = 30.0) -> list[int]:
    """The server's decode worker processes, once `count` of them run."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        pids = [pid for pid in children(granian_worker(server)) if is_worker(pid) and alive(pid)]
        if len(pids) >= count:
            return pids
        time.sleep(0.1)
    pytest.fail(f"{count} decode workers did not start")


def wait_for(predicate: Callable[[], bool], within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    pytest.fail(f"condition not met within {within} s")


def files_of(pids: list[int]) -> list[Path]:
    tags = tuple(f"-o{pid}." for pid in pids)
    return [path for path in SHM.glob("qwenasr-*") if any(tag in path.name for tag in tags)]


def post(url: str, audio: bytes, name: str = "a.wav", timeout: float = 60) -> httpx.Response:
    return httpx.post(url + TRANSCRIPTIONS, files={"file": (name, audio)}, data={"model": MODEL}, timeout=timeout)


def long_flac(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    out = io.BytesIO()
    signal_ = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    sf.write(out, signal_.astype(np.float32), 16_000, format="FLAC")
    return out.getvalue()


def start(tmp_path: Path, name: str, **env: str) -> ServerProcess:
    settings = {"LOG_LEVEL": "info", "SHUTDOWN_GRACE_SECONDS": "2", **env}
    server = ServerProcess.product_with_test_double(settings, tmp_path / f"{name}.log")
    server.wait_until("/ready", timeout=60)
    return server


@pytest.fixture
def one_worker_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = start(tmp_path, "one", DECODE_WORKERS="1", WORKER_TIMEOUT_SECONDS="2", REQUEST_TIMEOUT_SECONDS="30")
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.logs()


def test_a_stuck_decode_worker_is_reported_killed_and_replaced(one_worker_server: ServerProcess) -> None:
    server = one_worker_server
    (stuck,) = decode_workers(server, 1)
    os.kill(stuck, signal.SIGSTOP)  # hangs: the reproduction
    ready = httpx.get(server.url + "/ready", timeout=10)
    assert ready.status_code == 503 and "decode worker" in ready.json()["reason"], ready.text
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric_value(metrics, 'qwenasr_worker_processes{pool="decode",state="stalled"}') == 1
    started = time.monotonic()
    response = post(server.url, tone_wav())
    took = time.monotonic() - started
    print(f"stuck decode worker: {response.status_code} after {took:.2f} s (worker deadline 2 s)")
    assert response.status_code == 504, response.text
    assert error_of(response)["code"] == "timeout" and response.headers.get("retry-after")
    assert took < 6.0
    wait_for(lambda: not alive(stuck), 10)
    wait_for(lambda: httpx.get(server.url + "/ready", timeout=10).status_code == 200, 30)
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric_value(metrics, 'qwenasr_worker_replacements_total{pool="decode",reason="timeout"}') == 1
    assert_still_serves(server.url)


def test_a_decode_worker_killed_during_a_valid_file_is_not_the_clients_fault(one_worker_server: ServerProcess) -> None:
    server = one_worker_server
    (victim,) = decode_workers(server, 1)
    os.kill(victim, signal.SIGSTOP)  # hold it mid-task, then kill it as the OOM killer would
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server.url, long_flac(59.0), "valid.flac")
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        response = pending.result(60)
    assert response.status_code == 200, response.text  # decoded again on a fresh worker
    assert response.json()["text"].startswith("chunk of")
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert metric_value(metrics, 'qwenasr_worker_replacements_total{pool="decode",reason="died"}') == 1
    assert "decode.retry_after_worker_death" in server.logs()
    assert_still_serves(server.url)


def test_sigterm_with_stopped_decode_workers_leaves_no_process(tmp_path: Path) -> None:
    server = start(tmp_path, "sigterm", DECODE_WORKERS="2")
    workers = decode_workers(server, 2)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    code = server.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - started
    print(f"SIGTERM with 2 stopped decode workers: exit {code} after {took:.2f} s")
    assert code == 0
    assert took < 5.0
    wait_for(lambda: not any(alive(pid) for pid in workers), 5)


def test_sigkill_of_the_server_mid_decode_leaves_no_worker_and_no_file_behind(tmp_path: Path) -> None:
    server = start(tmp_path, "killed", DECODE_WORKERS="2")
    workers = decode_workers(server, 2)
    serving = granian_worker(server)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # the decode is under way and stays so
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server.url, long_flac(120.0), "long.flac", 30)
        wait_for(lambda: bool(files_of([serving])), 10)  # the job's shared files exist
        left = files_of([serving, *workers])
        os.kill(serving, signal.SIGKILL)
        with pytest.raises(httpx.HTTPError):
            pending.result(30).raise_for_status()
    wait_for(lambda: not any(alive(pid) for pid in workers), 5)  # no orphans, stopped ones included
    server.stop()
    assert all(path.exists() for path in left), "the test expects the killed server's files to be left"
    print(f"left by the killed server: {len(left)} files, {sum(p.stat().st_size for p in left)} bytes")
    successor = start(tmp_path, "successor", DECODE_WORKERS="2")
    try:
        wait_for(lambda: not any(path.exists() for path in left), 30)
        assert "decode.orphaned_files_removed" in successor.logs()
        assert_still_serves(successor.url)
    finally:
        successor.stop()
