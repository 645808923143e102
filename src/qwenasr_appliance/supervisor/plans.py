"""The ordered list of ways to load the model ("plans") that the supervisor tries, first to last.

`plan_chain` is pure: it sees the settings, the VRAM probe and which engines are installed, and
returns the plans with the reason each one is in the list. Rules:

- `ENGINE=cpu`: the CPU engine only. `ENGINE=vllm`: vLLM plans only. `ENGINE=auto`: vLLM plans when a
  GPU is visible and vLLM is installed, then the CPU engine as the last resort when it is installed.
- vLLM refuses to start when `gpu_memory_utilization x total` exceeds the memory that is free (another
  process holds some); the utilization is then lowered to what is free, and the plan says so.
- `QUANT_MODE=auto` estimates the model's weights and picks bf16 first when they fit comfortably in
  the memory vLLM may use, bitsandbytes 4-bit first otherwise.
- `DTYPE=auto` on a GPU without bf16 (before Ampere) takes float32 when it fits, float16 only when it
  does not; a float16 plan says in its reason that Qwen3's decoder is reported to fail in float16.
- The last GPU plan repeats the lightest allowed variant at 80% of that utilization: it leaves room
  for memory vLLM does not account for (CUDA context, graph capture, other processes growing).
- With a forced aligner (`ALIGNER_MODEL_ID`), the aligner's share (`ALIGNER_GPU_MEMORY_UTILIZATION` of
  the GPU, plus its own CUDA context) is kept free: the ASR utilization is lowered so that both fit in
  what is free. `aligner_plan` then says how the aligner loads once the ASR model serves.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qwenasr_appliance.config import Settings
from qwenasr_appliance.supervisor.probe import GpuInfo, VramProbe

PlanEngine = Literal["vllm", "cpu"]
PlanDType = Literal["bfloat16", "float16", "float32"]
Quantization = Literal["bitsandbytes"]

GIB = 1024**3
# Weights in bf16, audio encoder included (safetensors sizes of the published checkpoints, rounded up).
MODEL_WEIGHT_BYTES = {"0.6B": 1_900_000_000, "1.7B": 4_700_000_000}
WORKING_MARGIN_BYTES = 2 * GIB  # activations, CUDA graphs and a minimal KV cache
HEADROOM = 1.25  # "comfortably fits": 25% above weights plus margin
CONTEXT_RESERVE_BYTES = 768 * 1024**2  # the CUDA context vLLM's worker creates before its memory check
LOWER_UTIL_FACTOR = 0.8
MIN_UTIL = 0.05

# Why float16 is avoided for Qwen3-ASR on the GPU (docs/accuracy.md, float16).
FLOAT16_RISK = "the Qwen3 decoder is reported to produce garbage in float16 (FunASR, a GGUF port)"
_DTYPE_TAGS: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_SIZE_PATTERN = re.compile(r"(?<![\d.])(0\.6|1\.7)\s*b(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Plan:
    """One way to load the model."""

    name: str
    engine: PlanEngine
    dtype: PlanDType
    quantization: Quantization | None
    gpu_memory_utilization: float | None
    reason: str

    @property
    def variant(self) -> tuple[str, str, str | None]:
        """What a load failure of kind import/unsupported depends on (not the memory settings)."""
        return (self.engine, self.dtype, self.quantization)


class NoPlanError(ValueError):
    """No plan can work with these settings on this machine; the message says why."""


@dataclass(frozen=True)
class WeightEstimate:
    bf16_bytes: int
    source: str


def estimate_weights(model_id: str) -> WeightEstimate:
    """The model's bf16 weight bytes from a local checkpoint's files, else from the size in its name."""
    path = Path(model_id)
    if path.is_dir():
        measured = _local_weight_bytes(path)
        if measured:
            return WeightEstimate(measured, f"safetensors files in {model_id}")
    for candidate in (model_id, _name_from_config(path)):
        match = _SIZE_PATTERN.search(candidate or "")
        if match:
            size = f"{match.group(1)}B"
            return WeightEstimate(MODEL_WEIGHT_BYTES[size], f"a {size} model, from its name")
    return WeightEstimate(MODEL_WEIGHT_BYTES["1.7B"], "unknown size; assumed 1.7B")


def _local_weight_bytes(path: Path) -> int:
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
            if isinstance(total, int) and total > 0:
                return total
        return sum(file.stat().st_size for file in path.glob("*.safetensors"))
    except (OSError, ValueError, AttributeError):
        return 0


def _name_from_config(path: Path) -> str | None:
    """`_name_or_path` of a local checkpoint's config.json, which often keeps the hub name."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def plan_chain(settings: Settings, probe: VramProbe, *, vllm_available: bool, cpu_available: bool) -> list[Plan]:
    """The plans to try in order. Raises `NoPlanError` when there is none."""
    if settings.engine == "cpu":
        if not cpu_available:
            raise NoPlanError("ENGINE=cpu but the CPU engine (qwen-asr) is not installed")
        return [_cpu_plan(settings, "ENGINE=cpu")]
    gpu_plans, why_no_gpu = _gpu_plans(settings, probe, vllm_available)
    if settings.engine == "vllm":
        if not gpu_plans:
            raise NoPlanError(f"ENGINE=vllm but {why_no_gpu}")
        return gpu_plans
    if not cpu_available:
        if not gpu_plans:
            raise NoPlanError(f"{why_no_gpu}, and the CPU engine (qwen-asr) is not installed")
        return gpu_plans
    cpu_reason = "last resort after the GPU plans" if gpu_plans else f"{why_no_gpu}; serving on CPU"
    return [*gpu_plans, _cpu_plan(settings, cpu_reason)]


