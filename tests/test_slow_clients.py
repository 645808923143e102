"""Slow and oversized clients against a real server with the appliance's own granian configuration
(cli.build_server) and CLIENT_TIMEOUT_SECONDS=2: slowloris headers and idle keep-alive connections are
closed, a stalled body gets 408, a slow but steady upload is served, oversized request heads get 431.
Each test is bounded well under 15 s."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenasr_appliance.api.request_head import MAX_REQUEST_HEAD_BYTES
from tests.hardening import MODEL, TRANSCRIPTIONS, assert_still_serves, multipart, read_until_closed, tone_wav
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"CLIENT_TIMEOUT_SECONDS": str(TIMEOUT), "LOG_LEVEL": "info"}
    process = ServerProcess.product_with_test_double(env, tmp_path_factory.mktemp("slow") / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        assert process.stop() == 0


def connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_slowloris_headers_are_cut_off(server: ServerProcess) -> None:
    """Headers sent a byte at a time, forever: the connection is closed once the head is TIMEOUT late."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    with connect(server) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(4096) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                pass
            if time.monotonic() - started > 12:
                break
    assert closed_after is not None, "the server kept a slowloris connection open"
    assert TIMEOUT * 0.8 <= closed_after <= TIMEOUT + 3, closed_after
    assert_still_serves(server.url)


def test_idle_keep_alive_connection_is_closed(server: ServerProcess) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        time.sleep(0.2)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        data, seconds = read_until_closed(sock, within=TIMEOUT + 5)
    assert data == b"" and seconds <= TIMEOUT + 2, seconds


def _upload_head(body_length: int) -> bytes:
    return (
        f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary=hardening-boundary\r\nContent-Length: {body_length}\r\n\r\n"
    ).encode()


def test_stalled_body_gets_408(server: ServerProcess) -> None:
    body = multipart([("model", None, MODEL.encode()), ("file", "a.wav", tone_wav())])
    with connect(server) as sock:
        sock.sendall(_upload_head(len(body)) + body[:1000])  # then nothing
        started = time.monotonic()
        data, _ = read_until_closed(sock, within=TIMEOUT + 8)
        answered_after = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    assert b'"code":"request_timeout"' in data and b'"type":"invalid_request_error"' in data
    assert answered_after <= TIMEOUT + 3, answered_after
    assert_still_serves(server.url)


def test_slow_but_steady_upload_is_served(server: ServerProcess) -> None:
    """The body timeout is per read, like nginx's client_body_timeout, not a limit on the whole upload."""
    body = multipart([("model", None, MODEL.encode()), ("file", "a.wav", tone_wav())])
    size = len(body) // 3 + 1
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    with connect(server) as sock:
        sock.sendall(_upload_head(len(body)))
        for piece in pieces:  # the whole upload takes longer than TIMEOUT, no gap does
            time.sleep(TIMEOUT * 0.6)
            sock.sendall(piece)
        data, _ = read_until_closed(sock, within=10)
    assert data.startswith(b"HTTP/1.1 200"), data[:300]
    assert b"chunk of 1.0 seconds" in data


LIMIT = MAX_REQUEST_HEAD_BYTES


def _head(target: bytes = b"/health", *headers: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def _padded_head(total: int) -> bytes:
    """A GET /health head of exactly `total` bytes (one X-Pad header fills it)."""
    bare = _head(b"/health", b"X-Pad: ")
    return _head(b"/health", b"X-Pad: " + b"a" * (total - len(bare)))


# Each head is sent whole and, for the large ones, a few kilobytes at a time: hyper's buffer cap passes a
# head that arrives in one read and refuses one that trickles in, the answer must not depend on that.
OVERSIZED = {
    "200-kB-header": (_head(b"/health", b"X-Big: " + b"a" * 200_000), (b"431",)),
    "one-byte-over": (_padded_head(LIMIT + 1), (b"431",)),
    "200-headers": (_head(b"/health", *(b"X-H%d: v" % i for i in range(200))), (b"431",)),
    "many-small-headers-over": (_head(b"/health", *(b"X-H%d: " % i + b"v" * 1400 for i in range(95))), (b"431",)),
    # The request line alone over the cap: 414 from the app, or 431 when hyper's buffer refused it first.
    "200-kB-url": (_head(b"/" + b"a" * 200_000), (b"414", b"431")),
    "130-KiB-query": (_head(b"/health?q=" + b"a" * (130 * 1024)), (b"414", b"431")),
    "websocket-handshake": (
        _head(
            b"/v1/realtime?intent=transcription",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
            b"X-Big: " + b"a" * (LIMIT + 10),
        ),
        (b"403", b"431"),  # a refused handshake is a 403 (api/realtime.py), or hyper's 431
    ),
}


def _send(sock: socket.socket, data: bytes, piece: int | None) -> None:
    with contextlib.suppress(OSError):  # the server may answer and close before reading everything
        if piece is None:
            sock.sendall(data)
            return
        for i in range(0, len(data), piece):
            sock.sendall(data[i : i + piece])
            time.sleep(0.001)


@pytest.mark.parametrize("piece", [None, 4096], ids=["whole", "in-4-KiB-pieces"])
@pytest.mark.parametrize("name", list(OVERSIZED))
def test_oversized_request_heads_are_refused(server: ServerProcess, name: str, piece: int | None) -> None:
    head, statuses = OVERSIZED[name]
    for _ in range(3):  # the race this guards against showed up 2 times in 5
        with connect(server) as sock:
            _send(sock, head, piece)
            data, _ = read_until_closed(sock, within=5)
        assert data.startswith(b"HTTP/1.1 ") and data[9:12] in statuses, data[:200]
        if data.startswith(b"HTTP/1.1 4") and b"content-length: 0" not in data.lower():
            assert b'"error"' in data, data[:400]  # the app's answer is OpenAI-shaped


def test_a_head_of_exactly_the_limit_is_served(server: ServerProcess) -> None:
    with connect(server) as sock:
        _send(sock, _padded_head(LIMIT), 4096)
        data, _ = read_until_closed(sock, within=5)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    assert_still_serves(server.url)


def test_silent_connections_do_not_hold_up_shutdown(tmp_path: Path) -> None:
    """A connection that never sends a byte is not timed by granian (see docs/reliability.md), but it
    neither blocks other clients nor delays SIGTERM."""
    server = ServerProcess.product_with_test_double({"CLIENT_TIMEOUT_SECONDS": str(TIMEOUT)}, tmp_path / "s.log")
    server.wait_until("/ready", timeout=60)
    silent = [connect(server) for _ in range(20)]
    try:
        assert_still_serves(server.url)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
        assert time.monotonic() - started < 3
    finally:
        for sock in silent:
            sock.close()
        server.stop()
