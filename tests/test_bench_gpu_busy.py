"""The benchmark's GPU busy sampler (bench/gpu_busy.py), against a fake `pynvml` (no GPU or driver here)."""

from __future__ import annotations

import asyncio
import math
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from bench.client import Target, run_load
from bench.gpu_busy import GpuBusySampler, gpu_count
from bench.run_all import busy_words, with_gpus
from bench.workload import AudioItem

from tests.test_probe import GIB, FakeGpu, FakeNVML, FakeNVMLError

NVML_ERROR_GPU_IS_LOST = 15


@dataclass
class BusyNVML(FakeNVML):
    """The probe's fake NVML plus kernel-busy readings: each GPU returns its `busy` values in turn
    (cycling) and raises GPU_IS_LOST once it has answered `fail_after` times; `returned` is what it gave."""

    busy: dict[int, list[float]] = field(default_factory=dict)
    fail_after: dict[int, int] = field(default_factory=dict)
    returned: dict[int, list[float]] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        index = int(handle[1])
        seen = self.returned.setdefault(index, [])
        if len(seen) >= self.fail_after.get(index, math.inf):
            self.failed.add(index)
            raise FakeNVMLError(NVML_ERROR_GPU_IS_LOST)
        values = self.busy.get(index, [50.0])
        value = values[len(seen) % len(values)]
        seen.append(value)
        return types.SimpleNamespace(gpu=int(value), memory=0)


def three_gpus(**kwargs: Any) -> BusyNVML:
    return BusyNVML(
        [
            FakeGpu("NVIDIA H200", "GPU-aaaa1111", 141 * GIB, 20 * GIB),
            FakeGpu(b"NVIDIA H200", "GPU-bbbb2222", 141 * GIB, 41 * GIB),
            FakeGpu("NVIDIA H200", "GPU-cccc3333", 141 * GIB, 141 * GIB),
        ],
        **kwargs,
    )


