"""Worker processes for CPU-heavy audio work (decoding, resampling, feature extraction).

Threads cannot run this work in parallel: decoders and numpy spend much of their time holding the
interpreter lock, which the serving process also needs for request handling and vLLM's frontend.
Measured on an H100 host (16 cores): with a thread pool, decoding 30 s mp3 clips took 3.6 s per
request at 64 concurrent requests. Processes scale with the cores instead.

The pool talks to its workers from the event loop itself: a task is pickled onto an idle worker's
pipe, and the loop reads the result when the pipe becomes readable. `concurrent.futures`'
ProcessPoolExecutor hands every task through several helper threads instead, each of which must win
the interpreter lock from vLLM's busy frontend threads. Pipes are widened to 1 MiB so that a 30 s clip
crosses in one write. Measured on 2 cores (`bench/worker_roundtrip.py`, docs/benchmarks.md), decoding a
30 s wav (2 ms of work) with N other threads of the server busy holding the lock: the server before
(ProcessPoolExecutor, result pickled back) 9 / 176 / 514 ms for N = 0 / 1 / 3, now 3 / 11-21 / 64-109 ms.

Replies are framed here (length, then a pickle) and read without blocking, a pipe's worth at a time:
the reply of 30 s of log-mel features is larger than the pipe, and uvloop (which granian uses where it is
installed, as it is beside vLLM) makes a watched descriptor non-blocking, so a reply can arrive in pieces.

A worker that dies (a decoder segfault on a hostile file, the OOM killer) fails only the task it was
running with `WorkerCrashedError` (carrying how it died), and a new worker takes its place. Every task
has a deadline (`job_timeout`): a worker still busy at its task's deadline (hung, or stopped with
SIGSTOP) is killed with SIGKILL and replaced, and the task fails with `WorkerTimeoutError`. `status()`
tells how many workers are idle, busy and stalled (stopped, or past a deadline), for readiness and
metrics; `on_replaced` counts each replacement by reason.

No worker outlives the server: each asks the kernel to SIGKILL it when the process that started it
dies (Linux `PR_SET_PDEATHSIG`, set before it takes any task, checked against a parent that died
first; the kernel sends it when the *thread* that started the worker ends, and workers are only
started from the event loop's thread, which lives as long as the server), and `close()` SIGKILLs every worker at once and reaps them on a helper thread, never waiting
on the event loop (workers stopped with SIGSTOP ignore SIGTERM; measured before: 5 s per worker on the
loop, and stopped workers survived the server with parent pid 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import multiprocessing
import os
import pickle
import signal
import struct
import sys
import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar, cast

import structlog

P = ParamSpec("P")
T = TypeVar("T")

log = structlog.get_logger(__name__)

_F_SETPIPE_SZ = 1031  # Linux fcntl
_PIPE_BYTES = 1 << 20  # the unprivileged maximum (/proc/sys/fs/pipe-max-size)
_LENGTH = struct.Struct("!Q")  # each reply: its pickle's length, then the pickle
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Longest time a new worker may take to import its libraries and say it is ready.
STARTUP_TIMEOUT_SECONDS: Final = 60.0
# Exit statuses of a process that crashed by itself (a decoder bug on the input), unlike SIGKILL (the
# OOM killer, an operator, a deadline) or SIGTERM.
CRASH_SIGNALS: Final = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})


class WorkerCrashedError(RuntimeError):
    """A worker process died while running a task (or the pool is shut down).

    `exitcode` is the process's (negative: killed by that signal), None when the pool was shut down."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode

    @property
    def crashed_by_itself(self) -> bool:
        """The worker died of its own fault (a segfault, an abort) rather than being killed."""
        return self.exitcode is not None and self.exitcode < 0 and -self.exitcode in CRASH_SIGNALS


class WorkerTimeoutError(TimeoutError):
    """A task ran past the pool's `job_timeout`; its worker was killed and replaced."""


@dataclass(frozen=True)
class PoolStatus:
    """A snapshot of a pool's workers. `stalled`: stopped (SIGSTOP) or busy past its task's deadline;
    `busy` counts the others that run a task; `starting`: not ready yet. `replaced` counts
    replacements by reason (died, timeout)."""

    name: str
    processes: int
    idle: int
    busy: int
    stalled: int
    starting: int
    replaced: dict[str, int]

    @property
    def usable(self) -> int:
        """Workers that take or run tasks now."""
        return self.idle + self.busy


