"""What GPUs this process can use, and how much of their memory is free, read through NVML.

NVML counts every GPU of the host (or of the container); CUDA, and so vLLM, sees only those named by
`CUDA_VISIBLE_DEVICES` (indices or UUIDs, in that order). The probe applies the same filter so the
plans are made for the GPU vLLM will actually use: the first one it returns.

The probe never raises. When it finds no GPU it says why, in one of two fields: `no_gpu` when this
host plainly has none to use (no NVIDIA driver or NVML library, NVML lists no device,
CUDA_VISIBLE_DEVICES hides them all), which is no error on a CPU host; `error` when NVML is there
but fails (initialisation, queries, unreadable devices), which on a GPU host is a fault to look into.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

VramProbeFn = Callable[[], "VramProbe"]

_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it. `index` is NVML's index (`nvidia-smi`'s), not the CUDA ordinal."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    uuid: str = ""
    compute_capability: tuple[int, int] | None = None

    @property
    def supports_bfloat16(self) -> bool:
        """Ampere (compute capability 8.0) and later; assumed when NVML did not say."""
        return self.compute_capability is None or self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class VramProbe:
    """The GPUs visible to CUDA, in CUDA order. An empty result is explained by `no_gpu` (the host has
    no GPU to use: not an error) or by `error` (NVML failed)."""

    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None
    no_gpu: str | None = None

    @property
    def first(self) -> GpuInfo | None:
        return self.gpus[0] if self.gpus else None

    @property
    def why_none(self) -> str | None:
        """Why no GPU was found (the error first), None when one was or nothing was said."""
        return self.error or self.no_gpu


def probe_vram(environ: Mapping[str, str] | None = None) -> VramProbe:
    """Read the visible GPUs and their memory through NVML; never raises."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return VramProbe(no_gpu="no GPU visible: CUDA_VISIBLE_DEVICES is empty")
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError as exc:
        return VramProbe(
            no_gpu=f"no NVIDIA GPU support installed: the nvidia-ml-py bindings cannot be imported ({exc})"
        )
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return _init_failure(exc)
    try:
        return _read_devices(nvml, visible)
    except Exception as exc:
        return VramProbe(error=f"NVML query failed: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(Exception):  # nothing useful to do when shutdown itself fails
            nvml.nvmlShutdown()


def _init_failure(exc: Exception) -> VramProbe:
    """No GPU when NVML finds no NVIDIA driver to talk to (what every CPU host answers); an error otherwise."""
    code = getattr(exc, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND:
        return VramProbe(
            no_gpu=f"no NVIDIA driver on this host: NVML library not found ({exc}); on a GPU host, run the "
            "container with the NVIDIA container runtime"
        )
    if code == _NVML_ERROR_DRIVER_NOT_LOADED:
        return VramProbe(no_gpu=f"no NVIDIA driver loaded on this host ({exc})")
    return VramProbe(error=f"NVML initialisation failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class _Device:
    index: int
    handle: Any
    uuid: str


def _read_devices(nvml: Any, visible: str | None) -> VramProbe:
    count = int(nvml.nvmlDeviceGetCount())
    if count == 0:
        return VramProbe(no_gpu="no GPU visible: NVML reports no devices")
    devices = [
        _Device(index, handle, _text(nvml.nvmlDeviceGetUUID(handle)))
        for index, handle in ((i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count))
    ]
    selected = devices if visible is None else _select(nvml, visible, devices)
    if not selected:
        # Hidden on purpose (`-1`) or by mistake: CUDA sees none either way, and NVML worked.
        return VramProbe(no_gpu=f"no GPU visible: CUDA_VISIBLE_DEVICES={visible!r} names none of the {count} GPUs")
    gpus: list[GpuInfo] = []
    problems: list[str] = []
    for device in selected:
        try:
            gpus.append(_read_gpu(nvml, device))
        except Exception as exc:
            problems.append(f"GPU {device.index}: {type(exc).__name__}: {exc}")
    if not gpus:
        return VramProbe(error="no GPU visible: NVML could not read any of them (" + "; ".join(problems) + ")")
    return VramProbe(gpus=tuple(gpus))


def _select(nvml: Any, visible: str, devices: list[_Device]) -> list[_Device]:
    """The devices CUDA_VISIBLE_DEVICES names, in its order. Like CUDA, parsing stops at the first entry
    that names no device."""
    selected: list[_Device] = []
    for raw in visible.split(","):
        device = _resolve(nvml, raw.strip(), devices)
        if device is None:
            break
        if device.uuid not in {chosen.uuid for chosen in selected}:
            selected.append(device)
    return selected


def _resolve(nvml: Any, entry: str, devices: list[_Device]) -> _Device | None:
    if entry.lstrip("+-").isdigit():
        number = int(entry)
        return devices[number] if 0 <= number < len(devices) else None
    if entry.upper().startswith("GPU-"):
        # CUDA accepts any unique prefix of a UUID.
        matches = [device for device in devices if device.uuid.lower().startswith(entry.lower())]
        return matches[0] if len(matches) == 1 else None
    if entry.upper().startswith("MIG-"):
        # A MIG instance: NVML reads its own memory through its handle; its index is its parent's.
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(entry)
            parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            return _Device(int(nvml.nvmlDeviceGetIndex(parent)), handle, entry)
        except Exception:
            return None
    return None


def _read_gpu(nvml: Any, device: _Device) -> GpuInfo:
    handle = device.handle
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability: tuple[int, int] | None = (int(major), int(minor))
    except Exception:
        capability = None
    return GpuInfo(
        index=device.index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        free_bytes=int(memory.free),
        used_bytes=int(memory.used),
        uuid=device.uuid,
        compute_capability=capability,
    )


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def used_vram_bytes() -> int | None:
    """Bytes in use on the first visible GPU, None without one (NVML; blocks: call it off the event loop)."""
    gpu = probe_vram().first
    return gpu.used_bytes if gpu else None


def gpu_name() -> str:
    """The first visible GPU's name, "" without one (NVML; blocks: call it off the event loop)."""
    gpu = probe_vram().first
    return gpu.name if gpu else ""
