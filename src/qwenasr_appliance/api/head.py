"""`HEAD` wherever `GET` works: the same status and headers as `GET`, no body.

Load balancers and uptime checkers probe `/health` and `/ready` with `HEAD` as often as with `GET`.
Litestar routes `HEAD` only to handlers registered for it; its `head` handlers may not return a body, so
a `HEAD` twin of every `GET` route (`/ready` answers 503 with a JSON reason) would duplicate each
handler, and a handler registered for both (`route(http_method=[GET, HEAD])`) sends its body for `HEAD`
too (Litestar 2.25 sets `is_head_response` only for its static files). `HeadAsGet` instead routes a `HEAD` request as `GET` and drops the body from the answer,
as Flask and Django do; the `Allow` header of a 405 or `OPTIONS` answer then names `HEAD`
wherever it names `GET`.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

_ALLOW = b"allow"


# Litestar lists the scope types of a path's other handlers as if they were methods ("websocket, GET"
# for /v1/realtime); an Allow header names HTTP methods only (RFC 9110 section 10.2.1).
_NOT_METHODS = {"websocket", "asgi"}


def _with_head(allow: bytes) -> bytes:
    """An `Allow` value with `HEAD` added after `GET` when it lists `GET` and not `HEAD`, and without
    Litestar's pseudo-methods `websocket` and `asgi`."""
    listed = [method.strip() for method in allow.decode("latin-1").split(",") if method.strip()]
    methods = [method for method in listed if method.lower() not in _NOT_METHODS]
    upper = [method.upper() for method in methods]
    if "GET" in upper and "HEAD" not in upper:
        methods.insert(upper.index("GET") + 1, "HEAD")
    if methods == listed:
        return allow
    return ", ".join(methods).encode("latin-1")


class HeadAsGet:
    """ASGI wrapper: a `HEAD` request runs as `GET` and its answer goes out without body bytes (the
    headers, `Content-Length` included, stay those of `GET`, as RFC 9110 section 9.3.2 asks).

    The scope's method is `GET` only while the wrapped app runs and is `HEAD` again afterwards, so the
    access log and the metrics around this wrapper count the request as `HEAD`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        # The wrapped Litestar app's attributes (state, openapi_schema, ...), as RequestObserver exposes them.
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "HEAD":
            await self.app(scope, receive, _naming_head(send))
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await _naming_head(send)(message)

        # Changed in place: Litestar records the route template in this scope, and the observer reads it.
        scope["method"] = "GET"
        try:
            await self.app(scope, receive, without_body)
        finally:
            scope["method"] = "HEAD"


def _naming_head(send: Send) -> Send:
    """`send` with `HEAD` added to an `Allow` header that lists `GET` (405 and `OPTIONS` answers)."""

    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if any(name.lower() == _ALLOW for name, _ in headers):
                named = [(name, _with_head(value) if name.lower() == _ALLOW else value) for name, value in headers]
                message = {**message, "headers": named}
        await send(message)

    return sender