_POOLS: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


def live_pools() -> list[WorkerPool]:
    """Every pool of this process that has started its workers and is not closed."""
    return [pool for pool in list(_POOLS) if pool.started and not pool.closed]


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


def _stopped(pid: int) -> bool:
    """The process is stopped (state T or t in /proc/PID/stat; Linux), e.g. by SIGSTOP."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"T", b"t")


def _widen(connection: Connection) -> None:
    """Let a pipe hold a whole 30 s clip (Linux; 64 KiB by default): every extra read or write is one
    more wait for the interpreter lock in the server."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(connection.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)


def _one_thread_each() -> None:
    """Keep a worker's numerical libraries to one thread: the pool already runs one worker per core.

    OpenBLAS otherwise spreads each matrix product (the mel filter bank of every chunk) over all cores: on
    a 16-core H100 host 16 feature workers ran up to 256 spinning threads and starved vLLM's engine core
    (30 s clips at 64 concurrent requests: throughput halved, engine time per request tripled)."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"  # for libraries loaded from now on
    import numpy  # noqa: F401 - loads OpenBLAS under the variables above
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # for any loaded before (a parent module imported numpy first)


def _serve(tasks: Connection, replies: Connection, parent: int) -> None:
    """A worker's main loop: run (fn, args, kwargs) messages until the pipe closes."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    _one_thread_each()
    fd = replies.fileno()
    os.set_blocking(fd, True)
    hello = pickle.dumps((True, None), protocol=pickle.HIGHEST_PROTOCOL)
    try:
        _write_all(fd, _LENGTH.pack(len(hello)), hello)  # ready: task deadlines start from here
    except OSError:
        return
    while True:
        try:
            fn, args, kwargs = tasks.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as exc:  # every failure goes back to the caller
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # the result or the exception does not pickle
            data = pickle.dumps((False, RuntimeError(f"a worker result could not be sent back: {exc!r}")))
        try:
            _write_all(fd, _LENGTH.pack(len(data)), data)
        except OSError:
            return


def _write_all(fd: int, *parts: bytes) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


@dataclass
class _Task:
    call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
    future: asyncio.Future[Any]
    cleanup: Callable[[Any], object] | None = None  # for a result nobody waits for any more


@dataclass
class _Worker:
    process: BaseProcess
    tasks: Connection  # the server writes
    replies: Connection  # the server reads
    task: _Task | None = None
    inbox: bytearray = field(default_factory=bytearray)  # the reply read so far
    started: bool = False  # it has said it is ready (before that it is importing its libraries)
    deadline: asyncio.TimerHandle | None = None  # of the running task, or of its start
    overdue: bool = False  # its task ran past the deadline (the worker is being killed)
    hello: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    fd: int = field(init=False)

    def __post_init__(self) -> None:
        self.fd = self.replies.fileno()