def _cpu_plan(settings: Settings, reason: str) -> Plan:
    dtype: PlanDType = "float32" if settings.dtype == "auto" else settings.dtype
    return Plan(f"cpu-{dtype}", "cpu", dtype, None, None, reason)


def _gpu_plans(settings: Settings, probe: VramProbe, vllm_available: bool) -> tuple[list[Plan], str]:
    """vLLM plans, or none and why."""
    gpu = probe.first
    if gpu is None:
        return [], f"no GPU is visible ({probe.why_none or 'NVML found none'})"
    if not vllm_available:
        return [], f"a GPU is visible ({gpu.name}) but vLLM is not installed"
    util, util_reason = _usable_util(settings.gpu_memory_utilization, gpu, _aligner_reserve(settings, gpu))
    if util < MIN_UTIL:
        return [], (f"GPU {gpu.index} ({gpu.name}) has only {_gib(gpu.free_bytes)} free of {_gib(gpu.total_bytes)}")
    weights = estimate_weights(settings.model_id)
    budget = util * gpu.total_bytes
    dtype, dtype_reason = _gpu_dtype(settings, gpu, weights, budget)
    need = weights.bf16_bytes * (2 if dtype == "float32" else 1) + WORKING_MARGIN_BYTES
    fits = f"{_gib(need)} needed (weights: {weights.source}), {_gib(budget)} usable at utilization {util:.2f}"

    # (4-bit?, why) in the order to try at `util`.
    variants: list[tuple[bool, str]]
    if settings.quant_mode == "none":
        variants = [(False, "QUANT_MODE=none")]
    elif settings.quant_mode == "bnb-4bit":
        variants = [(True, "QUANT_MODE=bnb-4bit"), (False, "fallback when 4-bit loading fails")]
    elif budget >= need * HEADROOM:
        variants = [
            (False, f"QUANT_MODE=auto, fits comfortably: {fits}"),
            (True, "fallback: smaller weights"),
        ]
    else:
        variants = [(True, f"QUANT_MODE=auto, tight memory: {fits}"), (False, "fallback when 4-bit fails")]
    plans = [
        _vllm_plan(settings, dtype, bnb, util, "; ".join(r for r in (why, util_reason, dtype_reason) if r))
        for bnb, why in variants
    ]
    lower = _floor_util(util * LOWER_UTIL_FACTOR)
    if lower >= MIN_UTIL:
        lightest_is_4bit = settings.quant_mode != "none"
        plans.append(
            _vllm_plan(
                settings,
                dtype,
                lightest_is_4bit,
                lower,
                "; ".join(
                    r
                    for r in (
                        f"last GPU fallback: utilization lowered to {lower:.2f} to leave room outside vLLM's budget",
                        dtype_reason,
                    )
                    if r
                ),
            )
        )
    return plans, ""


def _vllm_plan(settings: Settings, dtype: PlanDType, bnb: bool, util: float, reason: str) -> Plan:
    tag = _DTYPE_TAGS[dtype]
    name = f"vllm-{tag}"
    if bnb:
        name = "vllm-bnb-4bit" if dtype == "bfloat16" else f"vllm-bnb-4bit-{tag}"
    if not math.isclose(util, settings.gpu_memory_utilization):
        name += f"-util{util:.2f}"
    return Plan(name, "vllm", dtype, "bitsandbytes" if bnb else None, util, reason)


def _aligner_reserve(settings: Settings, gpu: GpuInfo) -> int:
    """GPU memory kept free for the forced aligner's own vLLM engine (0 without an aligner)."""
    if not settings.aligner_model_id:
        return 0
    return int(settings.aligner_gpu_memory_utilization * gpu.total_bytes) + CONTEXT_RESERVE_BYTES


