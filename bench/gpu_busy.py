"""GPU kernel-busy % during a benchmark run, sampled through NVML in a background thread.

`GpuBusySampler` polls, for every GPU the servers can see, `nvmlDeviceGetUtilizationRates(handle).gpu`
(the percent of the driver's last sample period, 1/6 s to 1 s depending on the product, in which at
least one kernel ran: `nvidia-smi dmon`'s `sm` column) and `nvmlDeviceGetMemoryInfo(handle).used`,
every `interval` seconds (default 0.1 s) from `start()` to `stop()`, plus once more at `stop()`.
Polling faster than the driver's period repeats its value, which weights each period by time, as a
mean over the run should.

Why polling and not `nvmlDeviceGetSamples(NVML_GPU_UTILIZATION_SAMPLES)`, the driver's own finer
buffer: that buffer holds no samples while the GPU is idle (the call answers NVML_ERROR_NOT_FOUND), so
a mean over its samples leaves out exactly the idle time the benchmark is looking for.

The GPUs are those CUDA (and so vLLM) uses: `CUDA_VISIBLE_DEVICES` read as CUDA reads it (NVML indices
or unique `GPU-` UUID prefixes, in that order, up to the first entry that names no GPU), as
`qwenasr_appliance.supervisor.probe` does; the servers `run_all.py` starts inherit the same variable.
That module is not imported: its package pulls in the app, which the benchmark process may not have.
NVML gives no kernel-busy % per MIG instance, so a MIG entry makes the record "not available".

The sampler never raises and never makes up a number: without NVML (a CPU machine, `--dry-run`) the
record is `{"available": False, "reason": ...}`; a GPU whose reads fail during the run keeps the
samples it had, and its `error` says what failed after how many samples.

Record (`stop()`; JSON, stored in `results.json` as `gpu_busy`):

    available           bool; False: `reason` says why, no other numbers
    method, interval_seconds, seconds    what was polled, how often, and for how long (wall seconds)
    cuda_visible_devices                 the variable as read (None: unset, every GPU)
    gpus                [{index (NVML's), uuid, name, samples, busy_mean, busy_p50 (percent),
                          busy_zero_share (share of samples at 0 %), memory_used_mib_mean,
                          memory_used_mib_max, memory_total_mib (MiB = 2**20 bytes), error}]
    busy_mean           mean of the GPUs' busy_mean (percent)
    error               the GPUs' errors joined, None when every read succeeded
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

DEFAULT_INTERVAL_SECONDS: Final = 0.1
METHOD: Final = "NVML nvmlDeviceGetUtilizationRates().gpu, polled"
MIB: Final = 2**20

_NVML_ERROR_DRIVER_NOT_LOADED: Final = 9
_NVML_ERROR_LIBRARY_NOT_FOUND: Final = 12

GpuBusyRecord = dict[str, Any]


def unavailable(reason: str, visible: str | None = None) -> GpuBusyRecord:
    """The record of a run without GPU busy numbers."""
    return {"available": False, "reason": reason, "cuda_visible_devices": visible}


@dataclass
class _Gpu:
    index: int
    uuid: str
    name: str
    handle: Any
    total_bytes: int | None = None
    busy: list[float] = field(default_factory=list)  # percent
    used_bytes: list[int] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        count = len(self.busy)
        return {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "samples": count,
            "busy_mean": round(statistics.fmean(self.busy), 1) if count else None,
            "busy_p50": round(statistics.median(self.busy), 1) if count else None,
            "busy_zero_share": round(sum(1 for b in self.busy if b <= 0.0) / count, 3) if count else None,
            "memory_used_mib_mean": round(statistics.fmean(self.used_bytes) / MIB) if count else None,
            "memory_used_mib_max": round(max(self.used_bytes) / MIB) if count else None,
            "memory_total_mib": round(self.total_bytes / MIB) if self.total_bytes is not None else None,
            "error": self.error,
        }


class GpuBusySampler:
    """Polls every visible GPU's kernel-busy % and memory in a daemon thread between `start` and `stop`.

    `nvml` replaces the `pynvml` module (tests); `environ` replaces `os.environ` (only
    `CUDA_VISIBLE_DEVICES` is read). Usable once: `start()`, then `stop()` returns the record.
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        *,
        environ: Mapping[str, str] | None = None,
        nvml: Any = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive (seconds)")
        self.interval = interval
        self._environ = os.environ if environ is None else environ
        self._nvml = nvml
        self._gpus: list[_Gpu] = []
        self._reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started: float | None = None
        self._opened = False  # nvmlInit succeeded and nvmlShutdown is still due
        self._record: GpuBusyRecord | None = None

    @property
    def visible(self) -> str | None:
        return self._environ.get("CUDA_VISIBLE_DEVICES")

    def start(self) -> None:
        """Open NVML and find the GPUs (before the run's clock starts: this may take a fraction of a
        second), then poll in the background."""
        if self._started is not None:
            raise RuntimeError("a GpuBusySampler samples one run: make a new one")
        self._started = time.perf_counter()
        self._reason = self._open()
        if self._reason is None:
            self._thread = threading.Thread(target=self._poll_until_stopped, name="gpu-busy", daemon=True)
            self._thread.start()

    def stop(self) -> GpuBusyRecord:
        """Stop polling (one last poll first) and summarize; calling it again returns the same record."""
        if self._record is not None:
            return self._record
        if self._started is None:
            self._record = unavailable("the sampler was never started", self.visible)
            return self._record
        seconds = time.perf_counter() - self._started
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._reason is not None:
            self._record = unavailable(self._reason, self.visible)
        else:
            self._record = self._summarize(seconds)
        if self._opened:
            self._opened = False
            with contextlib.suppress(Exception):  # nothing useful to do when shutdown itself fails
                self._module().nvmlShutdown()
        return self._record

    def __enter__(self) -> GpuBusySampler:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- NVML ----------------------------------------------------------------------------------------

    def _module(self) -> Any:
        if self._nvml is None:
            self._nvml = importlib.import_module("pynvml")
        return self._nvml

    def _open(self) -> str | None:
        """Find the GPUs to poll; the reason there are none, or None."""
        visible = self.visible
        if visible is not None and not visible.strip():
            return "no GPU visible: CUDA_VISIBLE_DEVICES is empty"
        try:
            nvml = self._module()
        except ImportError as exc:
            return f"NVML not available: the nvidia-ml-py bindings cannot be imported ({exc})"
        try:
            nvml.nvmlInit()
        except Exception as exc:
            return _describe_init_error(exc)
        self._opened = True
        try:
            reason = self._find_gpus(nvml, visible)
        except Exception as exc:
            reason = f"NVML query failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            self._gpus = []
        return reason

    def _find_gpus(self, nvml: Any, visible: str | None) -> str | None:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            return "no GPU visible: NVML reports no devices"
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [_text(nvml.nvmlDeviceGetUUID(handle)) for handle in handles]
        if visible is None:
            chosen = list(range(count))
        else:
            chosen = []
            for raw in visible.split(","):
                entry = raw.strip()
                if entry.upper().startswith("MIG-"):
                    return f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}): NVML has no kernel-busy % per MIG instance"
                index = _resolve(entry, uuids)
                if index is None:
                    break  # CUDA ignores this entry and every one after it
                if index not in chosen:
                    chosen.append(index)
            if not chosen:
                return f"no GPU visible: CUDA_VISIBLE_DEVICES={visible!r} names none of the {count} GPUs"
        for index in chosen:
            handle = handles[index]
            gpu = _Gpu(index=index, uuid=uuids[index], name=_text(nvml.nvmlDeviceGetName(handle)), handle=handle)
            with contextlib.suppress(Exception):  # the total is a label; the samples carry their own errors
                gpu.total_bytes = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
            self._gpus.append(gpu)
        return None

    def _poll_until_stopped(self) -> None:
        nvml = self._module()
        while not self._stop.wait(self.interval):
            self._poll(nvml)
        self._poll(nvml)

    def _poll(self, nvml: Any) -> None:
        for gpu in self._gpus:
            if gpu.error is not None:
                continue
            try:
                busy = float(nvml.nvmlDeviceGetUtilizationRates(gpu.handle).gpu)
                used = int(nvml.nvmlDeviceGetMemoryInfo(gpu.handle).used)
            except Exception as exc:
                # A GPU that failed once (fallen off the bus, driver reset) is not read again: what it
                # had stays, marked, and nothing is filled in for the rest of the run.
                gpu.error = f"GPU {gpu.index}: {type(exc).__name__}: {exc} (after {len(gpu.busy)} samples)"
                continue
            gpu.busy.append(busy)
            gpu.used_bytes.append(used)

    def _summarize(self, seconds: float) -> GpuBusyRecord:
        gpus = [gpu.summary() for gpu in self._gpus]
        errors = [gpu.error for gpu in self._gpus if gpu.error]
        measured = [g["busy_mean"] for g in gpus if g["busy_mean"] is not None]
        if not measured:
            return unavailable("no sample read: " + ("; ".join(errors) or "the run ended first"), self.visible)
        return {
            "available": True,
            "method": METHOD,
            "interval_seconds": self.interval,
            "seconds": round(seconds, 3),
            "cuda_visible_devices": self.visible,
            "gpus": gpus,
            "busy_mean": round(statistics.fmean(measured), 1),
            "error": "; ".join(errors) or None,
        }


