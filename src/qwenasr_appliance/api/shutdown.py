"""Graceful shutdown: in-flight requests get SHUTDOWN_GRACE_SECONDS, then a clear 503, never a cut; live
sessions end with their transcripts, an `error` event and a close frame, never a dropped socket.

What granian 2.8.7 does on SIGTERM or SIGINT in its worker (read in its source: the Python side as
installed, `granian/server/mp.py`, the Rust side in the 2.8.1 tree, `src/workers.rs`, `src/asgi/io.rs`;
measured with 2.8.7 on real servers, raw sockets and tests/test_realtime_shutdown.py):

* HTTP: it closes the listening socket at once (new connections are refused), closes idle keep-alive
  connections, lets every request in flight finish, and only then runs the ASGI lifespan shutdown. Its
  main process kills the worker `workers_kill_timeout` seconds after the signal. A request still running
  then would be cut off without a response, and the engine would never be closed cleanly.
* WebSockets: it does not wait for them. Within milliseconds the app's `receive()` returns
  `websocket.disconnect` although the client is still connected; every later send "succeeds" but no
  byte reaches the client; no close frame is sent. An open WebSocket does not count as in flight, so
  the lifespan shutdown starts at once, and when it ends the process exits and the client sees the TCP
  connection close (close code 1006). Live sessions would lose their last transcripts without a word.

So the app takes the signals over from granian:

* In the worker, granian loads the app (`create_app`, a factory) just before it installs its own signal
  handlers with `granian._signals.set_loop_signals`. `capture_server_stop` wraps that function for that
  one call and keeps what it returns: the `WorkerSignal` whose `set()` starts granian's shutdown.
* At start-up `install_signal_handlers` replaces granian's handlers on the event loop with the app's.
* On the signal the grace period starts (`began`): each live session stops taking client events,
  transcribes what it holds and sends the final events, then `error` `server_shutting_down` and close
  1001 (api/realtime.py). The app pulls granian's trigger when no live session holds it back any more
  (`defer_server_stop`), at the latest when the grace period ends; from then on granian stops as above.
  Until then granian still accepts connections: new HTTP requests run under the same deadline, new
  live sessions are refused with `server_shutting_down`. (Behind Kubernetes, the pod has left the
  Service before SIGTERM: the chart's preStop sleep.)
* When the grace period ends, every transcription still running or waiting gets 503
  `server_shutting_down` with `Retry-After` (the route races its work against `ShutdownGrace.expired`).
  granian's drain then completes, the lifespan shutdown closes the engine, and the process exits 0
  before the kill.

Where the trigger cannot be captured (another ASGI server; a granian whose internals changed, logged as
`shutdown.live_wind_down_unavailable`) the app's handlers are chained onto the server's instead: the
HTTP drain is the same, but the server may cut live sessions at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, Final, Protocol

import structlog

log = structlog.get_logger(__name__)

_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
_CAPTURING: Final = "_qwenasr_capture"  # marks the wrapper, so that two apps in one process wrap once


class ServerStopping(Exception):
    """The shutdown grace period ended before the response was ready."""


class ServerStop(Protocol):
    """What starts the server's own shutdown: granian's `WorkerSignal`."""

    def set(self) -> None: ...


class ShutdownGrace:
    """The shutdown deadline: `expired` is set `grace_seconds` after `begin()`."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.expired = asyncio.Event()
        self.began = asyncio.Event()  # set by begin(): long-lived connections (live sessions) wind down
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # loop time when the grace period ends
        self._began = False
        self._previous: dict[int, Any] = {}
        self._server_stop: ServerStop | None = None
        self._loop_signals: tuple[signal.Signals, ...] = ()
        self._stopping_server: asyncio.Task[None] | None = None
        self._deferring = 0
        self._undeferred = asyncio.Event()
        self._undeferred.set()

    @property
    def draining(self) -> bool:
        return self._began

    def seconds_left(self) -> float:
        """Seconds until the grace period ends (all of it before `begin`; 0 once it ended)."""
        if self._deadline is None:
            return self.grace_seconds
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def begin(self, reason: str) -> None:
        """Start the grace period (once; later calls change nothing). Call on the event loop."""
        if self._began:
            return
        self._began = True
        self.began.set()
        log.info("shutdown.draining", reason=reason, grace_seconds=self.grace_seconds)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.grace_seconds
        self._timer = loop.call_later(self.grace_seconds, self._expire)

    def _expire(self) -> None:
        log.warning("shutdown.grace_expired", grace_seconds=self.grace_seconds)
        self.expired.set()

    @contextlib.contextmanager
    def defer_server_stop(self) -> Iterator[None]:
        """While inside, a signal does not reach the server yet (granian would cut WebSockets at once);
        at the latest when the grace period ends, it does."""
        self._deferring += 1
        self._undeferred.clear()
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring:
                self._undeferred.set()

    def capture_server_stop(self) -> None:
        """Keep granian's stop trigger for this app instead of letting its signal handlers pull it.

        Call in the app factory: granian's worker (2.8, `server/mp.py`) loads the app, then looks up
        `granian._signals.set_loop_signals` and calls it once to install its handlers; the wrapper keeps
        the `WorkerSignal` it returns and puts the original back. Elsewhere (no granian, another server
        that never calls it) nothing happens.
        """
        try:
            module = importlib.import_module("granian._signals")
        except ImportError:
            return
        original = getattr(module, "set_loop_signals", None)
        if not callable(original) or getattr(original, _CAPTURING, False):
            return

        def set_loop_signals(*args: Any, **kwargs: Any) -> Any:
            setattr(module, "set_loop_signals", original)  # noqa: B010 - a module of granian's, untyped
            stop = original(*args, **kwargs)
            if callable(getattr(stop, "set", None)):
                self._server_stop = stop
            return stop

        setattr(set_loop_signals, _CAPTURING, True)
        setattr(module, "set_loop_signals", set_loop_signals)  # noqa: B010

    def install_signal_handlers(self) -> None:
        """Start the grace period on SIGTERM and SIGINT. Call on the event loop, at start-up.

        With granian's stop trigger captured, the app's handlers replace granian's on the loop and the
        server's shutdown follows when live sessions are done (see the module docstring). Otherwise
        they are chained onto the server's own handlers, only in the main thread and only on top of a
        Python-level handler (the event loop's or the server's): where nothing handles a signal, its
        default action stays as it is.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        if self._server_stop is not None:
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
            self._loop_signals = _SIGNALS
            return
        if "granian" in sys.modules:
            log.warning(
                "shutdown.live_wind_down_unavailable",
                reason="granian's stop trigger was not captured: on SIGTERM it may cut live sessions at once",
            )
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin, f"received {signal.Signals(signum).name}")
                previous(signum, frame)

            signal.signal(sig, handler)
            self._previous[sig] = previous

    def _on_signal(self, sig: signal.Signals) -> None:
        self.begin(f"received {sig.name}")
        if self._stopping_server is None:
            self._stopping_server = asyncio.get_running_loop().create_task(self._stop_server())

    async def _stop_server(self) -> None:
        """Pull the server's stop trigger once nothing defers it, or when the grace period ends."""
        waits = {asyncio.ensure_future(self._undeferred.wait()), asyncio.ensure_future(self.expired.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self._deferring:
            log.warning("shutdown.live_sessions_cut", open=self._deferring, grace_seconds=self.grace_seconds)
        log.info("shutdown.server_stopping", seconds_left=round(self.seconds_left(), 3))
        assert self._server_stop is not None
        self._server_stop.set()

    def close(self) -> None:
        """Put the previous signal handlers back (granian's trigger, where it was taken) and drop the timer."""
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, previous)
        self._previous.clear()
        if self._loop_signals and self._server_stop is not None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                for sig in self._loop_signals:
                    loop.add_signal_handler(sig, self._server_stop.set)
        self._loop_signals = ()
        if self._stopping_server is not None and not self._stopping_server.done():
            self._stopping_server.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["ServerStop", "ServerStopping", "ShutdownGrace"]
