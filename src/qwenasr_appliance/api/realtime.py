"""`GET /v1/realtime`: OpenAI's Realtime API transcription sessions over WebSocket.

The session logic lives in `transcription/live/`; this module is the transport: the handshake, the
authentication, one reader and one writer per socket, and the limits that need the socket.

Handshake. `?intent=transcription` (what `client.realtime.connect(extra_query={"intent": "transcription"})`
sends) and `?model=` (the served name or the model id) are both accepted; another `intent` or an unknown
model is refused. Keys, when API_KEYS is set: `Authorization: Bearer <key>` (servers, the OpenAI SDKs), or,
for browsers, which cannot set headers on a WebSocket, the subprotocol `openai-insecure-api-key.<key>`
next to `realtime`, as OpenAI's browser clients send it (`new WebSocket(url, ["realtime",
"openai-insecure-api-key." + key])`). The server then picks `realtime`, never echoing the key. A refused
handshake gets an HTTP answer in OpenAI's error shape instead of the upgrade (ASGI's WebSocket Denial
Response, which granian speaks): 401 `invalid_api_key`, 400 `unsupported_intent`, 404 `model_not_found`;
under a server without that extension, a bare HTTP 403.

Close codes after the handshake (each preceded by an `error` event that says why, when one can be sent):
1000 idle timeout (`idle_timeout`) or session length reached (`session_expired`); 1001 server shutting
down (`server_shutting_down`); 1008 a client that reads too slowly (`slow_consumer`: more than
`LIVE_SEND_QUEUE_EVENTS` events waiting, or one send blocked `LIVE_SEND_TIMEOUT_SECONDS`); 1011 an
internal error; 1013 try again later (`session_limit_reached`, `engine_unavailable`, and
`server_shutting_down` for a session opened while the server drains).

Idle timeout, session length reached and server shutting down end a session the same way: the audio the session
holds is committed as a last turn (`input_audio_buffer.committed`, after `speech_stopped` in server VAD
mode); client events from then on are refused, one `error` `session_closed` each (with its `event_id`):
that audio is not transcribed; every committed turn gets its `...completed` within
`FINAL_DRAIN_SECONDS` (on shutdown also within the grace period, less `CLOSE_RESERVE_SECONDS` for the
rest), or else `...failed` with the ending's code (`idle_timeout`, `session_expired`, `server_shutting_down`); then the
`error` event and the close.

On shutdown the close code is 1001 (going away, RFC 6455 section 7.4.1), not 1012 (service restart,
IANA registry only): this replica goes away, whether or not one comes back in its place, and the client
should reconnect through the load balancer to another one; every WebSocket client knows 1001. The
server's own shutdown waits for these closes (`ShutdownGrace.defer_server_stop`, see shutdown.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import structlog
from litestar import WebSocket, get, websocket
from litestar.datastructures import State

from qwenasr_appliance.api.auth import key_matches
from qwenasr_appliance.api.context import AppContext, app_context
from qwenasr_appliance.api.errors import APIError, bad_request, clip, model_not_found, unauthorized
from qwenasr_appliance.transcription.live.events import (
    ClientEventError,
    ErrorEvent,
    ErrorType,
    ServerEvent,
    encode_server_event,
    error_event,
)
from qwenasr_appliance.transcription.live.registry import LiveSessions, SessionLimitReached
from qwenasr_appliance.transcription.live.session import LiveSession

log = structlog.get_logger(__name__)

SUBPROTOCOL: Final = "realtime"
KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_INTERNAL, CLOSE_TRY_AGAIN = 1000, 1001, 1008, 1011, 1013
# Committed turns still get their transcripts before the socket closes, for at most this long.
FINAL_DRAIN_SECONDS: Final = 10.0
# On shutdown, kept from the grace period for the last events and the close handshake after the drain.
CLOSE_RESERVE_SECONDS: Final = 1.0
ERROR_SEND_SECONDS: Final = 1.0


def live_sessions(state: State) -> LiveSessions:
    live = state["live"]
    assert isinstance(live, LiveSessions)
    return live


def _offered_subprotocols(socket: WebSocket[Any, Any, Any]) -> list[str]:
    return [str(p) for p in socket.scope.get("subprotocols") or []]


def _authorized(socket: WebSocket[Any, Any, Any], keys: tuple[str, ...]) -> bool:
    if not keys:
        return True
    scheme, _sep, token = socket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key_matches(token.strip(), keys):
        return True
    return any(
        key_matches(p[len(KEY_SUBPROTOCOL_PREFIX) :], keys)
        for p in _offered_subprotocols(socket)
        if p.startswith(KEY_SUBPROTOCOL_PREFIX)
    )


def _handshake_refusal(socket: WebSocket[Any, Any, Any], context: AppContext) -> APIError | None:
    """Why the handshake is refused, as the error the client gets, or None."""
    settings = context.settings
    if not _authorized(socket, settings.api_keys):
        return unauthorized()
    intent = socket.query_params.get("intent")
    if intent is not None and intent != "transcription":
        return bad_request(
            f"This server serves transcription sessions only: connect with ?intent=transcription, not "
            f"'{clip(intent)}'.",
            param="intent",
            code="unsupported_intent",
        )
    model = socket.query_params.get("model")
    if model is not None and model.strip() not in {settings.model_name, settings.model_id}:
        return model_not_found(model, (settings.model_name, settings.model_id))
    return None


async def _deny(socket: WebSocket[Any, Any, Any], error: APIError) -> None:
    """Refuse the handshake with `error` as an HTTP answer (its status, OpenAI's error body) where the
    server speaks ASGI's WebSocket Denial Response extension (granian does), else by closing before the
    accept (the client then sees a bare HTTP 403)."""
    await socket.receive()  # websocket.connect
    if "websocket.http.response" not in (socket.scope.get("extensions") or {}):
        await socket.close(code=CLOSE_POLICY)
        return
    body = msgspec.json.encode(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
    await socket.send({"type": "websocket.http.response.start", "status": error.status_code, "headers": headers})
    await socket.send({"type": "websocket.http.response.body", "body": body, "more_body": False})


class _Outbox:
    """The bounded queue between the session and the socket's writer; overflow means a slow reader."""

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[str] = asyncio.Queue(limit)
        self.overflowed = asyncio.Event()

    def emit(self, event: ServerEvent) -> None:
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(encode_server_event(event))
        except asyncio.QueueFull:
            self.overflowed.set()


async def _within(awaitable: Awaitable[Any], seconds: float) -> bool:
    """Run `awaitable` for at most `seconds`; True if it completed without error.

    A send to a peer whose receive window stays closed does not end when its task is cancelled (seen with
    granian 2.8), so a late one is cancelled and left behind, never awaited: the caller goes on.
    """
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        return False
    return not task.cancelled() and task.exception() is None


async def _writer(socket: WebSocket[Any, Any, Any], outbox: _Outbox, send_timeout: float) -> None:
    """Send queued events in order; a send that takes longer than `send_timeout` marks a slow reader."""
    while True:
        text = await outbox.queue.get()
        try:
            if not await _within(socket.send_text(text), send_timeout):
                outbox.overflowed.set()
                return
        finally:
            outbox.queue.task_done()


async def _reader(socket: WebSocket[Any, Any, Any], session: LiveSession, idle_timeout: float) -> str:
    """Hand client messages to the session until the client leaves ("client_closed") or stays silent
    for `idle_timeout` seconds while no committed turn awaits its transcript ("idle_timeout")."""
    while True:
        try:
            async with asyncio.timeout(idle_timeout):
                message = await socket.receive()
        except TimeoutError:
            if session.awaiting_finals:  # the client waits for transcripts: not idle
                continue
            return "idle_timeout"
        if message["type"] == "websocket.disconnect":
            return "client_closed"
        text = message.get("text")
        if not isinstance(text, str):
            session.reject(
                ClientEventError(
                    "Binary messages are not part of the protocol: send each event as a JSON text message.",
                    code="invalid_json",
                )
            )
            continue
        await session.receive(text)


async def _finish_sending(
    socket: WebSocket[Any, Any, Any], outbox: _Outbox, writer: asyncio.Task[None], last: ErrorEvent | None, code: int
) -> None:
    """Let the writer flush what is queued (briefly; not for a slow reader), stop it, send the final error
    event and close. A client that is gone or stuck is ignored: every step is bounded."""
    if not outbox.overflowed.is_set():
        await _within(outbox.queue.join(), ERROR_SEND_SECONDS * 2)
    writer.cancel()
    await asyncio.wait({writer}, timeout=ERROR_SEND_SECONDS)
    if (
        outbox.overflowed.is_set()
        or last is None
        or await _within(socket.send_text(encode_server_event(last)), ERROR_SEND_SECONDS)
    ):
        await _within(socket.close(code=code), ERROR_SEND_SECONDS)


_ENDINGS: Final[dict[str, tuple[int, str, ErrorType]]] = {
    "idle_timeout": (CLOSE_NORMAL, "idle_timeout", "invalid_request_error"),
    "session_expired": (CLOSE_NORMAL, "session_expired", "invalid_request_error"),
    "slow_consumer": (CLOSE_POLICY, "slow_consumer", "invalid_request_error"),
    "shutdown": (CLOSE_GOING_AWAY, "server_shutting_down", "server_error"),
    "error": (CLOSE_INTERNAL, "server_error", "server_error"),
}


def _ending(reason: str, context: AppContext) -> tuple[int, ErrorEvent | None]:
    """The close code and the last error event for a session that the server ends."""
    settings = context.settings
    messages = {
        "idle_timeout": f"No client event arrived for {settings.live_idle_timeout_seconds:g} seconds.",
        "session_expired": f"The session reached its maximum length of {settings.live_max_session_seconds:g} seconds.",
        "slow_consumer": "The client reads server events too slowly; the session is closed.",
        "shutdown": "The server is shutting down; reconnect to another instance.",
        "error": "The server failed while serving the session.",
    }
    if reason not in _ENDINGS:
        return CLOSE_NORMAL, None
    code, error_code, error_type = _ENDINGS[reason]
    return code, error_event(ClientEventError(messages[reason], code=error_code, error_type=error_type))


async def _first_done(tasks: dict[str, asyncio.Future[Any]]) -> str:
    done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
    for name, task in tasks.items():
        if task in done:
            try:
                result = task.result()
            except Exception:
                log.exception("live.session_failed")
                return "error"
            return result if isinstance(result, str) else name
    return "error"


# Endings that let committed turns finish: the `...failed` message and code of a turn that does not.
_WIND_DOWN: Final[dict[str, tuple[str, str]]] = {
    # A client that stops sending mid-turn (a recording without trailing silence, so server VAD never
    # hears the turn end) gets that turn transcribed before the close, not dropped.
    "idle_timeout": (
        "The session ended for inactivity before this turn was transcribed.",
        "idle_timeout",
    ),
    "session_expired": (
        "The session reached its maximum length before this turn was transcribed.",
        "session_expired",
    ),
    "shutdown": (
        "The server shut down before this turn was transcribed; send its audio again in a new session.",
        "server_shutting_down",
    ),
}


def _drain_seconds(context: AppContext) -> float:
    """How long committed turns may take to finish: FINAL_DRAIN_SECONDS; while the server drains, also
    no longer than the grace period leaves after CLOSE_RESERVE_SECONDS (then it stops, see shutdown.py)."""
    if not context.shutdown.draining:
        return FINAL_DRAIN_SECONDS
    return max(0.0, min(FINAL_DRAIN_SECONDS, context.shutdown.seconds_left() - CLOSE_RESERVE_SECONDS))


def _reader_outcome(reader: asyncio.Task[str]) -> str | None:
    if reader.cancelled():
        return None
    if reader.exception() is not None:
        log.warning("live.reader_failed", error=type(reader.exception()).__name__)
        return None
    return reader.result()


async def _wind_down(session: LiveSession, reader: asyncio.Task[str], reason: str, context: AppContext) -> str:
    """End a session whose committed turns still finish (`_WIND_DOWN`): client events are refused from
    now on, one `session_closed` error each (the reader goes on: the client learns it at once, and the
    socket keeps being read), the audio held becomes a last turn, and every committed turn gets its final
    event in time or `...failed`. Returns `reason`, or "client_closed" if the client leaves meanwhile."""
    session.stop_accepting(reason)
    draining = asyncio.ensure_future(session.drain(_drain_seconds(context)))
    watched: set[asyncio.Future[Any]] = {draining, reader}
    while not draining.done():
        done, watched = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if reader in done and _reader_outcome(reader) == "client_closed":
            draining.cancel()
            await asyncio.wait({draining})
            return "client_closed"
    if not draining.result():
        message, code = _WIND_DOWN[reason]
        await session.fail_outstanding(message, code=code)
    return reason


async def _serve(socket: WebSocket[Any, Any, Any], session: LiveSession, outbox: _Outbox, context: AppContext) -> str:
    """Run the session until the client leaves or a limit ends it; returns the reason (END_REASONS)."""
    settings = context.settings
    reader = asyncio.create_task(_reader(socket, session, settings.live_idle_timeout_seconds))
    watchers: dict[str, asyncio.Future[Any]] = {
        "reader": reader,
        "slow_consumer": asyncio.ensure_future(outbox.overflowed.wait()),
        "session_expired": asyncio.ensure_future(asyncio.sleep(settings.live_max_session_seconds)),
        "shutdown": asyncio.ensure_future(context.shutdown.began.wait()),
    }
    try:
        reason = await _first_done(watchers)
        if reason in _WIND_DOWN:
            reason = await _wind_down(session, reader, reason, context)
    finally:
        for task in watchers.values():
            task.cancel()
        await asyncio.wait(watchers.values(), timeout=ERROR_SEND_SECONDS)
    return reason


@get("/v1/realtime", include_in_schema=False, name="realtime_without_upgrade", sync_to_thread=False)
def realtime_without_upgrade() -> None:
    """A plain HTTP request to the WebSocket endpoint: 426 Upgrade Required naming the protocol to
    upgrade to (RFC 9110 section 15.5.22, RFC 6455 section 4.2.2), in OpenAI's error shape."""
    raise APIError(
        426,
        "/v1/realtime speaks the Realtime API over WebSocket: open a WebSocket connection "
        "(GET with 'Upgrade: websocket'), e.g. client.realtime.connect(extra_query={'intent': 'transcription'}).",
        code="upgrade_required",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )


@websocket("/v1/realtime", name="realtime")
async def realtime(socket: WebSocket[Any, Any, Any]) -> None:
    """One transcription session (see the module docstring for the handshake, events and close codes)."""
    context = app_context(socket.app.state)
    with context.shutdown.defer_server_stop():  # granian would cut the socket: it stops after the close
        await _run(socket, context, live_sessions(socket.app.state))


async def _run(socket: WebSocket[Any, Any, Any], context: AppContext, live: LiveSessions) -> None:
    refusal = _handshake_refusal(socket, context)
    if refusal is not None:
        await _deny(socket, refusal)
        log.info("live.refused", reason=refusal.code, status=refusal.status_code)
        return
    offered = _offered_subprotocols(socket)
    await socket.accept(subprotocols=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    outbox = _Outbox(context.settings.live_send_queue_events)
    started = time.perf_counter()
    try:
        session = _open(live, context, outbox.emit)
    except _Refused as refused:
        if await _within(socket.send_text(encode_server_event(error_event(refused.error))), ERROR_SEND_SECONDS):
            await _within(socket.close(code=CLOSE_TRY_AGAIN), ERROR_SEND_SECONDS)
        log.info("live.refused", reason=refused.error.code)
        return
    writer = asyncio.create_task(_writer(socket, outbox, context.settings.live_send_timeout_seconds))
    reason = "error"
    try:
        session.start()
        log.info("live.session_started", session_id=session.id, open_sessions=live.count)
        reason = await _serve(socket, session, outbox, context)
    finally:
        await live.ended(session, reason)
        if reason == "client_closed":
            writer.cancel()
            await asyncio.wait({writer}, timeout=ERROR_SEND_SECONDS)
        else:
            code, last = _ending(reason, context)
            await _finish_sending(socket, outbox, writer, last, code)
        elapsed = round(time.perf_counter() - started, 3)
        log.info("live.session_ended", session_id=session.id, reason=reason, seconds=elapsed)


class _Refused(Exception):
    def __init__(self, error: ClientEventError) -> None:
        super().__init__(error.message)
        self.error = error


def _open(live: LiveSessions, context: AppContext, emit: Callable[[ServerEvent], None]) -> LiveSession:
    if context.shutdown.draining:
        live.rejected("server_shutting_down")
        raise _Refused(
            ClientEventError("The server is shutting down.", code="server_shutting_down", error_type="server_error")
        )
    if not context.supervisor.ready:
        reason = context.supervisor.not_ready_reason or "the model is not loaded"
        live.rejected("engine_unavailable")
        raise _Refused(
            ClientEventError(
                f"The model is not serving yet: {reason}.", code="engine_unavailable", error_type="server_error"
            )
        )
    try:
        return live.open(emit)
    except SessionLimitReached:
        limit = live.settings.live_max_sessions
        message = (
            f"This server holds at most {limit} live sessions at once; try again later."
            if limit
            else "Live transcription is turned off on this server (LIVE_MAX_SESSIONS=0)."
        )
        raise _Refused(
            ClientEventError(
                message,
                code="session_limit_reached",
                error_type="server_error",
            )
        ) from None
