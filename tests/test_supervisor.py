"""The engine supervisor: state machine, fallbacks, restarts, stop, status and metrics.

No GPU and no vLLM here: engines are `FakeEngine` test doubles made by `FakeFactory`, and the VRAM
probe is a plain function returning a `VramProbe`. Tests run their own event loop (`asyncio.run`).
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from qwenasr_appliance.audio.samples import AudioArray
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import EngineDescription, EngineLoadError, EngineOutput, TranscribeOptions
from qwenasr_appliance.metrics import ENGINE_STATES, Metrics
from qwenasr_appliance.supervisor import factory as factory_module
from qwenasr_appliance.supervisor import supervisor as supervisor_module
from qwenasr_appliance.supervisor.factory import default_engine_factory
from qwenasr_appliance.supervisor.plans import Plan
from qwenasr_appliance.supervisor.probe import GpuInfo, VramProbe, gpu_name, used_vram_bytes
from qwenasr_appliance.supervisor.supervisor import (
    EngineSupervisor,
    EngineUnavailable,
    classify_failure,
)

GIB = 1024**3
H100 = VramProbe(gpus=(GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, 1 * GIB, "GPU-1", (9, 0)),))
NO_GPU = VramProbe(no_gpu="no NVIDIA driver (Driver Not Loaded)")


# -- test doubles ----------------------------------------------------------------------------------


@dataclass
class FakeEngine:
    """Engine protocol test double: its load() fails with `load_error` or waits for `gate`."""

    plan: Plan
    load_error: Exception | None = None
    gate: asyncio.Event | None = None
    loaded: bool = False
    close_calls: int = 0

    async def load(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.load_error is not None:
            raise self.load_error
        self.loaded = True

    async def stream(
        self, audio: AudioArray, options: TranscribeOptions, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        yield EngineOutput(raw_text="language English<asr_text>hello")

    async def abort(self, request_id: str) -> None:
        return None

    async def close(self) -> None:
        self.close_calls += 1

    def describe(self) -> EngineDescription:
        return EngineDescription(
            name="test-double",
            model="Qwen/Qwen3-ASR-1.7B",
            device="cuda:0" if self.plan.engine == "vllm" else "cpu",
            dtype=self.plan.dtype,
            quantization=self.plan.quantization,
            max_concurrency=8,
            details={"plan": self.plan.name},
        )


@dataclass
class FakeFactory:
    """Engine factory handing out `FakeEngine`s. `failures[plan name]`: the load error of every
    engine for that plan, or a list consumed one engine at a time (None: loads fine)."""

    failures: dict[str, Exception | list[Exception | None]] = field(default_factory=dict)
    factory_errors: dict[str, Exception] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    engines: list[FakeEngine] = field(default_factory=list)

    def __call__(self, plan: Plan, settings: Settings) -> FakeEngine:
        if plan.name in self.factory_errors:
            raise self.factory_errors[plan.name]
        outcome = self.failures.get(plan.name)
        error = (outcome.pop(0) if outcome else None) if isinstance(outcome, list) else outcome
        engine = FakeEngine(plan, error, self.gate)
        self.engines.append(engine)
        return engine

    @property
    def plans(self) -> list[str]:
        return [engine.plan.name for engine in self.engines]


class RecordingMetrics(Metrics):
    """The real metrics on a private registry, remembering every engine state set."""

    def __init__(self) -> None:
        self.states: list[str] = []
        super().__init__(CollectorRegistry())

    def set_engine_state(self, state: str) -> None:
        self.states.append(state)
        super().set_engine_state(state)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@dataclass
class RecordingLogger:
    events: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    def __getattr__(self, level: str) -> Callable[..., None]:
        def log(event: str, **fields: Any) -> None:
            self.events.append((level, event, fields))

        return log

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for _level, name, fields in self.events if name == event]


def make(
    *,
    probe: VramProbe = H100,
    factory: FakeFactory | None = None,
    vllm: bool = True,
    cpu: bool = True,
    stable_after_seconds: float = 300.0,
    **settings: Any,
) -> tuple[EngineSupervisor, FakeFactory, RecordingMetrics]:
    factory = factory or FakeFactory()
    metrics = RecordingMetrics()
    supervisor = EngineSupervisor(
        Settings(**settings),
        engine_factory=factory,
        probe=lambda: probe,
        metrics=metrics,
        vllm_available=vllm,
        cpu_available=cpu,
        stable_after_seconds=stable_after_seconds,
    )
    return supervisor, factory, metrics


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 20))


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def outcomes(supervisor: EngineSupervisor) -> list[tuple[str, str]]:
    return [(attempt.plan.name, attempt.outcome) for attempt in supervisor.attempts]


def oom() -> EngineLoadError:
    return EngineLoadError("out_of_memory", "CUDA out of memory")


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> RecordingLogger:
    recorder = RecordingLogger()
    monkeypatch.setattr(supervisor_module, "logger", recorder)
    return recorder


# -- loading and the state machine -----------------------------------------------------------------


def test_states_in_order_to_ready(logs: RecordingLogger) -> None:
    async def main() -> None:
        supervisor, factory, metrics = make()
        assert supervisor.state == "starting" and not supervisor.ready
        await supervisor.start()
        assert supervisor.state == "starting"  # start() returns before loading begins
        assert await supervisor.wait_ready(5)
        assert metrics.states[-4:] == ["starting", "probing", "loading", "ready"]
        assert supervisor.engine is factory.engines[0] and factory.engines[0].loaded
        assert supervisor.require_engine() is factory.engines[0]
        assert supervisor.plan is not None and supervisor.plan.name == "vllm-bf16"
        assert supervisor.not_ready_reason is None and supervisor.reason is None
        assert [event["state"] for event in logs.named("engine.state")] == ["probing", "loading", "ready"]
        ready = logs.named("engine.ready")
        assert ready and ready[0]["plan"] == "vllm-bf16" and ready[0]["device"] == "cuda:0"
        await supervisor.stop()

    run(main)


T4 = VramProbe(gpus=(GpuInfo(0, "Tesla T4", 15 * GIB, 14 * GIB, 1 * GIB, "GPU-t4", (7, 5)),))


def test_a_float16_plan_is_a_warning_in_the_log_and_in_status(logs: RecordingLogger) -> None:
    """No bf16 on a T4 and float32 of the 1.7B model does not fit there: float16, flagged."""

    async def main() -> None:
        supervisor, _factory, _metrics = make(probe=T4, quant_mode="none", gpu_memory_utilization=0.6)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.plan is not None and supervisor.plan.dtype == "float16"
        [warning] = [fields for level, name, fields in logs.events if name == "engine.plan.float16"]
        assert [level for level, name, _ in logs.events if name == "engine.plan.float16"] == ["warning"]
        assert warning["plan"] == supervisor.plan.name and "garbage in float16" in warning["reason"]
        status = msgspec.to_builtins(supervisor.snapshot())
        assert "warning: float16" in status["chain"][0]["reason"]
        await supervisor.stop()

    run(main)


def test_float32_on_a_gpu_without_bf16_logs_no_float16_warning(logs: RecordingLogger) -> None:
    async def main() -> None:
        supervisor, _factory, _metrics = make(probe=T4, quant_mode="none")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.plan is not None and supervisor.plan.dtype == "float32"
        assert "has no bfloat16" in supervisor.plan.reason
        assert logs.named("engine.plan.float16") == []
        await supervisor.stop()

    run(main)


def test_snapshot_and_metrics_when_ready() -> None:
    async def main() -> None:
        supervisor, _factory, metrics = make()
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        status = supervisor.snapshot()
        assert status.state == "ready" and status.ready and status.reason is None
        assert status.plan == "vllm-bf16"
        assert status.engine is not None
        assert (status.engine.name, status.engine.device, status.engine.dtype) == ("test-double", "cuda:0", "bfloat16")
        assert status.engine.details == {"plan": "vllm-bf16"}
        assert [plan.name for plan in status.chain] == [
            "vllm-bf16",
            "vllm-bnb-4bit",
            "vllm-bnb-4bit-util0.72",
            "cpu-float32",
        ]
        assert [(a.plan, a.outcome, a.error) for a in status.attempts] == [("vllm-bf16", "ok", None)]
        assert status.vram is not None and status.vram.error is None
        assert status.vram.gpus[0].total_bytes == 80 * GIB
        assert status.load_seconds is not None and status.load_seconds >= 0
        assert status.restarts == 0 and status.started_at and status.ready_at
        decoded = msgspec.json.decode(msgspec.json.encode(status))
        assert decoded["engine"]["max_concurrency"] == 8 and decoded["state"] == "ready"

        for state in ENGINE_STATES:
            assert metrics.value("qwenasr_engine_state", state=state) == (1.0 if state == "ready" else 0.0)
        plan_labels = {"engine": "vllm", "plan": "vllm-bf16", "dtype": "bfloat16", "quantization": "none"}
        assert metrics.value("qwenasr_engine_plan_info", **plan_labels) == 1.0
        assert metrics.value("qwenasr_engine_load_attempts_total", plan="vllm-bf16", outcome="ok") == 1.0
        assert metrics.value("qwenasr_gpu_memory_total_bytes", gpu="0") == 80 * GIB
        assert metrics.value("qwenasr_gpu_memory_free_bytes", gpu="0") == 79 * GIB
        load = metrics.value("qwenasr_model_load_duration_seconds")
        assert load is not None and load >= 0
        await supervisor.stop()
        assert metrics.value("qwenasr_engine_plan_info", **plan_labels) == 0.0
        assert metrics.value("qwenasr_engine_state", state="stopped") == 1.0

    run(main)


def test_bnb_import_failure_falls_back_to_bf16(logs: RecordingLogger) -> None:
    async def main() -> None:
        factory = FakeFactory(failures={"vllm-bnb-4bit": EngineLoadError("import", "no bitsandbytes")})
        supervisor, _, metrics = make(factory=factory, quant_mode="bnb-4bit")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "degraded" and supervisor.ready
        assert supervisor.plan is not None and supervisor.plan.name == "vllm-bf16"
        assert outcomes(supervisor) == [("vllm-bnb-4bit", "import"), ("vllm-bf16", "ok")]
        assert supervisor.reason == (
            "serving with fallback plan vllm-bf16 after vllm-bnb-4bit: import (no bitsandbytes)"
        )
        assert factory.engines[0].close_calls == 1  # the failed engine was released
        assert metrics.value("qwenasr_engine_fallbacks_total", to_plan="vllm-bf16") == 1.0
        assert metrics.value("qwenasr_engine_load_attempts_total", plan="vllm-bnb-4bit", outcome="import") == 1.0
        assert metrics.value("qwenasr_engine_state", state="degraded") == 1.0
        [failed] = logs.named("engine.plan.failed")
        assert (failed["plan"], failed["kind"], failed["error"]) == ("vllm-bnb-4bit", "import", "no bitsandbytes")
        assert logs.named("engine.fallback") == [
            {"to_plan": "vllm-bf16", "reason": "fallback when 4-bit loading fails"}
        ]
        await supervisor.stop()

    run(main)


def test_bf16_oom_frees_memory_and_falls_back_to_lower_utilization(monkeypatch: pytest.MonkeyPatch) -> None:
    collected: list[int] = []
    emptied: list[int] = []
    monkeypatch.setattr(supervisor_module.gc, "collect", lambda: collected.append(1) or 0)
    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_initialized=lambda: True, empty_cache=lambda: emptied.append(1))
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)

    async def main() -> None:
        factory = FakeFactory(failures={"vllm-bf16": oom()})
        supervisor, _, metrics = make(factory=factory, quant_mode="none")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert outcomes(supervisor) == [("vllm-bf16", "out_of_memory"), ("vllm-bf16-util0.72", "ok")]
        assert supervisor.state == "degraded"
        assert collected and emptied
        assert metrics.value("qwenasr_engine_fallbacks_total", to_plan="vllm-bf16-util0.72") == 1.0
        await supervisor.stop()

    run(main)


def test_all_gpu_plans_fail_then_cpu_serves_degraded() -> None:
    async def main() -> None:
        factory = FakeFactory(
            failures={
                "vllm-bf16": oom(),
                "vllm-bnb-4bit": EngineLoadError("unsupported", "bnb not supported for this model"),
                "vllm-bnb-4bit-util0.72": RuntimeError("engine core died"),
            }
        )
        supervisor, _, metrics = make(factory=factory)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "degraded"
        assert supervisor.plan is not None and supervisor.plan.engine == "cpu"
        assert outcomes(supervisor) == [
            ("vllm-bf16", "out_of_memory"),
            ("vllm-bnb-4bit", "unsupported"),
            ("vllm-bnb-4bit-util0.72", "skipped"),  # same variant already unsupported
            ("cpu-float32", "ok"),
        ]
        assert factory.plans == ["vllm-bf16", "vllm-bnb-4bit", "cpu-float32"]
        reason = supervisor.reason or ""
        assert reason.startswith("serving with fallback plan cpu-float32 after vllm-bf16: out_of_memory")
        assert "vllm-bnb-4bit: unsupported" in reason
        assert supervisor.snapshot().engine is not None
        assert metrics.value("qwenasr_engine_fallbacks_total", to_plan="cpu-float32") == 1.0
        assert metrics.value("qwenasr_engine_fallbacks_total", to_plan="vllm-bnb-4bit-util0.72") is None
        await supervisor.stop()

    run(main)


def test_everything_fails_lists_every_attempt() -> None:
    async def main() -> None:
        factory = FakeFactory(
            failures={
                "vllm-bf16": oom(),
                "vllm-bnb-4bit": oom(),
                "vllm-bnb-4bit-util0.72": oom(),
                "cpu-float32": EngineLoadError("model_not_found", "no such repo"),
            }
        )
        supervisor, _, metrics = make(factory=factory)
        await supervisor.start()
        assert not await supervisor.wait_ready(5)
        assert supervisor.state == "failed" and supervisor.engine is None and supervisor.plan is None
        status = supervisor.snapshot()
        assert [(a.plan, a.outcome) for a in status.attempts] == [
            ("vllm-bf16", "out_of_memory"),
            ("vllm-bnb-4bit", "out_of_memory"),
            ("vllm-bnb-4bit-util0.72", "out_of_memory"),
            ("cpu-float32", "model_not_found"),
        ]
        assert status.reason == (
            "every plan failed: vllm-bf16: out_of_memory (CUDA out of memory); "
            "vllm-bnb-4bit: out_of_memory (CUDA out of memory); "
            "vllm-bnb-4bit-util0.72: out_of_memory (CUDA out of memory); "
            "cpu-float32: model_not_found (no such repo)"
        )
        with pytest.raises(EngineUnavailable) as caught:
            supervisor.require_engine()
        assert caught.value.retry_after_seconds is None and caught.value.permanent  # no Retry-After: it is final
        assert caught.value.reason.startswith("the engine failed and will not recover without a restart: every plan")
        assert all(engine.close_calls == 1 for engine in factory.engines)
        assert metrics.value("qwenasr_engine_state", state="failed") == 1.0
        assert metrics.value("qwenasr_engine_load_attempts_total", plan="cpu-float32", outcome="model_not_found") == 1
        await supervisor.stop()
        assert supervisor.state == "stopped"

    run(main)


def test_raw_exceptions_are_classified() -> None:
    async def main() -> None:
        factory = FakeFactory(
            failures={
                "vllm-bf16": RuntimeError("CUDA error: out of memory"),
                "vllm-bf16-util0.72": ImportError("No module named 'vllm._C'"),
            },
            factory_errors={"cpu-float32": ValueError("bad")},
        )
        supervisor, _, _ = make(factory=factory, quant_mode="none")
        await supervisor.start()
        assert not await supervisor.wait_ready(5)
        assert outcomes(supervisor) == [
            ("vllm-bf16", "out_of_memory"),
            ("vllm-bf16-util0.72", "import"),
            ("cpu-float32", "other"),
        ]
        assert supervisor.attempts[2].error == "ValueError: bad"

    run(main)


def test_classify_failure() -> None:
    class OutOfMemoryError(RuntimeError):  # like torch.cuda.OutOfMemoryError
        pass

    assert classify_failure(EngineLoadError("unsupported", "x")) == "unsupported"
    assert classify_failure(ModuleNotFoundError("vllm")) == "import"
    assert classify_failure(MemoryError()) == "out_of_memory"
    assert classify_failure(OutOfMemoryError("Tried to allocate 2 GiB")) == "out_of_memory"
    assert classify_failure(ValueError("No available memory for the cache blocks")) == "other"


def test_no_gpu_serves_on_cpu_and_says_why() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(probe=NO_GPU)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "ready"  # expected on a CPU host: not degraded
        assert factory.plans == ["cpu-float32"]
        status = supervisor.snapshot()
        assert status.chain[0].reason == "no GPU is visible (no NVIDIA driver (Driver Not Loaded)); serving on CPU"
        assert status.vram is not None and status.vram.gpus == [] and status.vram.no_gpu == NO_GPU.no_gpu
        assert status.vram.error is None  # no GPU on a CPU host is no error
        await supervisor.stop()

    run(main)


def test_gpu_visible_without_vllm_is_degraded_on_cpu() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(vllm=False)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "degraded"
        assert factory.plans == ["cpu-float32"]
        assert "vLLM is not installed" in (supervisor.reason or "")
        await supervisor.stop()

    run(main)


def test_engine_cpu_on_a_gpu_host_is_ready() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(engine="cpu", dtype="bfloat16")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "ready" and factory.plans == ["cpu-bfloat16"]
        await supervisor.stop()

    run(main)


def test_engine_vllm_without_gpu_fails_without_trying() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(probe=NO_GPU, engine="vllm")
        await supervisor.start()
        assert not await supervisor.wait_ready(5)
        assert supervisor.state == "failed" and factory.plans == []
        assert supervisor.reason == (
            "no plan can load the model: ENGINE=vllm but no GPU is visible (no NVIDIA driver (Driver Not Loaded))"
        )

    run(main)


def test_engine_vllm_stops_after_the_gpu_plans() -> None:
    async def main() -> None:
        factory = FakeFactory(failures={"vllm-bf16": oom(), "vllm-bf16-util0.72": oom()})
        supervisor, _, _ = make(factory=factory, engine="vllm", quant_mode="none")
        await supervisor.start()
        assert not await supervisor.wait_ready(5)
        assert factory.plans == ["vllm-bf16", "vllm-bf16-util0.72"]

    run(main)


def test_auto_on_a_small_card_tries_4bit_first() -> None:
    small = VramProbe(gpus=(GpuInfo(0, "RTX 4060", 8 * GIB, int(7.6 * GIB), int(0.4 * GIB)),))

    async def main() -> None:
        supervisor, factory, _ = make(probe=small, model_id="Qwen/Qwen3-ASR-1.7B")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert factory.plans == ["vllm-bnb-4bit-util0.85"]
        assert supervisor.state == "ready"
        await supervisor.stop()

    run(main)


def test_a_failing_probe_is_reported_not_raised() -> None:
    def broken() -> VramProbe:
        raise RuntimeError("nvml exploded")

    async def main() -> None:
        supervisor = EngineSupervisor(
            Settings(),
            engine_factory=FakeFactory(),
            probe=broken,
            metrics=RecordingMetrics(),
            vllm_available=True,
            cpu_available=True,
        )
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        status = supervisor.snapshot()
        assert status.plan == "cpu-float32"
        assert status.vram is not None and status.vram.error == "the VRAM probe failed: RuntimeError: nvml exploded"
        assert status.vram.no_gpu is None
        await supervisor.stop()

    run(main)


def test_require_engine_while_loading() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        supervisor, _, _ = make(factory=FakeFactory(gate=gate))
        with pytest.raises(EngineUnavailable) as caught:
            supervisor.require_engine()
        assert caught.value.retry_after_seconds == 10
        assert caught.value.reason == "the engine has not started loading yet"
        await supervisor.start()
        await until(lambda: supervisor.state == "loading")
        assert supervisor.engine is None
        with pytest.raises(EngineUnavailable) as caught:
            supervisor.require_engine()
        assert caught.value.retry_after_seconds == 10
        await until(lambda: supervisor.not_ready_reason != "the model is loading")
        assert supervisor.not_ready_reason == "the model is loading (plan vllm-bf16, 1 of 4)"
        assert not await supervisor.wait_ready(0.05)  # times out
        gate.set()
        assert await supervisor.wait_ready(5)
        await supervisor.stop()

    run(main)


# -- restarts --------------------------------------------------------------------------------------


def test_dead_engine_restarts_once_for_concurrent_reports(logs: RecordingLogger) -> None:
    async def main() -> None:
        supervisor, factory, metrics = make(engine_restart_backoff_seconds=0.05)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        dead = supervisor.require_engine()
        began = time.monotonic()
        await asyncio.gather(*(supervisor.report_dead(dead, RuntimeError("engine core died")) for _ in range(5)))
        assert supervisor.state == "restarting" and supervisor.engine is None
        with pytest.raises(EngineUnavailable) as caught:
            supervisor.require_engine()
        assert caught.value.retry_after_seconds == 5
        assert caught.value.reason == "the engine is restarting: the engine died: RuntimeError: engine core died"
        assert await supervisor.wait_ready(5)
        assert time.monotonic() - began >= 0.05  # the backoff was waited
        assert supervisor.state == "ready"
        assert factory.plans == ["vllm-bf16", "vllm-bf16"]  # one restart for five reports
        assert supervisor.engine is factory.engines[1] and factory.engines[0].close_calls == 1
        assert metrics.states[-3:] == ["ready", "restarting", "ready"]
        assert metrics.value("qwenasr_engine_restarts_total") == 1.0
        assert supervisor.snapshot().restarts == 1
        assert logs.named("engine.dead")[0]["error"] == "RuntimeError: engine core died"
        assert logs.named("engine.restart")[0]["delay_seconds"] == 0.05
        await supervisor.stop()

    run(main)


def test_restart_resumes_from_the_plan_that_worked() -> None:
    async def main() -> None:
        factory = FakeFactory(failures={"vllm-bf16": oom()})
        supervisor, _, _ = make(factory=factory, engine_restart_backoff_seconds=0)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "degraded"
        await supervisor.report_dead(supervisor.require_engine(), "gone")
        await until(lambda: len(factory.engines) == 3 and supervisor.ready)
        assert factory.plans == ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit"]
        assert supervisor.state == "degraded"  # still a fallback plan
        assert "vllm-bf16: out_of_memory" in (supervisor.reason or "")
        await supervisor.stop()

    run(main)


def test_restart_limit_then_failed() -> None:
    async def main() -> None:
        factory = FakeFactory(
            failures={"vllm-bf16": [None, oom(), oom(), oom()], "vllm-bf16-util0.72": oom()},
        )
        supervisor, _, metrics = make(
            factory=factory,
            engine="vllm",
            quant_mode="none",
            engine_restart_max=2,
            engine_restart_backoff_seconds=0.02,
        )
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        began = time.monotonic()
        await supervisor.report_dead(supervisor.require_engine(), "cuda error")
        await until(lambda: supervisor.state == "failed")
        assert time.monotonic() - began >= 0.02 + 0.04  # backoff doubles
        assert factory.plans == ["vllm-bf16"] + ["vllm-bf16", "vllm-bf16-util0.72"] * 2
        assert supervisor.snapshot().restarts == 2
        assert metrics.value("qwenasr_engine_restarts_total") == 2.0
        reason = supervisor.reason or ""
        assert reason.startswith("the engine died and 2 restart(s) in a row did not bring it back: reloading failed")
        assert not await supervisor.wait_ready(1)

    run(main)


def test_deaths_in_a_row_count_until_the_engine_is_stable() -> None:
    async def scenario(stable_after: float) -> str:
        supervisor, _, _ = make(
            engine_restart_max=1, engine_restart_backoff_seconds=0, stable_after_seconds=stable_after
        )
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        for _ in range(2):
            await supervisor.report_dead(supervisor.require_engine(), "died")
            await until(lambda: supervisor.state in ("ready", "failed"))
        state = supervisor.state
        await supervisor.stop()
        return state

    async def main() -> None:
        assert await scenario(stable_after=300) == "failed"  # the second death is "in a row"
        assert await scenario(stable_after=0) == "ready"  # it served long enough in between

    run(main)


def test_no_restarts_allowed() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(engine_restart_max=0)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        await supervisor.report_dead(supervisor.require_engine(), "died")
        await until(lambda: supervisor.state == "failed")
        assert len(factory.engines) == 1 and factory.engines[0].close_calls == 1
        assert supervisor.reason == "the engine died and 0 restart(s) in a row did not bring it back: died"

    run(main)


def test_stale_and_late_death_reports_are_ignored() -> None:
    async def main() -> None:
        supervisor, factory, _ = make()
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        stranger = FakeEngine(factory.engines[0].plan)
        await supervisor.report_dead(stranger, "not ours")
        assert supervisor.state == "ready"
        engine = supervisor.require_engine()
        await supervisor.stop()
        await supervisor.report_dead(engine, "after stop")
        assert supervisor.state == "stopped"

    run(main)


# -- stop ------------------------------------------------------------------------------------------


def test_stop_during_load_closes_the_loading_engine() -> None:
    async def main() -> None:
        gate = asyncio.Event()
        supervisor, factory, metrics = make(factory=FakeFactory(gate=gate))
        await supervisor.start()
        await until(lambda: len(factory.engines) == 1)
        await supervisor.stop()
        assert supervisor.state == "stopped" and supervisor.engine is None
        assert factory.engines[0].close_calls == 1 and not factory.engines[0].loaded
        assert metrics.states[-1] == "stopped"
        await supervisor.stop()  # twice is fine
        assert not await supervisor.wait_ready(1)
        with pytest.raises(EngineUnavailable) as caught:
            supervisor.require_engine()
        assert caught.value.reason == "the server is shutting down"

    run(main)


def test_concurrent_stops_both_wait_for_the_end() -> None:
    async def main() -> None:
        supervisor, factory, _ = make()
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        await asyncio.gather(supervisor.stop(), supervisor.stop())
        assert supervisor.state == "stopped" and factory.engines[0].close_calls == 1

    run(main)


def test_stop_before_start() -> None:
    async def main() -> None:
        supervisor, factory, _ = make()
        await supervisor.stop()
        assert supervisor.state == "stopped"
        await supervisor.start()  # a no-op after stop
        await asyncio.sleep(0.01)
        assert supervisor.state == "stopped" and factory.engines == []

    run(main)


def test_stop_during_restart_backoff() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(engine_restart_backoff_seconds=30)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        await supervisor.report_dead(supervisor.require_engine(), "died")
        await until(lambda: factory.engines[0].close_calls == 1)
        began = time.monotonic()
        await supervisor.stop()
        assert time.monotonic() - began < 1
        assert supervisor.state == "stopped" and len(factory.engines) == 1

    run(main)


# -- default factory and global metrics ------------------------------------------------------------


class RecordingEngine:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def test_default_factory_imports_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fake_engines")
    module.VLLMEngine = RecordingEngine  # type: ignore[attr-defined]
    module.CPUEngine = RecordingEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_engines", module)
    monkeypatch.setattr(
        factory_module,
        "ENGINE_CLASSES",
        {"vllm": ("fake_engines", "VLLMEngine"), "cpu": ("fake_engines", "CPUEngine")},
    )
    settings = Settings()
    vllm_plan = Plan("vllm-bf16", "vllm", "bfloat16", None, 0.9, "test")
    cpu_plan = Plan("cpu-bfloat16", "cpu", "bfloat16", None, None, "test")
    vllm_engine = default_engine_factory(vllm_plan, settings)
    assert isinstance(vllm_engine, RecordingEngine) and vllm_engine.args == (settings, vllm_plan)
    # The GPU readings come from the supervisor's probe: the engine does not import the supervisor.
    assert vllm_engine.kwargs == {"vram_probe": used_vram_bytes, "gpu_name": gpu_name}
    cpu_engine = default_engine_factory(cpu_plan, settings)
    assert isinstance(cpu_engine, RecordingEngine)
    assert len(cpu_engine.args) == 1 and cpu_engine.args[0].dtype == "bfloat16"
    assert settings.dtype == "auto"


def test_default_factory_import_failure_is_a_load_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        factory_module,
        "ENGINE_CLASSES",
        {"vllm": ("no_such_engine_module", "VLLMEngine"), "cpu": ("types", "NoSuchClass")},
    )

    async def main() -> None:
        supervisor = EngineSupervisor(
            Settings(),
            probe=lambda: H100,
            metrics=RecordingMetrics(),
            vllm_available=True,
            cpu_available=True,
        )
        await supervisor.start()
        assert not await supervisor.wait_ready(5)
        assert {outcome for _plan, outcome in outcomes(supervisor)} <= {"import", "skipped"}
        assert outcomes(supervisor)[-1] == ("cpu-float32", "import")
        assert "cannot import no_such_engine_module.VLLMEngine" in (supervisor.attempts[0].error or "")
        assert "cannot import types.NoSuchClass" in (supervisor.attempts[-1].error or "")

    run(main)


def test_global_metrics_registry_by_default() -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async def main() -> None:
        attempts = sample("qwenasr_engine_load_attempts_total", plan="cpu-float32", outcome="ok")
        supervisor = EngineSupervisor(
            Settings(), engine_factory=FakeFactory(), probe=lambda: NO_GPU, vllm_available=False, cpu_available=True
        )
        assert sample("qwenasr_engine_state", state="starting") == 1.0
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert sample("qwenasr_engine_state", state="ready") == 1.0
        assert sample("qwenasr_engine_state", state="starting") == 0.0
        assert sample("qwenasr_engine_load_attempts_total", plan="cpu-float32", outcome="ok") == attempts + 1
        await supervisor.stop()
        assert sample("qwenasr_engine_state", state="stopped") == 1.0

    run(main)


# -- a GPU expected (EXPECT_GPU, GPU_FALLBACK) -----------------------------------------------------


def test_expected_gpu_not_visible_serves_on_cpu_degraded(logs: RecordingLogger) -> None:
    """The chart requested a GPU but the container cannot see it: the CPU engine serves, degraded."""

    async def main() -> None:
        supervisor, factory, metrics = make(probe=NO_GPU, expect_gpu=True)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert factory.plans == ["cpu-float32"]
        assert supervisor.state == "degraded" and supervisor.ready
        assert supervisor.reason is not None
        assert supervisor.reason.startswith("serving on CPU although a GPU is expected (EXPECT_GPU=true)")
        assert NO_GPU.no_gpu is not None and NO_GPU.no_gpu in supervisor.reason
        # What QwenASRFallbackToCPU keys on: degraded + the cpu plan.
        assert metrics.value("qwenasr_engine_state", state="degraded") == 1.0
        cpu_plan = {"engine": "cpu", "plan": "cpu-float32", "dtype": "float32", "quantization": "none"}
        assert metrics.value("qwenasr_engine_plan_info", **cpu_plan) == 1.0
        assert supervisor.snapshot().reason == supervisor.reason
        assert supervisor.held_from_traffic is None  # GPU_FALLBACK=degraded (the default) keeps it ready
        assert logs.named("engine.ready")[0]["held_from_traffic"] is None
        await supervisor.stop()

    run(main)


def test_expected_gpu_with_gpu_fallback_not_ready_holds_traffic() -> None:
    async def main() -> None:
        supervisor, _factory, _ = make(probe=NO_GPU, expect_gpu=True, gpu_fallback="not_ready")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "degraded" and supervisor.ready  # it still serves what reaches it
        held = supervisor.held_from_traffic
        assert held is not None and "GPU is expected" in held and held.endswith("(GPU_FALLBACK=not_ready)")
        await supervisor.stop()
        assert supervisor.held_from_traffic is None

    run(main)


def test_gpu_fallback_not_ready_after_gpu_plans_failed_on_a_visible_gpu() -> None:
    async def main() -> None:
        failures: dict[str, Exception | list[Exception | None]] = {
            name: oom() for name in ("vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72")
        }
        supervisor, factory, _ = make(factory=FakeFactory(failures=failures), gpu_fallback="not_ready")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert factory.plans[-1] == "cpu-float32" and supervisor.state == "degraded"
        assert "serving with fallback plan cpu-float32" in (supervisor.reason or "")
        assert "GPU is visible" in (supervisor.held_from_traffic or "")
        await supervisor.stop()

    run(main)


def test_expected_gpu_that_vllm_uses_is_ready_and_not_held() -> None:
    async def main() -> None:
        supervisor, _, _ = make(expect_gpu=True, gpu_fallback="not_ready")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "ready" and supervisor.held_from_traffic is None
        await supervisor.stop()

    run(main)


def test_cpu_host_without_expect_gpu_is_ready_even_with_not_ready_fallback() -> None:
    async def main() -> None:
        supervisor, _, _ = make(probe=NO_GPU, gpu_fallback="not_ready")
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert supervisor.state == "ready" and supervisor.held_from_traffic is None
        await supervisor.stop()

    run(main)


# -- serving listeners -----------------------------------------------------------------------------


def test_serving_listeners_hear_each_engine_that_starts_serving() -> None:
    async def main() -> None:
        supervisor, factory, _ = make(engine_restart_backoff_seconds=0)
        heard: list[int | None] = []

        def broken(description: EngineDescription | None) -> None:
            raise RuntimeError("listener bug")

        supervisor.add_serving_listener(broken)  # never stops the others, nor the supervisor
        supervisor.add_serving_listener(lambda d: heard.append(d.max_concurrency if d else None))
        assert heard == []  # nothing serves yet
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        assert heard == [8]
        await supervisor.report_dead(supervisor.require_engine(), "gone")
        await until(lambda: len(factory.engines) == 2 and supervisor.ready)
        assert heard == [8, 8]
        late: list[int | None] = []
        supervisor.add_serving_listener(lambda d: late.append(d.max_concurrency if d else None))
        assert late == [8]  # added while serving: told at once
        await supervisor.stop()

    run(main)


@pytest.mark.parametrize(
    ("probe", "level"),
    [
        (NO_GPU, "info"),  # a CPU host: nothing wrong
        (H100, "info"),
        (VramProbe(error="NVML initialisation failed: NVMLError: Driver/library version mismatch"), "warning"),
    ],
)
def test_the_probe_is_logged_as_a_fault_only_when_nvml_fails(
    logs: RecordingLogger, probe: VramProbe, level: str
) -> None:
    async def main() -> None:
        supervisor, _, _ = make(probe=probe)
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        await supervisor.stop()

    run(main)
    [(logged_level, fields)] = [(lvl, f) for lvl, name, f in logs.events if name == "engine.probe"]
    assert logged_level == level
    assert (fields["no_gpu"], fields["error"]) == (probe.no_gpu, probe.error)
