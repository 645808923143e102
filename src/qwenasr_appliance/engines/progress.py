"""Where a model load stands: the current step, as `/status` shows it while the engine loads.

The loading code (the supervisor's model resolution, an engine's `load`, a thread reading vLLM's output)
calls `enter` at each step; `/status` reads `reading()` from the event loop. Steps, in load order:
`resolving_model` (finding the checkpoint: local directory, cache or hub), `downloading` (with bytes
done and total), `starting_engine`, `loading_weights`, `compiling`, `capturing_cuda_graphs`,
`warming_up`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog

LoadStep = Literal[
    "resolving_model",
    "downloading",
    "importing_libraries",
    "starting_engine",
    "loading_weights",
    "compiling",
    "capturing_cuda_graphs",
    "warming_up",
]

logger = structlog.get_logger()


@dataclass(frozen=True)
class StepReading:
    """One look at the current step: `since` is when it began (UTC), bytes only while downloading."""

    step: LoadStep
    detail: str | None
    since: datetime
    seconds: float
    bytes_done: int | None
    bytes_total: int | None


class LoadProgress:
    """The current load step; thread-safe (written by loading threads, read by the event loop)."""

    def __init__(self, what: str = "engine") -> None:
        self._what = what
        self._lock = threading.Lock()
        self._step: LoadStep | None = None
        self._detail: str | None = None
        self._since = datetime.now(UTC)
        self._began = time.monotonic()
        self._bytes_done: int | None = None
        self._bytes_total: int | None = None

    @property
    def step(self) -> LoadStep | None:
        return self._step

    def enter(self, step: LoadStep, detail: str | None = None, *, bytes_total: int | None = None) -> None:
        """Begin `step` (logged as `<what>.load.step`); entering the current step again only updates the detail."""
        with self._lock:
            changed = step != self._step
            self._step, self._detail = step, detail
            if changed:
                self._since, self._began = datetime.now(UTC), time.monotonic()
                self._bytes_done = 0 if bytes_total is not None else None
                self._bytes_total = bytes_total
        if changed:
            logger.info(f"{self._what}.load.step", step=step, detail=detail, bytes_total=bytes_total)

    def advance(self, bytes_done: int) -> None:
        """Bytes of the current download done so far."""
        with self._lock:
            self._bytes_done = bytes_done

    def clear(self) -> None:
        with self._lock:
            self._step = None

    def reading(self) -> StepReading | None:
        with self._lock:
            if self._step is None:
                return None
            return StepReading(
                step=self._step,
                detail=self._detail,
                since=self._since,
                seconds=round(time.monotonic() - self._began, 3),
                bytes_done=self._bytes_done,
                bytes_total=self._bytes_total,
            )
