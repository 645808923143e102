"""Worker processes for CPU-heavy audio work (decoding, resampling, feature extraction).

Threads cannot run this work in parallel: decoders and numpy spend much of their time holding the
interpreter lock, which the serving process also needs for request handling and vLLM's frontend.
Measured on an H100 host (16 cores): with a thread pool, decoding 30 s mp3 clips took 3.6 s per
request at 64 concurrent requests. Processes scale with the cores instead.

A worker that crashes (a decoder segfault on a hostile file) breaks a `ProcessPoolExecutor`; the pool
is then replaced and only the request that hit it fails.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import ParamSpec, TypeVar

import structlog

P = ParamSpec("P")
T = TypeVar("T")

log = structlog.get_logger(__name__)


class WorkerCrashedError(RuntimeError):
    """A worker process died while running a task."""


def _ready() -> int:
    return os.getpid()


class WorkerPool:
    def __init__(self, processes: int, name: str) -> None:
        self.processes = max(1, processes)
        self.name = name
        self._pool = self._new_pool()
        self._closed = False

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: the serving process runs threads (event loop, vLLM) that must not be forked.
        return ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))

    async def warm_up(self) -> None:
        """Start every worker now rather than on the first requests."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _ready) for _ in range(self.processes)))

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            raise WorkerCrashedError(f"the {self.name} workers are shut down")
        pool = self._pool
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))
        except BrokenProcessPool as exc:
            if pool is self._pool and not self._closed:
                log.error("workers.crashed", pool=self.name, error=str(exc))
                self._pool = self._new_pool()
                _stop(pool)
            raise WorkerCrashedError(f"a {self.name} worker process died") from exc

    def close(self) -> None:
        """Stop the workers now (the server has drained: nothing of value runs in them)."""
        self._closed = True
        _stop(self._pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    # `shutdown(wait=False)` alone can leave the interpreter hanging at exit when workers are still
    # starting (seen when a server is stopped right after start-up): end the processes explicitly.
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
