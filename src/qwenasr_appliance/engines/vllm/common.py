"""What the vLLM ASR engine and the vLLM forced aligner share: the plan they read, the audio token count,
and the tap that keeps the tail of the engine core's output."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from qwenasr_appliance.engines.vllm.inputs import placeholder_tokens

LLMFactory = Callable[[dict[str, Any]], Any]  # engine kwargs -> vLLM's AsyncLLM (tests pass fakes)
ParamsFactory = Callable[[dict[str, Any]], Any]  # kwargs -> SamplingParams / PoolingParams


class PlanLike(Protocol):
    """What the engine reads of `supervisor.plans.Plan`."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def quantization(self) -> str | None: ...
    @property
    def gpu_memory_utilization(self) -> float | None: ...


def audio_tokens(seconds: float) -> int:
    """Audio placeholder tokens vLLM inserts for `seconds` of 16 kHz audio (hop 160: 100 frames/s)."""
    return placeholder_tokens(max(1, math.ceil(round(seconds * 100, 6))))  # round: 9.88 * 100 is 988.0000000000001


MAX_MODEL_LEN_STEP: Final = 1024
MODEL_MAX_POSITIONS: Final = 65536  # the released checkpoints' max_position_embeddings


def round_model_len(tokens: int) -> int:
    """A derived `max_model_len`: `tokens` rounded up to a multiple of 1024, at most the model's 65,536
    positions."""
    return min(MODEL_MAX_POSITIONS, math.ceil(tokens / MAX_MODEL_LEN_STEP) * MAX_MODEL_LEN_STEP)


class OutputTap:
    """Sends this process's stdout and stderr through pipes, forwarding everything and keeping the tail.

    vLLM's engine core is a child process: when it fails to start, its traceback only reaches its own
    stderr/stdout, which it inherits from this process. While the tap is on, children started meanwhile
    inherit the pipes, so their output is forwarded as before and its tail stays readable here for as
    long as they run (`text()`), also after `stop()` gave this process its own descriptors back.
    """

    def __init__(
        self,
        limit_bytes: int = 256 * 1024,
        fds: Iterable[int] = (1, 2),
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """`on_line` (optional) sees each line written meanwhile, on the tap's reader thread."""
        self._limit = limit_bytes
        self._on_line = on_line
        self._fds = tuple(fds)
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._saved: dict[int, int] = {}

    def start(self) -> None:
        self._flush()
        for fd in self._fds:
            try:
                os.fstat(fd)
                read_fd, write_fd = os.pipe()
            except OSError:
                continue
            saved = os.dup(fd)
            os.dup2(write_fd, fd)  # inheritable: children get the pipe as their stdout/stderr
            os.close(write_fd)
            self._saved[fd] = saved
            threading.Thread(
                target=self._pump, args=(read_fd, saved), name=f"vllm-output-tap-{fd}", daemon=True
            ).start()

    def stop(self) -> None:
        """Give this process its descriptors back; children keep writing through the tap."""
        self._flush()
        for fd, saved in self._saved.items():
            with contextlib.suppress(OSError):
                os.dup2(saved, fd)
        self._saved.clear()

    def text(self) -> str:
        with self._lock:
            return self._tail.decode("utf-8", "replace")

    def _pump(self, read_fd: int, out_fd: int) -> None:
        forward = True
        partial = b""
        try:
            while chunk := os.read(read_fd, 65536):
                if self._on_line is not None:
                    partial = self._lines(partial + chunk)
                with self._lock:
                    self._tail += chunk
                    if len(self._tail) > self._limit:
                        del self._tail[: len(self._tail) - self._limit]
                view = memoryview(chunk)
                while forward and view:
                    try:
                        view = view[os.write(out_fd, view) :]
                    except OSError:
                        forward = False  # keep draining the pipe so writers never block
        except OSError:
            pass
        finally:
            for fd in (read_fd, out_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _lines(self, data: bytes) -> bytes:
        """Hand each complete line (ended by a newline or a progress bar's carriage return) to `on_line`;
        return the incomplete rest."""
        *complete, rest = re.split(rb"[\r\n]", data)
        for line in complete:
            if line.strip():
                with contextlib.suppress(Exception):  # an observer must never stop the output
                    self._on_line(line.decode("utf-8", "replace"))  # type: ignore[misc]
        return rest[-65536:]

    @staticmethod
    def _flush() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
