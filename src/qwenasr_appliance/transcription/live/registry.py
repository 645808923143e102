"""The open live sessions of the process: the `LIVE_MAX_SESSIONS` bound and the active-sessions gauge."""

from __future__ import annotations

from typing import Final

from qwenasr_appliance.config import Settings
from qwenasr_appliance.metrics import METRICS, Metrics
from qwenasr_appliance.transcription.live.decoder import LiveDecoder
from qwenasr_appliance.transcription.live.session import Emit, LiveSession

END_REASONS: Final = (
    "client_closed", "idle_timeout", "session_expired", "slow_consumer", "shutdown", "rejected", "error",
)  # fmt: skip
# Why a session was refused as it opened: the `error` code the client gets.
REJECT_REASONS: Final = ("session_limit_reached", "engine_unavailable", "server_shutting_down")


class SessionLimitReached(Exception):
    """`LIVE_MAX_SESSIONS` sessions are open already (or live sessions are off: the limit is 0)."""


class LiveSessions:
    def __init__(self, settings: Settings, decoder: LiveDecoder, *, metrics: Metrics = METRICS) -> None:
        self.settings = settings
        self.decoder = decoder
        self._metrics = metrics
        self._open: set[LiveSession] = set()
        metrics.live_sessions_limit.set(settings.live_max_sessions)

    @property
    def count(self) -> int:
        return len(self._open)

    def rejected(self, reason: str) -> None:
        """Count a session refused before it opened; `reason` is one of REJECT_REASONS."""
        self._metrics.live_sessions.labels(reason="rejected").inc()
        self._metrics.live_sessions_rejected.labels(reason=reason).inc()

    def open(self, emit: Emit) -> LiveSession:
        """A new session, counted; raises SessionLimitReached. Pair with `ended`."""
        if len(self._open) >= self.settings.live_max_sessions:
            self.rejected("session_limit_reached")
            raise SessionLimitReached
        session = LiveSession(decoder=self.decoder, settings=self.settings, emit=emit, metrics=self._metrics)
        self._open.add(session)
        self._metrics.live_sessions_active.set(len(self._open))
        return session

    async def ended(self, session: LiveSession, reason: str) -> None:
        """Stop the session's work and uncount it; `reason` is one of END_REASONS."""
        await session.close()
        if session in self._open:
            self._open.discard(session)
            self._metrics.live_sessions.labels(reason=reason if reason in END_REASONS else "error").inc()
            self._metrics.live_sessions_active.set(len(self._open))

    async def close_all(self) -> None:
        """Stop every session's work (server shutdown, after the WebSockets were given their grace)."""
        for session in list(self._open):
            await self.ended(session, "shutdown")
