"""What `GET /status` shows of the supervisors (msgspec structs), and the converters from their state.

Times are ISO 8601 in UTC with milliseconds; durations are seconds; memory is bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import msgspec

from qwenasr_appliance.engines.base import EngineDescription, LoadFailureKind
from qwenasr_appliance.engines.progress import StepReading
from qwenasr_appliance.supervisor.plans import Plan
from qwenasr_appliance.supervisor.probe import VramProbe

AttemptOutcome = Literal["ok", "skipped"] | LoadFailureKind


@dataclass(frozen=True)
class Attempt:
    """One try at loading one plan."""

    plan: Plan
    started_at: datetime
    duration_seconds: float
    outcome: AttemptOutcome
    error: str | None


class PlanStatus(msgspec.Struct, frozen=True):
    name: str
    engine: str
    dtype: str
    quantization: str | None
    gpu_memory_utilization: float | None
    reason: str


class AttemptStatus(msgspec.Struct, frozen=True):
    plan: str
    started_at: str
    duration_seconds: float
    outcome: str
    error: str | None


class GpuStatus(msgspec.Struct, frozen=True):
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


class VramStatus(msgspec.Struct, frozen=True):
    """The GPUs the VRAM probe found. Without one, `no_gpu` says why when the host simply has none to use
    (not an error: a CPU host) and `error` when NVML failed (on a GPU host, a fault)."""

    gpus: list[GpuStatus]
    no_gpu: str | None
    error: str | None


class EngineStatus(msgspec.Struct, frozen=True):
    name: str
    model: str
    device: str
    dtype: str
    quantization: str | None
    max_concurrency: int
    details: dict[str, str | int | float | bool | None]


class StepStatus(msgspec.Struct, frozen=True):
    """The load step under way: `step` (resolving_model, downloading, importing_libraries, starting_engine,
    loading_weights, compiling, capturing_cuda_graphs, warming_up), since when and for how long; bytes
    while downloading."""

    step: str
    detail: str | None
    since: str
    seconds: float
    bytes_done: int | None
    bytes_total: int | None


class SupervisorStatus(msgspec.Struct, frozen=True):
    """What `GET /status` returns."""

    state: str
    ready: bool
    reason: str | None
    plan: str | None
    engine: EngineStatus | None
    chain: list[PlanStatus]
    attempts: list[AttemptStatus]
    vram: VramStatus | None
    load_seconds: float | None
    restarts: int
    started_at: str | None
    ready_at: str | None
    step: StepStatus | None = None


class AlignerStatus(msgspec.Struct, frozen=True):
    """The `aligner` section of `GET /status`."""

    state: str
    ready: bool
    model: str | None
    plan: str | None
    device: str | None
    dtype: str | None
    error: str | None
    load_seconds: float | None
    restarts: int
    details: dict[str, str | int | float | bool | None]


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="milliseconds") if moment else None


def plan_status(plan: Plan) -> PlanStatus:
    return PlanStatus(
        name=plan.name,
        engine=plan.engine,
        dtype=plan.dtype,
        quantization=plan.quantization,
        gpu_memory_utilization=plan.gpu_memory_utilization,
        reason=plan.reason,
    )


def attempt_status(attempt: Attempt) -> AttemptStatus:
    return AttemptStatus(
        plan=attempt.plan.name,
        started_at=iso(attempt.started_at) or "",
        duration_seconds=round(attempt.duration_seconds, 3),
        outcome=attempt.outcome,
        error=attempt.error,
    )


def vram_status(probe: VramProbe) -> VramStatus:
    return VramStatus(
        gpus=[
            GpuStatus(
                index=gpu.index,
                name=gpu.name,
                total_bytes=gpu.total_bytes,
                free_bytes=gpu.free_bytes,
                used_bytes=gpu.used_bytes,
            )
            for gpu in probe.gpus
        ],
        no_gpu=probe.no_gpu,
        error=probe.error,
    )


def step_status(reading: StepReading) -> StepStatus:
    return StepStatus(
        step=reading.step,
        detail=reading.detail,
        since=iso(reading.since) or "",
        seconds=reading.seconds,
        bytes_done=reading.bytes_done,
        bytes_total=reading.bytes_total,
    )


def engine_status(description: EngineDescription) -> EngineStatus:
    return EngineStatus(
        name=description.name,
        model=description.model,
        device=description.device,
        dtype=description.dtype,
        quantization=description.quantization,
        max_concurrency=description.max_concurrency,
        details=dict(description.details),
    )