def _resolve(entry: str, uuids: list[str]) -> int | None:
    """The NVML index an entry of CUDA_VISIBLE_DEVICES names, or None."""
    if entry.lstrip("+-").isdigit():
        number = int(entry)
        return number if 0 <= number < len(uuids) else None
    if entry.upper().startswith("GPU-"):
        # CUDA accepts any unique prefix of a UUID.
        matches = [i for i, uuid in enumerate(uuids) if uuid.lower().startswith(entry.lower())]
        return matches[0] if len(matches) == 1 else None
    return None


def _describe_init_error(exc: Exception) -> str:
    code = getattr(exc, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND:
        return f"NVML library not found ({exc}): no NVIDIA driver on this machine"
    if code == _NVML_ERROR_DRIVER_NOT_LOADED:
        return f"no NVIDIA driver loaded ({exc})"
    return f"NVML initialisation failed: {type(exc).__name__}: {exc}"


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def gpu_count(record: GpuBusyRecord | None) -> int | None:
    """How many GPUs a record covers (those the servers could use); None when it is not available."""
    if not record or not record.get("available"):
        return None
    return len(record.get("gpus") or [])


def main(argv: Sequence[str] | None = None) -> int:
    """By hand, next to a load: `python -m bench.gpu_busy 10` samples 10 s and prints the record."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seconds", type=float, nargs="?", default=5.0, help="how long to sample")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_SECONDS, help="seconds between polls")
    args = parser.parse_args(argv)
    with GpuBusySampler(args.interval) as sampler:
        time.sleep(args.seconds)
    print(json.dumps(sampler.stop(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