def _usable_util(configured: float, gpu: GpuInfo, reserved: int = 0) -> tuple[float, str]:
    """The configured utilization, or the one that fits the memory that is free, and why.

    `reserved` bytes of the free memory are kept for the forced aligner.
    """
    available = gpu.free_bytes - CONTEXT_RESERVE_BYTES - reserved
    if configured * gpu.total_bytes <= available:
        return configured, ""
    lowered = max(0.0, _floor_util(available / gpu.total_bytes))
    held = gpu.total_bytes - gpu.free_bytes
    aligner = f", {_gib(reserved)} kept for the forced aligner" if reserved else ""
    return lowered, (
        f"GPU_MEMORY_UTILIZATION={configured:.2f} needs {_gib(configured * gpu.total_bytes)} but only "
        f"{_gib(gpu.free_bytes)} of {_gib(gpu.total_bytes)} is free ({_gib(held)} held by other processes{aligner}); "
        f"utilization lowered to {lowered:.2f}"
    )


def aligner_plan(settings: Settings, asr_plan: Plan, probe: VramProbe) -> Plan:
    """How the forced aligner loads, next to the ASR model that serves with `asr_plan`.

    It follows the ASR engine: vLLM's forced-aligner model beside a vLLM plan (with
    `ALIGNER_GPU_MEMORY_UTILIZATION`, lowered to what is free now), the qwen-asr package beside the CPU
    engine. Raises `NoPlanError` when the GPU has no room left for it.
    """
    if asr_plan.engine == "cpu":
        return Plan(f"aligner-cpu-{asr_plan.dtype}", "cpu", asr_plan.dtype, None, None, "the ASR model runs on the CPU")
    dtype: PlanDType = asr_plan.dtype
    gpu = probe.first
    configured = settings.aligner_gpu_memory_utilization
    util, reason = configured, "ALIGNER_GPU_MEMORY_UTILIZATION"
    if gpu is not None:
        util, lowered = _usable_util(configured, gpu)
        if util < MIN_UTIL:
            raise NoPlanError(
                f"no room for the forced aligner: GPU {gpu.index} ({gpu.name}) has {_gib(gpu.free_bytes)} free "
                f"of {_gib(gpu.total_bytes)} after the ASR model loaded; lower GPU_MEMORY_UTILIZATION"
            )
        if lowered:
            reason = lowered.replace("GPU_MEMORY_UTILIZATION", "ALIGNER_GPU_MEMORY_UTILIZATION", 1)
    name = f"aligner-vllm-{_DTYPE_TAGS[dtype]}"
    if not math.isclose(util, configured):
        name += f"-util{util:.2f}"
    return Plan(name, "vllm", dtype, None, util, reason)


def _floor_util(value: float) -> float:
    """Round a utilization down to 2 decimals (0.7 x 0.8 is 0.56, not 0.55 from 55.999...)."""
    return math.floor(value * 100 + 1e-6) / 100


def _gpu_dtype(settings: Settings, gpu: GpuInfo, weights: WeightEstimate, budget: float) -> tuple[PlanDType, str]:
    """The GPU plans' dtype, and why when it is not the plain choice (bf16, or what `DTYPE` says).

    Before Ampere there is no bf16. Qwen3 decoders are reported to produce garbage in float16 (FunASR's
    port, a GGUF port: activations overflow float16's range), so `DTYPE=auto` takes float32 there when its
    weights (twice bf16's) and the working margin fit, and float16 with a warning in the reason only when
    they do not (a smaller KV cache costs an ASR model little: its sequences are short).
    """
    if settings.dtype == "float16":
        return "float16", f"warning: DTYPE=float16 was asked for; {FLOAT16_RISK}"
    if settings.dtype != "auto":
        return settings.dtype, ""
    if gpu.supports_bfloat16:
        return "bfloat16", ""
    no_bf16 = f"GPU {gpu.index} ({gpu.name}, compute capability {_capability(gpu)}) has no bfloat16"
    need = 2 * weights.bf16_bytes + WORKING_MARGIN_BYTES
    if budget >= need:
        return "float32", f"float32: {no_bf16}, and {FLOAT16_RISK}"
    return "float16", (
        f"warning: float16: {no_bf16} and float32 does not fit ({_gib(need)} needed, {_gib(budget)} usable); "
        f"{FLOAT16_RISK}"
    )


def _capability(gpu: GpuInfo) -> str:
    return ".".join(map(str, gpu.compute_capability)) if gpu.compute_capability else "unknown"


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"
