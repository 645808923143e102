"""Graceful shutdown: in-flight requests get SHUTDOWN_GRACE_SECONDS, then a clear 503, never a cut.

What granian (2.8) does on SIGTERM: it closes the listening socket at once (new connections are
refused), closes idle keep-alive connections, lets every request in flight finish, and only then runs
the ASGI lifespan shutdown. Its main process kills the worker `workers_kill_timeout` seconds after the
signal. A request still running at that point would be cut off without a response, and the engine
would never be closed cleanly.

So the app watches the signal too: the grace period starts when it arrives, and when it ends every
transcription still running or waiting gets 503 `server_shutting_down` with `Retry-After` (the route
races its work against `ShutdownGrace.expired`). granian's drain then completes, the lifespan
shutdown closes the engine, and the process exits 0 before the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ServerStopping(Exception):
    """The shutdown grace period ended before the response was ready."""


class ShutdownGrace:
    """The shutdown deadline: `expired` is set `grace_seconds` after `begin()`."""

    def __init__(self, grace_seconds: float) -> None:
        self.grace_seconds = grace_seconds
        self.expired = asyncio.Event()
        self.began = asyncio.Event()  # set by begin(): long-lived connections (live sessions) wind down
        self._timer: asyncio.TimerHandle | None = None
        self._began = False
        self._previous: dict[int, Any] = {}

    @property
    def draining(self) -> bool:
        return self._began

    def begin(self, reason: str) -> None:
        """Start the grace period (once; later calls change nothing). Call on the event loop."""
        if self._began:
            return
        self._began = True
        self.began.set()
        log.info("shutdown.draining", reason=reason, grace_seconds=self.grace_seconds)
        self._timer = asyncio.get_running_loop().call_later(self.grace_seconds, self._expire)

    def _expire(self) -> None:
        log.warning("shutdown.grace_expired", grace_seconds=self.grace_seconds)
        self.expired.set()

    def install_signal_handlers(self) -> None:
        """Also start the grace period on SIGTERM and SIGINT, keeping the server's own handlers.

        Only in the main thread and only on top of a Python-level handler (the event loop's or the
        server's): where nothing handles a signal, its default action stays as it is.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for sig in _SIGNALS:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                loop.call_soon_threadsafe(self.begin, f"received {signal.Signals(signum).name}")
                previous(signum, frame)

            signal.signal(sig, handler)
            self._previous[sig] = previous

    def close(self) -> None:
        """Put the previous signal handlers back and drop the timer."""
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, previous)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["ServerStopping", "ShutdownGrace"]
