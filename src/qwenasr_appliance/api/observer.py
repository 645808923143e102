"""Per-request observation of the HTTP server.

`RequestObserver` wraps the whole ASGI app (so 404s and errors raised before routing are seen too):
it assigns a request id (or keeps a safe one the client sent), returns it in `X-Request-ID`, counts and
times every response by route template, and writes one JSON log line per request with what the
handler recorded (audio seconds, processing seconds, real-time factor).
"""

from __future__ import annotations

import re
import time
import uuid
from contextvars import ContextVar
from typing import Any

import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from qwenasr_appliance.metrics import METRICS, Metrics, http_method_label, http_status_label
from qwenasr_appliance.transcription.types import RequestStats

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
REQUEST_STATS: ContextVar[RequestStats | None] = ContextVar("request_stats", default=None)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
# The most characters of a client-sent path or method written to the access log.
_LOGGED_CHARS = 256


def _clipped(value: str) -> str:
    return value if len(value) <= _LOGGED_CHARS else value[:_LOGGED_CHARS] + "..."


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestObserver:
    """ASGI wrapper adding request ids, HTTP metrics and the access log to an app."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics = METRICS) -> None:
        self.app = app
        self._metrics = metrics
        self._log = structlog.get_logger("qwenasr_appliance.access")

    def __getattr__(self, name: str) -> Any:
        # Expose the wrapped Litestar app's attributes (state, openapi_schema, ...) to tests and tools.
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        offered = _header(scope, b"x-request-id")
        request_id = offered if offered and _SAFE_REQUEST_ID.match(offered) else uuid.uuid4().hex
        stats = RequestStats()
        id_token = REQUEST_ID.set(request_id)
        stats_token = REQUEST_STATS.set(stats)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def observed_send(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            status = 500 if not response_started else status
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = str(scope.get("path_template") or "unmatched")
            method = str(scope.get("method", ""))
            method_label = http_method_label(method)
            self._metrics.http_requests.labels(route=route, method=method_label, status=http_status_label(status)).inc()
            self._metrics.http_request_duration.labels(route=route, method=method_label).observe(elapsed)
            self._access_log(scope, route, method, status, elapsed, stats)
            structlog.contextvars.unbind_contextvars("request_id")
            REQUEST_STATS.reset(stats_token)
            REQUEST_ID.reset(id_token)

    def _access_log(
        self, scope: Scope, route: str, method: str, status: int, elapsed: float, stats: RequestStats
    ) -> None:
        fields: dict[str, Any] = {
            "method": _clipped(method),
            "path": _clipped(str(scope.get("path", ""))),
            "route": route,
            "status": status,
            "duration_seconds": round(elapsed, 4),
        }
        if stats.audio_seconds:
            fields.update(
                audio_seconds=round(stats.audio_seconds, 3),
                processing_seconds=round(elapsed, 4),
                rtf=round(elapsed / stats.audio_seconds, 5),
                decode_seconds=round(stats.decode_seconds, 4),
                decode_pieces=stats.decode_pieces,
                queue_seconds=round(stats.queue_seconds, 4),
                engine_seconds=round(stats.engine_seconds, 4),
                chunks=stats.chunks,
                language=stats.language,
            )
            if stats.audio_truncated:
                fields["audio_truncated"] = True
        if route in _QUIET_ROUTES and status < 400:
            self._log.debug("request", **fields)
        else:
            self._log.info("request", **fields)
