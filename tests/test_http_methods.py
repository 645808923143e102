"""`HEAD` wherever `GET` works (load balancers and uptime checkers probe with it), and the answers to
`OPTIONS` and to methods a route does not take (405, OpenAI's error shape, an `Allow` header).

`HEAD` must answer what `GET` answers (status and headers) without a body: `/ready` 503 while the model
loads, 401 on protected ops routes, 404 on unknown paths. Litestar's test client drops a `HEAD` body
itself, so the body is checked on the ASGI messages the app sends, and on the wire through granian.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

from qwenasr_appliance.api.app import create_app
from qwenasr_appliance.api.head import HeadAsGet
from qwenasr_appliance.config import load_settings
from tests.doubles import DoubleBehaviour, double_factory
from tests.hardening import metric_value
from tests.servers import ServerProcess

KEY = "sk-test-head"
MODEL = "Qwen/Qwen3-ASR-1.7B"
# Every GET route of the HTTP API (the live page only with LIVE_PAGE=true).
GET_ROUTES = [
    "/health",
    "/ready",
    "/status",
    "/metrics",
    "/v1/models",
    f"/v1/models/{MODEL}",
    "/docs",
    "/docs/openapi.json",
    "/docs/assets/swagger-ui.css",
    "/live",
]
# Headers that differ between two answers to the same question.
_PER_ANSWER = {"x-request-id", "date"}
# Bodies that change from one request to the next (uptime, counters): their length may too.
_CHANGING_BODIES = {"/status", "/metrics"}


@contextlib.contextmanager
def _client(behaviour: DoubleBehaviour | None = None, **env: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    _, factory = double_factory(behaviour or DoubleBehaviour())
    app = create_app(
        load_settings({"DECODE_WORKERS": "1", "LIVE_PAGE": "true", **env}),
        engine_factory=factory,  # type: ignore[arg-type]
    )
    with TestClient(app) as client:
        yield client


def _wait_ready(client: TestClient) -> None:  # type: ignore[type-arg]
    end = time.monotonic() + 15
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < end, client.get("/ready").json()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    with _client() as client:
        _wait_ready(client)
        yield client


def _headers(response: Any, path: str) -> dict[str, str]:
    drop = _PER_ANSWER | ({"content-length"} if path in _CHANGING_BODIES else set())
    return {name: value for name, value in response.headers.items() if name not in drop}


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_like_get_without_a_body(client: TestClient, path: str) -> None:  # type: ignore[type-arg]
    get = client.get(path)
    head = client.head(path)
    assert get.status_code == 200, get.text
    assert head.status_code == get.status_code
    assert _headers(head, path) == _headers(get, path)
    assert int(head.headers["content-length"]) > 0 and head.content == b""


def test_head_ready_answers_503_while_the_model_loads() -> None:
    with _client(DoubleBehaviour(load_delay=30)) as client:
        get = client.get("/ready")
        head = client.head("/ready")
        assert get.status_code == head.status_code == 503
        assert get.json()["state"] == "loading"
        assert head.headers["retry-after"] == get.headers["retry-after"] == "10"
        assert head.headers["content-length"] == get.headers["content-length"] and head.content == b""
        assert client.head("/health").status_code == 200  # alive while loading
        assert client.head("/status").status_code == 200


def test_head_on_protected_ops_routes_needs_the_key_as_get_does() -> None:
    with _client(API_KEYS=KEY, PROTECT_OPS_ENDPOINTS="true") as client:
        for path in ("/health", "/ready", "/status", "/metrics", "/v1/models"):
            refused = client.head(path)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
            assert refused.content == b""
        assert client.head("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_options_lists_head_wherever_get_is_allowed(client: TestClient) -> None:  # type: ignore[type-arg]
    for path in ("/health", "/ready", "/status", "/metrics", "/v1/models"):
        answer = client.options(path)
        assert answer.status_code == 204, path
        assert _methods(answer.headers["allow"]) == {"GET", "HEAD", "OPTIONS"}, path
    posted = client.options("/v1/audio/transcriptions")
    assert _methods(posted.headers["allow"]) == {"POST", "OPTIONS"}  # no GET: no HEAD either


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/health", {"GET", "HEAD", "OPTIONS"}),
        ("POST", "/ready", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/metrics", {"GET", "HEAD", "OPTIONS"}),
        ("GET", "/v1/audio/transcriptions", {"POST", "OPTIONS"}),
        ("HEAD", "/v1/audio/transcriptions", {"POST", "OPTIONS"}),
        ("HEAD", "/v1/audio/translations", {"POST", "OPTIONS"}),
        ("POST", "/v1/realtime", {"GET", "HEAD", "OPTIONS"}),  # GET: the WebSocket handshake
    ],
)
def test_a_method_a_route_does_not_take_is_an_openai_405_with_allow(
    client: TestClient,  # type: ignore[type-arg]
    method: str,
    path: str,
    allowed: set[str],
) -> None:
    answer = client.request(method, path)
    assert answer.status_code == 405
    assert _methods(answer.headers["allow"]) == allowed
    assert answer.headers["content-type"] == "application/json"
    if method == "HEAD":
        assert answer.content == b""
    else:
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "method_not_allowed"
        assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_plain_http_to_the_websocket_endpoint_is_426_upgrade_required(
    client: TestClient,  # type: ignore[type-arg]
    method: str,
) -> None:
    """Someone who opens /v1/realtime in a browser or with curl learns to open a WebSocket instead."""
    answer = client.request(method, "/v1/realtime", params={"intent": "transcription"})
    assert answer.status_code == 426
    assert answer.headers["upgrade"] == "websocket" and answer.headers["connection"] == "Upgrade"
    if method == "GET":
        error = answer.json()["error"]
        assert error["code"] == "upgrade_required" and "WebSocket" in error["message"]
    with client.websocket_connect("/v1/realtime?intent=transcription") as ws:  # the handshake still works
        assert ws.receive_json()["type"] == "session.created"


def test_head_of_an_unknown_path_is_404_without_a_body(client: TestClient) -> None:  # type: ignore[type-arg]
    get, head = client.get("/nowhere"), client.head("/nowhere")
    assert get.status_code == head.status_code == 404
    assert get.json()["error"]["code"] == "not_found" and head.content == b""


def test_head_is_counted_as_head(client: TestClient) -> None:  # type: ignore[type-arg]
    sample = 'qwenasr_http_requests_total{method="HEAD",route="/health",status="200"}'
    before = metric_value(client.get("/metrics").text, sample)
    client.head("/health")
    assert metric_value(client.get("/metrics").text, sample) == before + 1


# -- the ASGI messages: no body bytes leave the app for HEAD ------------------------------------------


def _scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8001),
        "state": {},
    }


def _call(app: Any, method: str, path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages `app` sends for one request, and the scope after it."""
    scope = _scope(method, path)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, scope


