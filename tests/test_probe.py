"""The VRAM probe, against a fake `pynvml` module (no GPU or driver on the test machine)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from qwenasr_appliance.supervisor.probe import GpuInfo, VramProbe, probe_vram

GIB = 1024**3


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    name: str | bytes
    uuid: str
    total: int
    free: int
    capability: tuple[int, int] = (9, 0)


@dataclass
class FakeNVML:
    """What the probe uses of pynvml, with calls recorded."""

    gpus: list[FakeGpu]
    init_error: int | None = None
    memory_error_on: int | None = None
    mig: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # uuid -> (parent, total, free)
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(module, name, getattr(self, name))
        return module

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return ("gpu", index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        if uuid not in self.mig:
            raise FakeNVMLError(6)
        return ("mig", uuid)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> Any:
        return ("gpu", self.mig[handle[1]][0])

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return int(handle[1])

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self.gpus[handle[1]].uuid

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        if handle[0] == "mig":
            return "MIG 3g.40gb"
        return self.gpus[handle[1]].name

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        if handle[0] == "mig":
            _parent, total, free = self.mig[handle[1]]
        else:
            if handle[1] == self.memory_error_on:
                raise FakeNVMLError(15)
            total, free = self.gpus[handle[1]].total, self.gpus[handle[1]].free
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        if handle[0] == "mig":
            raise FakeNVMLError(3)
        return self.gpus[handle[1]].capability


def two_gpus() -> FakeNVML:
    return FakeNVML(
        [
            FakeGpu(b"NVIDIA H100 80GB HBM3", "GPU-aaaa1111", 80 * GIB, 79 * GIB),
            FakeGpu("Tesla T4", "GPU-bbbb2222", 16 * GIB, 10 * GIB, (7, 5)),
        ]
    )


def run_probe(monkeypatch: pytest.MonkeyPatch, nvml: FakeNVML, environ: dict[str, str] | None = None) -> VramProbe:
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
    return probe_vram(environ or {})


def test_all_gpus_when_cuda_visible_devices_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus()
    probe = run_probe(monkeypatch, nvml)
    assert probe.error is None
    assert probe.gpus == (
        GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, 1 * GIB, "GPU-aaaa1111", (9, 0)),
        GpuInfo(1, "Tesla T4", 16 * GIB, 10 * GIB, 6 * GIB, "GPU-bbbb2222", (7, 5)),
    )
    assert probe.first is probe.gpus[0]
    assert probe.gpus[0].supports_bfloat16 and not probe.gpus[1].supports_bfloat16
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("1", [1]),
        ("1,0", [1, 0]),
        (" 0 , 1 ", [0, 1]),
        ("GPU-bbbb2222", [1]),
        ("GPU-bbbb", [1]),  # a unique UUID prefix, as CUDA accepts
        ("GPU-bbbb2222,0", [1, 0]),
        ("0,7,1", [0]),  # CUDA stops at the first entry naming no device
        ("0,0", [0]),
    ],
)
def test_cuda_visible_devices_selects_and_orders(
    monkeypatch: pytest.MonkeyPatch, visible: str, indices: list[int]
) -> None:
    probe = run_probe(monkeypatch, two_gpus(), {"CUDA_VISIBLE_DEVICES": visible})
    assert [gpu.index for gpu in probe.gpus] == indices
    assert probe.error is None


@pytest.mark.parametrize("visible", ["7", "-1", "GPU-ffff", "GPU-", "nonsense"])
def test_cuda_visible_devices_naming_no_gpu(monkeypatch: pytest.MonkeyPatch, visible: str) -> None:
    nvml = two_gpus()
    probe = run_probe(monkeypatch, nvml, {"CUDA_VISIBLE_DEVICES": visible})
    assert probe.gpus == () and probe.error is None  # NVML worked: CUDA is told to see none
    assert probe.no_gpu is not None and "no GPU visible" in probe.no_gpu and repr(visible) in probe.no_gpu
    assert nvml.calls == ["init", "shutdown"]


def test_empty_cuda_visible_devices_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus()
    probe = run_probe(monkeypatch, nvml, {"CUDA_VISIBLE_DEVICES": " "})
    assert probe == VramProbe(no_gpu="no GPU visible: CUDA_VISIBLE_DEVICES is empty")
    assert nvml.calls == []


def test_mig_instance_reports_its_own_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus()
    nvml.mig["MIG-1234"] = (0, 40 * GIB, 39 * GIB)
    probe = run_probe(monkeypatch, nvml, {"CUDA_VISIBLE_DEVICES": "MIG-1234"})
    assert probe.gpus == (GpuInfo(0, "MIG 3g.40gb", 40 * GIB, 39 * GIB, 1 * GIB, "MIG-1234", None),)
    assert run_probe(monkeypatch, nvml, {"CUDA_VISIBLE_DEVICES": "MIG-9999"}).gpus == ()


def test_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNVML([], init_error=9)
    probe = run_probe(monkeypatch, nvml)
    assert probe.gpus == () and probe.error is None
    assert probe.no_gpu is not None and probe.no_gpu.startswith("no NVIDIA driver loaded")
    assert "NVML error 9" in probe.no_gpu
    assert nvml.calls == ["init"]  # nothing to shut down after a failed init


def test_library_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """What every CPU host (and a container without the NVIDIA runtime) answers: no GPU, no error."""
    probe = run_probe(monkeypatch, FakeNVML([], init_error=12))
    assert probe.error is None
    assert probe.no_gpu is not None and probe.no_gpu.startswith("no NVIDIA driver on this host: NVML library not found")


def test_other_init_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = run_probe(monkeypatch, FakeNVML([], init_error=4))
    assert probe == VramProbe(error="NVML initialisation failed: FakeNVMLError: NVML error 4")


def test_bindings_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    probe = probe_vram({})
    assert probe.gpus == () and probe.error is None
    assert probe.no_gpu is not None and probe.no_gpu.startswith("no NVIDIA GPU support installed")


def test_no_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNVML([])
    probe = run_probe(monkeypatch, nvml)
    assert probe == VramProbe(no_gpu="no GPU visible: NVML reports no devices")
    assert nvml.calls == ["init", "shutdown"]


def test_a_failing_device_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus()
    nvml.memory_error_on = 0
    probe = run_probe(monkeypatch, nvml)
    assert [gpu.index for gpu in probe.gpus] == [1]
    nvml.memory_error_on = 1
    probe = run_probe(monkeypatch, nvml, {"CUDA_VISIBLE_DEVICES": "1"})
    assert probe.gpus == ()
    assert probe.error is not None and "GPU 1: FakeNVMLError: NVML error 15" in probe.error


def test_unexpected_failure_never_raises_and_still_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = two_gpus()

    def broken() -> int:
        raise RuntimeError("boom")

    nvml.nvmlDeviceGetCount = broken  # type: ignore[method-assign]
    probe = run_probe(monkeypatch, nvml)
    assert probe == VramProbe(error="NVML query failed: RuntimeError: boom")
    assert nvml.calls == ["init", "shutdown"]


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", two_gpus().module())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [gpu.index for gpu in probe_vram().gpus] == [1]


# -- no GPU is not an error; NVML failing where GPUs are is (issue: a CPU host showed `vram.error`) -------


def _broken_count() -> int:
    raise FakeNVMLError(999)  # NVML_ERROR_UNKNOWN


@pytest.mark.parametrize(
    ("case", "nvml", "environ"),
    [
        ("bindings not installed", None, {}),
        ("NVML library not found", FakeNVML([], init_error=12), {}),
        ("driver not loaded", FakeNVML([], init_error=9), {}),
        ("no device", FakeNVML([]), {}),
        ("CUDA_VISIBLE_DEVICES empty", two_gpus(), {"CUDA_VISIBLE_DEVICES": ""}),
        ("CUDA_VISIBLE_DEVICES=-1", two_gpus(), {"CUDA_VISIBLE_DEVICES": "-1"}),
    ],
)
def test_a_host_without_a_gpu_is_no_error(
    monkeypatch: pytest.MonkeyPatch, case: str, nvml: FakeNVML | None, environ: dict[str, str]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module() if nvml else None)
    probe = probe_vram(environ)
    assert probe.gpus == () and probe.error is None, case
    assert probe.no_gpu and probe.why_none == probe.no_gpu, case


def _query_fails() -> FakeNVML:
    nvml = two_gpus()
    nvml.nvmlDeviceGetCount = _broken_count  # type: ignore[method-assign]
    return nvml


def _memory_fails() -> FakeNVML:
    nvml = FakeNVML([FakeGpu("NVIDIA L4", "GPU-cccc3333", 24 * GIB, 20 * GIB)])
    nvml.memory_error_on = 0
    return nvml


@pytest.mark.parametrize(
    ("case", "nvml"),
    [
        ("driver/library version mismatch", FakeNVML([], init_error=18)),
        ("no permission", FakeNVML([], init_error=4)),
        ("device count fails", _query_fails()),
        ("no device readable", _memory_fails()),
    ],
)
def test_nvml_failing_on_a_gpu_host_is_an_error(monkeypatch: pytest.MonkeyPatch, case: str, nvml: FakeNVML) -> None:
    probe = run_probe(monkeypatch, nvml)
    assert probe.gpus == () and probe.no_gpu is None, case
    assert probe.error and probe.why_none == probe.error, case


@pytest.mark.parametrize(
    ("nvml", "field"),
    [(FakeNVML([], init_error=12), "no_gpu"), (FakeNVML([], init_error=18), "error"), (two_gpus(), None)],
)
def test_status_says_plainly_whether_a_gpu_is_there(
    monkeypatch: pytest.MonkeyPatch, nvml: FakeNVML, field: str | None
) -> None:
    """`/status` engine.vram as an operator reads it: a CPU host says `no_gpu` (error null) and serves;
    an NVML failure is `error`; GPUs found: neither."""
    from litestar.testing import TestClient

    from qwenasr_appliance.api.app import build_litestar
    from qwenasr_appliance.config import load_settings
    from tests.doubles import DoubleBehaviour, double_factory

    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
    _, factory = double_factory(DoubleBehaviour())
    settings = load_settings({"DECODE_WORKERS": "1", "ENGINE": "cpu"})
    app = build_litestar(settings, engine_factory=factory, probe=lambda: probe_vram({}))  # type: ignore[arg-type]
    with TestClient(app) as client:
        engine: dict[str, Any] = {}
        for _ in range(500):
            engine = client.get("/status").json()["engine"]
            if engine["vram"] is not None and engine["state"] != "probing":
                break
        vram = engine["vram"]
        assert set(vram) == {"gpus", "no_gpu", "error"}
        assert (vram["no_gpu"] is not None, vram["error"] is not None) == (field == "no_gpu", field == "error")
        assert (len(vram["gpus"]) > 0) == (field is None)
        if field == "no_gpu":
            assert "no NVIDIA driver on this host" in vram["no_gpu"]