def sample_until(sampler: GpuBusySampler, done: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Run the sampler until `done()` holds (the fake has given what the test needs), then stop it."""
    sampler.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done(), "the sampler did not poll in time"
    return sampler.stop()


def test_every_gpu_is_summarized_from_the_values_nvml_gave() -> None:
    nvml = three_gpus(busy={0: [90.0], 1: [0.0, 100.0, 100.0, 0.0, 60.0], 2: [0.0]})
    sampler = GpuBusySampler(0.005, environ={}, nvml=nvml.module())
    record = sample_until(sampler, lambda: all(len(nvml.returned.get(i, [])) >= 6 for i in range(3)))
    assert record["available"] is True and record["error"] is None
    assert record["cuda_visible_devices"] is None and record["interval_seconds"] == 0.005
    assert [g["index"] for g in record["gpus"]] == [0, 1, 2] and gpu_count(record) == 3
    for gpu in record["gpus"]:
        given = nvml.returned[gpu["index"]]
        assert gpu["samples"] == len(given)  # every reading, and nothing else
        assert gpu["busy_mean"] == round(statistics.fmean(given), 1)
        assert gpu["busy_p50"] == round(statistics.median(given), 1)
        assert gpu["busy_zero_share"] == round(given.count(0.0) / len(given), 3)
        assert gpu["error"] is None
    first, second, idle = record["gpus"]
    assert (first["busy_mean"], first["busy_zero_share"]) == (90.0, 0.0)
    assert (idle["busy_mean"], idle["busy_p50"], idle["busy_zero_share"]) == (0.0, 0.0, 1.0)
    assert second["name"] == "NVIDIA H200"  # bytes from older bindings are decoded
    assert first["memory_used_mib_max"] == first["memory_used_mib_mean"] == 121 * 1024
    assert first["memory_total_mib"] == 141 * 1024
    assert record["busy_mean"] == round(statistics.fmean(g["busy_mean"] for g in record["gpus"]), 1)
    assert record["seconds"] > 0
    assert nvml.calls == ["init", "shutdown"]
    assert sampler.stop() is record  # stopping twice changes nothing
    assert busy_words(record).startswith("GPU0 90.0% / GPU1 ")


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("1", [1]),
        ("2,0", [2, 0]),
        (" 0 , 1 ", [0, 1]),
        ("GPU-bbbb", [1]),  # a unique UUID prefix, as CUDA accepts
        ("0,9,1", [0]),  # CUDA stops at the first entry that names no GPU
        ("1,1", [1]),
    ],
)
def test_only_the_gpus_cuda_visible_devices_names_in_its_order(visible: str, indices: list[int]) -> None:
    nvml = three_gpus()
    record = GpuBusySampler(60.0, environ={"CUDA_VISIBLE_DEVICES": visible}, nvml=nvml.module())
    record.start()
    result = record.stop()  # one poll, at stop
    assert result["available"] is True
    assert [g["index"] for g in result["gpus"]] == indices
    assert all(g["samples"] == 1 for g in result["gpus"])
    assert sorted(nvml.returned) == sorted(indices)
    assert result["cuda_visible_devices"] == visible


@pytest.mark.parametrize(
    ("visible", "reason"),
    [
        ("", "CUDA_VISIBLE_DEVICES is empty"),
        ("7", "names none of the 3 GPUs"),
        ("GPU-", "names none of the 3 GPUs"),  # a prefix of every UUID is not unique
        ("MIG-1234", "no kernel-busy % per MIG instance"),
    ],
)
def test_no_numbers_when_cuda_visible_devices_leaves_no_gpu(visible: str, reason: str) -> None:
    nvml = three_gpus()
    sampler = GpuBusySampler(60.0, environ={"CUDA_VISIBLE_DEVICES": visible}, nvml=nvml.module())
    sampler.start()
    record = sampler.stop()
    assert record == {"available": False, "reason": record["reason"], "cuda_visible_devices": visible}
    assert reason in record["reason"]
    assert nvml.returned == {}
    assert nvml.calls in ([], ["init", "shutdown"])  # NVML, when opened, is closed again
    assert gpu_count(record) is None


def test_without_the_nvml_bindings_the_record_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with GpuBusySampler(environ={}) as sampler:
        pass
    record = sampler.stop()
    assert record["available"] is False and "cannot be imported" in record["reason"]
    assert set(record) == {"available", "reason", "cuda_visible_devices"}  # no numbers at all
    assert busy_words(record).startswith("not available (NVML not available")


@pytest.mark.parametrize(
    ("code", "reason"), [(12, "NVML library not found"), (9, "no NVIDIA driver loaded"), (999, "initialisation failed")]
)
def test_without_a_driver_the_record_says_why(monkeypatch: pytest.MonkeyPatch, code: int, reason: str) -> None:
    nvml = three_gpus(init_error=code)
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())  # the sampler imports pynvml itself
    with GpuBusySampler(environ={}) as sampler:
        pass
    record = sampler.stop()
    assert record["available"] is False and reason in record["reason"]
    assert nvml.calls == ["init"]  # nothing to shut down


def test_a_gpu_failing_mid_run_keeps_its_samples_and_says_so() -> None:
    nvml = three_gpus(busy={0: [80.0, 100.0], 1: [70.0]}, fail_after={0: 3})
    sampler = GpuBusySampler(0.005, environ={"CUDA_VISIBLE_DEVICES": "0,1"}, nvml=nvml.module())
    record = sample_until(sampler, lambda: 0 in nvml.failed and len(nvml.returned.get(1, [])) >= 5)
    assert record["available"] is True
    lost, fine = record["gpus"]
    assert lost["samples"] == 3 and lost["busy_mean"] == round((80 + 100 + 80) / 3, 1)
    assert "GPU 0: FakeNVMLError" in lost["error"] and "after 3 samples" in lost["error"]
    assert fine["error"] is None and fine["samples"] == len(nvml.returned[1]) >= 5
    assert record["error"] == lost["error"]
    assert len(nvml.returned[0]) == 3  # not read again after the failure


def test_gpus_failing_from_the_first_read_give_no_numbers() -> None:
    nvml = three_gpus(fail_after={0: 0, 1: 0, 2: 0})
    sampler = GpuBusySampler(60.0, environ={}, nvml=nvml.module())
    sampler.start()
    record = sampler.stop()
    assert record["available"] is False
    assert record["reason"].startswith("no sample read: GPU 0: FakeNVMLError")
    assert nvml.calls == ["init", "shutdown"]


def test_a_sampler_that_never_started_reports_nothing() -> None:
    record = GpuBusySampler(environ={}, nvml=three_gpus().module()).stop()
    assert record["available"] is False and "never started" in record["reason"]
    with pytest.raises(ValueError):
        GpuBusySampler(0.0)


def test_run_load_carries_the_gpu_busy_record(tmp_path: Path) -> None:
    nvml = three_gpus(busy={0: [95.0]})

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return httpx.Response(200, json={"text": "hello"})

    path = tmp_path / "clip.wav"
    path.write_bytes(b"RIFF")
    items = [AudioItem(name=f"{i}.wav", fmt="wav", seconds=30.0, path=path) for i in range(4)]
    sampler = GpuBusySampler(0.01, environ={"CUDA_VISIBLE_DEVICES": "0"}, nvml=nvml.module())
    target = Target("appliance", "http://server", "qwen3-asr")
    load = asyncio.run(run_load(target, items, 2, transport=httpx.MockTransport(handler), gpu_sampler=sampler))
    summary = load.summary()
    record = summary["gpu_busy"]
    assert record["available"] is True and record["gpus"][0]["busy_mean"] == 95.0
    assert record["gpus"][0]["samples"] >= 1 and nvml.calls == ["init", "shutdown"]
    assert record["seconds"] >= load.wall_seconds * 0.9
    entry = with_gpus(dict(summary))
    assert entry["gpus"] == 1
    assert "gpus" not in with_gpus({"gpu_busy": {"available": False, "reason": "no NVML"}})
