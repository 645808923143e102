"""Admission control: at most N transcriptions run at once, at most Q wait, FIFO, with a wait timeout.

A request past the queue bound, or one that waited too long, is refused with 429 and a `Retry-After`
estimated from recent service times. This keeps memory bounded under any burst: a refused request
costs a few bytes, never a decoded signal or an engine slot.

N is MAX_CONCURRENT_REQUESTS, or when that is 0 the capacity of the engine serving now
(`EngineDescription.max_concurrency`: vLLM's max_num_seqs, 1 for the CPU engine), set again each time an
engine starts serving (`follow_engine_capacity`). The `qwenasr_concurrency_limit` gauge shows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog

from qwenasr_appliance.engines.base import EngineDescription
from qwenasr_appliance.metrics import METRICS, Metrics

log = structlog.get_logger(__name__)


class Overloaded(Exception):
    """The server is at capacity; retry after `retry_after` seconds."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class AdmissionController:
    def __init__(
        self,
        *,
        max_concurrent: int,
        max_queue: int,
        queue_timeout: float,
        metrics: Metrics = METRICS,
    ) -> None:
        self._limit = max(1, max_concurrent)
        self._max_queue = max(0, max_queue)
        self._queue_timeout = queue_timeout
        self._metrics = metrics
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._avg_service_seconds = 1.0
        self._idle = asyncio.Event()
        self._idle.set()
        self._metrics.concurrency_limit.set(self._limit)

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def max_queue(self) -> int:
        return self._max_queue

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        """Change the concurrency (the engine changed); wakes waiters if slots opened. A lower limit
        lets the requests running now finish: new ones wait until fewer than `limit` run."""
        self._limit = max(1, limit)
        self._metrics.concurrency_limit.set(self._limit)
        self._wake()

    def retry_after(self) -> int:
        backlog = (self.queued + self._active) / self._limit
        return max(1, min(300, math.ceil(self._avg_service_seconds * max(1.0, backlog))))

    def _wake(self) -> None:
        while self._waiters and self._active < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._active += 1
                waiter.set_result(None)
        self._publish()

    async def wait_idle(self, within: float) -> bool:
        """Wait until nothing runs or waits; False if `within` seconds passed first."""
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _publish(self) -> None:
        if self._active or self._waiters:
            self._idle.clear()
        else:
            self._idle.set()
        self._metrics.in_flight.set(self._active)
        self._metrics.queued.set(len(self._waiters))

    def _reject(self, reason: str) -> Overloaded:
        self._metrics.rejected.labels(reason=reason).inc()
        return Overloaded(reason, self.retry_after())

    async def _acquire(self) -> float:
        started = time.perf_counter()
        if self._active < self._limit and not self._waiters:
            self._active += 1
            self._publish()
            return 0.0
        if len(self._waiters) >= self._max_queue:
            raise self._reject("queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=self._queue_timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if waiter.done() and not waiter.cancelled():
                # The slot was granted just as we gave up: hand it on.
                self._active -= 1
                self._wake()
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._publish()
            if isinstance(exc, TimeoutError):
                raise self._reject("queue_timeout") from None
            raise
        return time.perf_counter() - started

    def _release(self, service_seconds: float) -> None:
        self._active -= 1
        self._avg_service_seconds = 0.8 * self._avg_service_seconds + 0.2 * service_seconds
        self._wake()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one processing slot; yields the seconds spent waiting in the queue."""
        waited = await self._acquire()
        started = time.perf_counter()
        try:
            yield waited
        finally:
            self._release(time.perf_counter() - started)


def admission_limit(configured: int, description: EngineDescription | None) -> int:
    """Requests admitted at once: `configured` (MAX_CONCURRENT_REQUESTS) when above 0, else the
    engine's capacity (`description.max_concurrency`), at least 1; 1 when the engine gave none."""
    if configured > 0:
        return configured
    if description is None:
        return 1
    return max(1, description.max_concurrency)


def follow_engine_capacity(
    admission: AdmissionController, configured: int
) -> Callable[[EngineDescription | None], None]:
    """A serving listener (`EngineSupervisor.add_serving_listener`) that sets `admission`'s limit
    from each engine that starts serving: after the first load, a restart or a fallback to another
    plan, whose capacity may differ. Logs `admission.limit` with the limit and where it came from."""

    def on_serving(description: EngineDescription | None) -> None:
        limit = admission_limit(configured, description)
        source = "MAX_CONCURRENT_REQUESTS" if configured > 0 else "engine" if description else "default"
        log.info(
            "admission.limit",
            limit=limit,
            previous=admission.limit,
            source=source,
            engine_capacity=description.max_concurrency if description else None,
        )
        admission.set_limit(limit)

    return on_serving
