"""A budget for the uploads the server holds at once, refused with 429 before their bytes arrive.

Admission (`MAX_CONCURRENT_REQUESTS`, `MAX_QUEUE_SIZE`) counts requests once their form is parsed:
each holds its upload in memory from then on (spooled to the temporary directory past 1 MiB while it
arrives). At the defaults, 256 in flight and 512 queued uploads of 25 MiB are 19 GiB: past the pod's
memory limit (OOM kill) or its /tmp size (eviction), and every request in the pod dies with it. So the
bytes are budgeted (`config.upload_buffer_limit`): a request whose `Content-Length` does not fit gets
429 `server_overloaded` with `Retry-After` before any of its body is read; a chunked one (no length) is
counted as its body arrives and refused when it crosses the limit. The bytes are given back when the
request's answer is sent.
"""

from __future__ import annotations

from typing import Final

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from qwenasr_appliance.api.errors import APIError, overloaded
from qwenasr_appliance.metrics import METRICS, Metrics

# The routes whose bodies are uploads.
UPLOAD_PATHS: Final = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
RETRY_AFTER_SECONDS: Final = 5


class UploadBuffer:
    """Bytes held against `limit`; `reserve` takes them only when they fit. Event-loop only."""

    def __init__(self, limit: int, metrics: Metrics = METRICS) -> None:
        self.limit = limit
        self.held = 0
        self._metrics = metrics
        metrics.upload_buffer_limit.set(limit)
        metrics.upload_buffer.set(0)

    def reserve(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self._metrics.upload_buffer.set(self.held)
        return True

    def release(self, size: int) -> None:
        self.held = max(0, self.held - size)
        self._metrics.upload_buffer.set(self.held)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return None  # granian refuses a malformed length before the app; counted as it arrives
    return None


class UploadBufferLimit(ASGIMiddleware):
    """429 for an upload that does not fit in the `UploadBuffer` (see the module docstring).

    The refused body is read and thrown away before the answer goes out, up to `discard_limit` bytes
    (then the connection is closed): a client still sending when the server answers and closes gets a
    connection reset instead of the 429 (httpx: `ReadError`), as nginx's lingering close avoids too.
    Place it inside `BodyReadTimeout`, so that a stalled refused body is timed like any other."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, buffer: UploadBuffer, discard_limit: int) -> None:
        self.buffer = buffer
        self.discard_limit = discard_limit

    async def _refuse(self, receive: Receive, size: int | None, received: int, *, more_body: bool = True) -> APIError:
        METRICS.rejected.labels(reason="upload_buffer_full").inc()
        METRICS.transcriptions.labels(outcome="rejected").inc()
        size_text = f"this upload's {size} bytes" if size is not None else "this upload"
        error = overloaded(
            f"The server holds as many uploads as it has room for ({self.buffer.limit} bytes): "
            f"{size_text} would not fit. Retry after the time in the Retry-After header.",
            RETRY_AFTER_SECONDS,
        )
        while more_body:  # read the rest of the body and drop it
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left
            received += len(message.get("body", b""))
            if received > self.discard_limit:
                error.headers["Connection"] = "close"
                break
            more_body = message.get("more_body", False)
        return error

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope.get("method") != "POST" or scope["path"] not in UPLOAD_PATHS:
            await next_app(scope, receive, send)
            return
        buffer = self.buffer
        length = _content_length(scope)
        held = 0
        if length is not None:
            if not buffer.reserve(length):
                raise await self._refuse(receive, length, 0)
            held = length
            try:
                await next_app(scope, receive, send)
            finally:
                buffer.release(held)
            return

        async def counted() -> ReceiveMessage:
            nonlocal held
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                if size and not buffer.reserve(size):
                    refused, more = held + size, message.get("more_body", False)
                    buffer.release(held)
                    held = 0
                    raise await self._refuse(receive, None, refused, more_body=more)
                held += size
            return message

        try:
            await next_app(scope, counted, send)
        finally:
            buffer.release(held)