class WorkerPool:
    """`processes` worker processes named `name`; each task may run at most `job_timeout` seconds
    (None: no deadline); `on_replaced(reason)` is called when a worker is replaced ("died", "timeout")."""

    def __init__(
        self,
        processes: int,
        name: str,
        *,
        job_timeout: float | None = None,
        on_replaced: Callable[[str], object] | None = None,
    ) -> None:
        self.processes = max(1, processes)
        self.name = name
        self.job_timeout = job_timeout
        self._on_replaced = on_replaced
        self._context = multiprocessing.get_context("spawn")  # the server runs threads: never fork it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[_Worker] = []
        self._idle: deque[_Worker] = deque()
        self._pending: deque[_Task] = deque()
        self._closed = False
        self._replaced: Counter[str] = Counter()
        _POOLS.add(self)

    @property
    def started(self) -> bool:
        return bool(self._workers)

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> PoolStatus:
        idle = busy = stalled = starting = 0
        for worker in self._workers:
            if worker.overdue or _stopped(worker.process.pid or 0):
                stalled += 1
            elif not worker.started:
                starting += 1
            elif worker.task is not None:
                busy += 1
            else:
                idle += 1
        return PoolStatus(self.name, self.processes, idle, busy, stalled, starting, dict(self._replaced))

    async def warm_up(self) -> None:
        """Start every worker now rather than on the first requests, and wait until each is ready."""
        self._start()
        await asyncio.gather(*(worker.hello for worker in self._workers))

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.run_with_cleanup(None, fn, *args, **kwargs)

    async def run_with_cleanup(
        self, cleanup: Callable[[T], object] | None, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`run`, and `cleanup(result)` for a result that arrives after the caller was cancelled (a file
        the worker left in shared memory, say)."""
        if self._closed:
            raise WorkerCrashedError(f"the {self.name} workers are shut down")
        self._start()
        loop = asyncio.get_running_loop()
        task = _Task((fn, args, dict(kwargs)), loop.create_future(), cleanup)
        self._pending.append(task)
        self._dispatch()
        try:
            return cast(T, await task.future)
        finally:
            if not task.future.done():  # cancelled while queued or running: never start it, ignore its result
                task.future.cancel()
                if task in self._pending:
                    self._pending.remove(task)

    def close(self) -> None:
        """Stop the workers now (the server has drained: nothing of value runs in them): SIGKILL each
        (a stopped or hung worker ignores SIGTERM) and reap them on a helper thread, so the event loop
        never waits. Returns at once; `join_closed` waits for the reaping."""
        self._closed = True
        workers, self._workers = self._workers, []
        self._idle.clear()
        for worker in workers:
            self._forget(worker)
            if not worker.hello.done():
                worker.hello.set_exception(WorkerCrashedError(f"the {self.name} workers are shut down"))
                worker.hello.exception()  # retrieved: nobody may be waiting for it
            if worker.task is not None and not worker.task.future.done():
                worker.task.future.set_exception(WorkerCrashedError(f"the {self.name} workers are shut down"))
        while self._pending:
            task = self._pending.popleft()
            if not task.future.done():
                task.future.set_exception(WorkerCrashedError(f"the {self.name} workers are shut down"))
        for worker in workers:
            _kill(worker.process)
        self._reaper = _reap([worker.process for worker in workers])

    def join_closed(self, timeout: float) -> bool:
        """Wait (blocking: call it off the event loop) until the closed pool's workers are reaped."""
        reaper = getattr(self, "_reaper", None)
        if reaper is None:
            return True
        reaper.join(timeout)
        return not reaper.is_alive()

    # ------------------------------------------------------------------ internals (event loop thread)

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._workers:
                raise RuntimeError(f"the {self.name} worker pool is bound to another event loop")
            self._loop = loop
        while len(self._workers) < self.processes:
            self._spawn()

    def _spawn(self) -> None:
        assert self._loop is not None
        task_reader, task_writer = self._context.Pipe(duplex=False)
        reply_reader, reply_writer = self._context.Pipe(duplex=False)
        for end in (task_writer, reply_writer):
            _widen(end)
        os.set_blocking(reply_reader.fileno(), False)  # read as it comes (uvloop would do this anyway)
        process = self._context.Process(
            target=_serve,
            args=(task_reader, reply_writer, os.getpid()),
            name=f"qwenasr-{self.name}-worker",
            daemon=True,
        )
        process.start()
        task_reader.close()
        reply_writer.close()
        worker = _Worker(process, task_writer, reply_reader)
        self._workers.append(worker)
        self._loop.add_reader(worker.fd, self._on_readable, worker)
        worker.deadline = self._loop.call_later(STARTUP_TIMEOUT_SECONDS, self._overdue, worker, None)

    def _dispatch(self) -> None:
        while self._idle and self._pending:
            task = self._pending.popleft()
            if task.future.done():
                continue
            worker = self._idle.popleft()
            try:
                worker.tasks.send(task.call)
            except (OSError, EOFError):  # the worker is gone; its reader reports it
                self._pending.appendleft(task)
                continue
            except Exception as exc:  # the arguments do not pickle: the caller's error
                self._idle.appendleft(worker)
                task.future.set_exception(exc)
                continue
            worker.task = task
            if self.job_timeout is not None and self._loop is not None:
                worker.deadline = self._loop.call_later(self.job_timeout, self._overdue, worker, task)

    def _overdue(self, worker: _Worker, task: _Task | None) -> None:
        """The task's deadline (or, for `task` None, the start-up's) passed with the worker still on it:
        kill the worker, fail the task, and start another worker. This does not wait for the kill."""
        if worker.task is not task or worker not in self._workers:
            return
        worker.overdue = True
        if task is None:
            log.error("workers.start_timeout", pool=self.name, pid=worker.process.pid)
            self._retire(worker, "timeout")
            return
        log.error("workers.job_timeout", pool=self.name, pid=worker.process.pid, timeout_seconds=self.job_timeout)
        if not task.future.done():
            task.future.set_exception(
                WorkerTimeoutError(f"a {self.name} worker took longer than {self.job_timeout:g} s; it was replaced")
            )
        self._retire(worker, "timeout")

    def _on_readable(self, worker: _Worker) -> None:
        try:
            chunk = os.read(worker.fd, _PIPE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the worker is gone
            self._replace(worker)
            return
        worker.inbox += chunk
        reply = _take_reply(worker.inbox)
        if reply is None:
            return
        ok, payload = reply
        task, worker.task = worker.task, None
        if worker.deadline is not None:
            worker.deadline.cancel()
            worker.deadline = None
        if not worker.started:  # its hello: ready for tasks
            worker.started = True
            if not worker.hello.done():
                worker.hello.set_result(None)
            self._idle.append(worker)
            self._dispatch()
            return
        if task is not None and not task.future.done():
            if ok:
                task.future.set_result(payload)
            else:
                task.future.set_exception(payload)
        elif task is not None and ok and task.cleanup is not None:
            try:
                task.cleanup(payload)
            except Exception as exc:
                # The type only: the message of a failed cleanup may hold a path or data.
                log.error("workers.cleanup_failed", pool=self.name, error_type=type(exc).__qualname__)
        self._idle.append(worker)
        self._dispatch()

    def _replace(self, worker: _Worker) -> None:
        """The worker died: fail its task, start another in its place."""
        if worker not in self._workers:
            return
        task = worker.task
        reaped = self._retire(worker, "died")
        if self._loop is not None:
            # Its pipe closed as it exited; how it died is known once it is reaped (off the event loop).
            self._loop.create_task(self._report_death(worker.process, reaped, task))

    async def _report_death(self, process: BaseProcess, reaped: threading.Thread, task: _Task | None) -> None:
        await asyncio.to_thread(reaped.join, 5)
        exitcode = process.exitcode
        log.error("workers.crashed", pool=self.name, pid=process.pid, exitcode=exitcode)
        if task is not None and not task.future.done():
            task.future.set_exception(
                WorkerCrashedError(f"a {self.name} worker process died ({_how(exitcode)})", exitcode)
            )

    def _retire(self, worker: _Worker, reason: str) -> threading.Thread:
        """Take `worker` out of the pool (killing it if it still runs) and start another; returns the
        thread that reaps it."""
        self._forget(worker)
        if worker.deadline is not None:
            worker.deadline.cancel()
            worker.deadline = None
        worker.task = None
        if not worker.hello.done():
            worker.hello.set_exception(WorkerCrashedError(f"a {self.name} worker did not start ({reason})"))
            worker.hello.exception()  # retrieved: nobody may be waiting for it
        if worker in self._workers:
            self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        if reason != "died":  # a dead worker's exit status must stay its own, not our SIGKILL
            _kill(worker.process)
        reaper = _reap([worker.process])
        self._replaced[reason] += 1
        if self._on_replaced is not None:
            self._on_replaced(reason)
        if not self._closed:
            self._spawn()
            self._dispatch()
        return reaper

    def _forget(self, worker: _Worker) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(worker.fd)
        worker.tasks.close()
        worker.replies.close()


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


def _kill(process: BaseProcess) -> None:
    if process.pid is not None and process.exitcode is None:
        with contextlib.suppress(OSError, ValueError):
            process.kill()


def _reap(processes: list[BaseProcess]) -> threading.Thread:
    """Wait for killed processes on a helper thread (no zombies, and the event loop never blocks)."""

    def join_all() -> None:
        for process in processes:
            with contextlib.suppress(ValueError, AssertionError):
                process.join(timeout=10)

    thread = threading.Thread(target=join_all, name="qwenasr-worker-reaper", daemon=True)
    thread.start()
    return thread


def _take_reply(inbox: bytearray) -> tuple[bool, Any] | None:
    """The first whole reply in `inbox` (removed from it), or None while it is still arriving."""
    if len(inbox) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack_from(inbox)
    end = _LENGTH.size + size
    if len(inbox) < end:
        return None
    body = memoryview(inbox)[_LENGTH.size : end]
    try:
        reply = cast(tuple[bool, Any], pickle.loads(body))  # noqa: S301 - our own worker's reply
    except Exception as exc:  # a reply that does not unpickle here
        reply = (False, RuntimeError(f"a worker result could not be read: {exc!r}"))
    finally:
        body.release()
    del inbox[:end]
    return reply
