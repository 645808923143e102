"""Request heads over a fixed size get 431 (a request line over it alone gets 414), exactly.

granian caps its HTTP/1 read buffer (`MAX_REQUEST_HEAD_BYTES`, cli.py), but hyper checks that cap only
before each read, and one read may take it past: a 200 kB head that arrives at once is parsed and served
(measured: 2 in 5 tries), one that trickles in gets 431. The cap is only a backstop of about twice its
size. Here every head that reaches the app is measured against the same number, so the answer does not
depend on how the client's bytes were split. Size: method, target and version, and every header line,
as in RFC 9112 section 3 (request line) and section 5 (field lines), CRLFs included.
"""

from __future__ import annotations

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.status_codes import WS_1008_POLICY_VIOLATION
from litestar.types import ASGIApp, Receive, Scope, Send

from qwenasr_appliance.api.errors import APIError

MAX_REQUEST_HEAD_BYTES = 128 * 1024
"""The largest request head (request line and header lines) served; nothing this API takes needs a head
over a few kilobytes. granian's read buffer is set to the same size (below 128 KiB, uploads stream
measurably slower)."""


def request_line_bytes(scope: Scope) -> int:
    """Bytes of the request line `METHOD SP target SP HTTP/x.y CRLF` as the client sent it (the raw path
    when the server keeps it, else the decoded path, plus `?query`)."""
    path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    query = scope.get("query_string", b"")
    method = str(scope.get("method", "GET"))  # a WebSocket scope has none: its handshake is a GET
    return len(method) + 1 + len(path) + (len(query) + 1 if query else 0) + len(" HTTP/1.1\r\n")


def request_head_bytes(scope: Scope) -> int:
    """Bytes of the whole head: the request line, each `name: value CRLF`, and the closing CRLF."""
    fields = sum(len(name) + 2 + len(value) + 2 for name, value in scope["headers"])
    return request_line_bytes(scope) + fields + 2


class RequestHeadLimit(ASGIMiddleware):
    """414 `uri_too_long` when the request line alone is over `max_bytes`, 431
    `request_header_fields_too_large` when the whole head is; a WebSocket handshake over it is refused
    (HTTP 403)."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self, max_bytes: int = MAX_REQUEST_HEAD_BYTES) -> None:
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        limit = self.max_bytes
        if request_line_bytes(scope) > limit:
            status, message, code = 414, f"at most {limit} bytes for the request line", "uri_too_long"
        elif request_head_bytes(scope) > limit:
            status, message, code = (
                431,
                f"at most {limit} bytes for the request head",
                "request_header_fields_too_large",
            )
        else:
            await next_app(scope, receive, send)
            return
        if scope["type"] == ScopeType.WEBSOCKET:
            # Refused before the handshake is accepted, like every refused handshake (api/realtime.py):
            # the client sees HTTP 403.
            await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION, "reason": ""})
            return
        raise APIError(
            status,
            f"The request head is too large: {message}.",
            code=code,
            headers={"Connection": "close"},
        )