@pytest.mark.parametrize(
    ("path", "status"),
    [("/health", 200), ("/ready", 503), ("/v1/models", 200), ("/v1/audio/transcriptions", 405), ("/x", 404)],
)
def test_the_app_sends_no_body_bytes_for_head(path: str, status: int) -> None:
    """The real app (no lifespan: the engine is not started, so /ready is 503), as a server sees it."""
    _, factory = double_factory(DoubleBehaviour())
    app = create_app(load_settings({"DECODE_WORKERS": "1"}), engine_factory=factory)  # type: ignore[arg-type]
    got, _ = _call(app, "GET", path)
    sent, scope = _call(app, "HEAD", path)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == status == got[0]["status"]
    length = dict(sent[0]["headers"])[b"content-length"]
    assert length == dict(got[0]["headers"])[b"content-length"] and int(length) > 0
    assert b"".join(m.get("body", b"") for m in got[1:]) != b""
    assert all(m["type"] == "http.response.body" and m.get("body", b"") == b"" for m in sent[1:])
    assert scope["method"] == "HEAD"


def test_head_as_get_drops_every_body_part_and_restores_the_method_after_a_failure() -> None:
    seen: list[str] = []

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"6")]})
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        await send({"type": "http.response.body", "body": b"def", "more_body": False})

    sent, scope = _call(HeadAsGet(streaming), "HEAD", "/stream")
    assert seen == ["GET"] and scope["method"] == "HEAD"
    assert [m.get("body") for m in sent[1:]] == [b"", b""] and [m["more_body"] for m in sent[1:]] == [True, False]
    sent, _ = _call(HeadAsGet(streaming), "GET", "/stream")
    assert b"".join(m["body"] for m in sent[1:]) == b"abcdef"

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    scope = _scope("HEAD", "/x")
    with pytest.raises(RuntimeError):
        asyncio.run(HeadAsGet(failing)(scope, _never, _never))
    assert scope["method"] == "HEAD"


async def _never(*_: Any) -> Any:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        (b"OPTIONS, GET", b"OPTIONS, GET, HEAD"),
        (b"GET", b"GET, HEAD"),
        (b"get,options", b"get, HEAD, options"),
        (b"GET, HEAD, OPTIONS", b"GET, HEAD, OPTIONS"),
        (b"OPTIONS, POST", b"OPTIONS, POST"),
        (b"websocket", b""),  # RFC 9110: an empty Allow means no method is allowed
        (b"websocket, GET, OPTIONS", b"GET, HEAD, OPTIONS"),
        (b"asgi, POST", b"POST"),
    ],
)
def test_allow_names_head_only_next_to_get(allow: bytes, expected: bytes) -> None:
    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": [(b"Allow", allow)]})
        await send({"type": "http.response.body", "body": b"{}"})

    sent, _ = _call(HeadAsGet(refusing), "DELETE", "/x")
    assert sent[0]["headers"] == [(b"Allow", expected)]


def _methods(allow: str) -> set[str]:
    return {method.strip().upper() for method in allow.split(",")}


# -- on the wire, through granian -------------------------------------------------------------------


@pytest.mark.slow
def test_head_keeps_a_keep_alive_connection_in_step(double_server: ServerProcess) -> None:
    """A body sent after a HEAD answer would be read as the start of the next answer on the connection."""
    requests = b"".join(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for method, path in (("HEAD", "/health"), ("HEAD", "/ready"), ("GET", "/health"))
    )
    with socket.create_connection(("127.0.0.1", double_server.port), timeout=10) as conn:
        conn.sendall(requests)
        received = b""
        while received.count(b"HTTP/1.1 ") < 3 or not received.endswith(b'{"status":"ok"}'):
            chunk = conn.recv(65536)
            assert chunk, received
            received += chunk
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert [answer[:3] for answer in answers] == [b"200", b"200", b"200"]
    for answer in answers[:2]:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert body == b"" and b"content-length: " in head.lower()
    assert answers[2].endswith(b'{"status":"ok"}')
