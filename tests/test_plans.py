"""The plan chain: which ways of loading the model are tried, in which order, and why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwenasr_appliance.config import Settings
from qwenasr_appliance.supervisor.plans import (
    MODEL_WEIGHT_BYTES,
    NoPlanError,
    Plan,
    estimate_weights,
    plan_chain,
)
from qwenasr_appliance.supervisor.probe import GpuInfo, VramProbe

GIB = 1024**3
SMALL = "Qwen/Qwen3-ASR-0.6B"
LARGE = "Qwen/Qwen3-ASR-1.7B"


def gpu_probe(total_gib: float, free_gib: float | None = None, capability: tuple[int, int] = (9, 0)) -> VramProbe:
    """One GPU; an idle card shows ~0.4 GiB used by the driver."""
    total = int(total_gib * GIB)
    free = int((total_gib - 0.4 if free_gib is None else free_gib) * GIB)
    return VramProbe(gpus=(GpuInfo(0, f"GPU {total_gib:g}G", total, free, total - free, "GPU-x", capability),))


NO_GPU = VramProbe(no_gpu="no NVIDIA driver (Driver Not Loaded)")


def chain(probe: VramProbe, *, vllm: bool = True, cpu: bool = True, **settings: Any) -> list[Plan]:
    return plan_chain(Settings(**settings), probe, vllm_available=vllm, cpu_available=cpu)


def names(plans: list[Plan]) -> list[str]:
    return [plan.name for plan in plans]


# -- engine choice ---------------------------------------------------------------------------------


def test_engine_cpu_is_only_the_cpu_plan_even_with_a_gpu() -> None:
    plans = chain(gpu_probe(80), engine="cpu")
    assert plans == [Plan("cpu-float32", "cpu", "float32", None, None, "ENGINE=cpu")]


def test_engine_cpu_without_the_cpu_engine_installed() -> None:
    with pytest.raises(NoPlanError, match="ENGINE=cpu but the CPU engine"):
        chain(NO_GPU, engine="cpu", cpu=False)


def test_engine_vllm_has_no_cpu_fallback() -> None:
    plans = chain(gpu_probe(80), engine="vllm")
    assert all(plan.engine == "vllm" for plan in plans)
    assert names(plans) == ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72"]


def test_engine_vllm_without_a_gpu_or_without_vllm() -> None:
    with pytest.raises(NoPlanError, match=r"ENGINE=vllm but no GPU is visible \(no NVIDIA driver"):
        chain(NO_GPU, engine="vllm")
    with pytest.raises(NoPlanError, match=r"ENGINE=vllm but a GPU is visible .* vLLM is not installed"):
        chain(gpu_probe(80), engine="vllm", vllm=False)


def test_auto_with_a_gpu_ends_with_the_cpu_plan() -> None:
    plans = chain(gpu_probe(80))
    assert names(plans) == ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72", "cpu-float32"]
    assert plans[-1].reason == "last resort after the GPU plans"


def test_auto_without_a_gpu_serves_on_cpu_and_says_why() -> None:
    plans = chain(NO_GPU)
    assert names(plans) == ["cpu-float32"]
    assert plans[0].reason == "no GPU is visible (no NVIDIA driver (Driver Not Loaded)); serving on CPU"


def test_auto_with_a_gpu_but_no_vllm_serves_on_cpu() -> None:
    plans = chain(gpu_probe(24), vllm=False)
    assert names(plans) == ["cpu-float32"]
    assert "vLLM is not installed" in plans[0].reason


def test_auto_without_the_cpu_engine() -> None:
    assert names(chain(gpu_probe(80), cpu=False))[-1] == "vllm-bnb-4bit-util0.72"
    with pytest.raises(NoPlanError, match=r"no GPU is visible .* and the CPU engine .* is not installed"):
        chain(NO_GPU, cpu=False)


# -- quantization modes ----------------------------------------------------------------------------


def test_quant_mode_none() -> None:
    plans = chain(gpu_probe(80), quant_mode="none")
    assert names(plans) == ["vllm-bf16", "vllm-bf16-util0.72", "cpu-float32"]
    assert [plan.gpu_memory_utilization for plan in plans] == [0.9, 0.72, None]
    assert all(plan.quantization is None for plan in plans)
    assert plans[0].reason == "QUANT_MODE=none"


def test_quant_mode_bnb_4bit() -> None:
    plans = chain(gpu_probe(80), quant_mode="bnb-4bit")
    assert names(plans) == ["vllm-bnb-4bit", "vllm-bf16", "vllm-bnb-4bit-util0.72", "cpu-float32"]
    assert [plan.quantization for plan in plans] == ["bitsandbytes", None, "bitsandbytes", None]
    assert plans[0].dtype == "bfloat16"


@pytest.mark.parametrize(
    ("model", "total_gib", "expected"),
    [
        # an 8 GB card: the default 0.9 does not fit next to the CUDA context, so it is lowered
        (SMALL, 8, ["vllm-bf16-util0.85", "vllm-bnb-4bit-util0.85", "vllm-bnb-4bit-util0.68"]),
        (LARGE, 8, ["vllm-bnb-4bit-util0.85", "vllm-bf16-util0.85", "vllm-bnb-4bit-util0.68"]),
        (SMALL, 24, ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72"]),
        (LARGE, 24, ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72"]),
        (SMALL, 80, ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72"]),
        (LARGE, 80, ["vllm-bf16", "vllm-bnb-4bit", "vllm-bnb-4bit-util0.72"]),
    ],
)
def test_auto_quantization_from_card_size(model: str, total_gib: float, expected: list[str]) -> None:
    plans = chain(gpu_probe(total_gib), model_id=model, cpu=False)
    assert names(plans) == expected
    first = plans[0].reason
    assert first.startswith("QUANT_MODE=auto, " + ("tight memory" if "bnb" in expected[0] else "fits comfortably"))


@pytest.mark.parametrize(
    ("model", "held_gib", "expected_first"),
    [
        (LARGE, 19, "vllm-bnb-4bit-util0.17"),  # 5 GiB free of 24
        (SMALL, 19, "vllm-bnb-4bit-util0.17"),
        (LARGE, 14, "vllm-bf16-util0.38"),  # 10 GiB free: bf16 fits again
        (SMALL, 14, "vllm-bf16-util0.38"),
    ],
)
def test_auto_when_another_process_holds_memory(model: str, held_gib: float, expected_first: str) -> None:
    plans = chain(gpu_probe(24, free_gib=24 - held_gib), model_id=model)
    assert plans[0].name == expected_first
    assert "held by other processes" in plans[0].reason
    assert "GPU_MEMORY_UTILIZATION=0.90 needs 21.6 GiB" in plans[0].reason


def test_lowered_utilization_fits_what_is_free() -> None:
    probe = gpu_probe(80, free_gib=50)
    plans = chain(probe, quant_mode="none")
    assert names(plans) == ["vllm-bf16-util0.61", "vllm-bf16-util0.48", "cpu-float32"]
    util = plans[0].gpu_memory_utilization
    assert util is not None and util * probe.gpus[0].total_bytes < probe.gpus[0].free_bytes


def test_configured_utilization_kept_when_it_fits() -> None:
    plans = chain(gpu_probe(80, free_gib=50), quant_mode="none", gpu_memory_utilization=0.5)
    assert names(plans) == ["vllm-bf16", "vllm-bf16-util0.40", "cpu-float32"]
    assert plans[0].gpu_memory_utilization == 0.5


def test_a_full_gpu_leaves_only_the_cpu() -> None:
    plans = chain(gpu_probe(24, free_gib=1))
    assert names(plans) == ["cpu-float32"]
    assert "has only 1.0 GiB free of 24.0 GiB" in plans[0].reason
    with pytest.raises(NoPlanError, match=r"has only 1\.0 GiB free"):
        chain(gpu_probe(24, free_gib=1), engine="vllm")


def test_lower_fallback_left_out_when_too_small() -> None:
    plans = chain(gpu_probe(24, free_gib=2.1), quant_mode="none", cpu=False)  # 0.05 -> 0.04
    assert names(plans) == ["vllm-bf16-util0.05"]


def test_only_the_first_gpu_is_planned_for() -> None:
    big = gpu_probe(80).gpus[0]
    small = GpuInfo(1, "small", 8 * GIB, 1 * GIB, 7 * GIB)
    with pytest.raises(NoPlanError, match=r"GPU 1 .* has only 1\.0 GiB free of 8\.0 GiB"):
        chain(VramProbe(gpus=(small, big)), engine="vllm")
    assert chain(VramProbe(gpus=(big, small)), engine="vllm")[0].name == "vllm-bf16"


# -- dtype -----------------------------------------------------------------------------------------


def test_auto_dtype_is_float32_before_ampere_when_it_fits() -> None:
    """No bf16 before Ampere, and float16 is reported to break Qwen3's decoder: float32 when it fits."""
    plans = chain(gpu_probe(16, capability=(7, 5)), quant_mode="bnb-4bit")
    assert names(plans) == ["vllm-bnb-4bit-fp32", "vllm-fp32", "vllm-bnb-4bit-fp32-util0.72", "cpu-float32"]
    assert {plan.dtype for plan in plans[:-1]} == {"float32"}
    assert all("has no bfloat16" in plan.reason and "float16" in plan.reason for plan in plans[:-1])
    assert "compute capability 7.5" in plans[0].reason


def test_auto_dtype_falls_back_to_float16_with_a_warning_when_float32_does_not_fit() -> None:
    plans = chain(gpu_probe(10, capability=(7, 5)), model_id=LARGE, quant_mode="none")
    assert [plan.dtype for plan in plans] == ["float16", "float16", "float32"]
    assert all(plan.reason.count("warning: float16") == 1 for plan in plans[:-1])
    assert "float32 does not fit" in plans[0].reason and "garbage in float16" in plans[0].reason
    # The small model fits in float32 on the same card.
    assert chain(gpu_probe(10, capability=(7, 5)), model_id=SMALL, quant_mode="none")[0].dtype == "float32"
    # 1.7B in float32 (8.8 GiB of weights plus 2 GiB of working room) fits a 15 GiB T4 at the default 0.90.
    assert chain(gpu_probe(15, capability=(7, 5)), model_id=LARGE, quant_mode="none")[0].name == "vllm-fp32"


def test_asking_for_float16_is_honoured_with_the_warning() -> None:
    plans = chain(gpu_probe(80), dtype="float16", quant_mode="none")
    assert plans[0].name == "vllm-fp16" and "warning: DTYPE=float16" in plans[0].reason
    assert "float16" not in chain(gpu_probe(80), quant_mode="none")[0].reason  # bf16: nothing to say


def test_explicit_dtype_is_honoured_on_gpu_and_cpu() -> None:
    plans = chain(gpu_probe(80), dtype="float32", quant_mode="none")
    assert names(plans) == ["vllm-fp32", "vllm-fp32-util0.72", "cpu-float32"]
    plans = chain(gpu_probe(16, capability=(7, 5)), dtype="bfloat16", quant_mode="none")
    assert plans[0].dtype == "bfloat16"
    assert names(chain(NO_GPU, dtype="bfloat16")) == ["cpu-bfloat16"]


def test_float32_needs_twice_the_memory() -> None:
    assert chain(gpu_probe(12), model_id=LARGE)[0].name == "vllm-bf16"
    assert chain(gpu_probe(12), model_id=LARGE, dtype="float32")[0].name == "vllm-bnb-4bit-fp32"


# -- weight estimate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "size"),
    [
        ("Qwen/Qwen3-ASR-0.6B", "0.6B"),
        ("Qwen/Qwen3-ASR-1.7B", "1.7B"),
        ("someone/qwen3-asr-0.6b-finetune", "0.6B"),
        ("/models/Qwen3-ASR-1.7B-ft", "1.7B"),
    ],
)
def test_estimate_from_the_name(model_id: str, size: str) -> None:
    estimate = estimate_weights(model_id)
    assert estimate.bf16_bytes == MODEL_WEIGHT_BYTES[size]
    assert estimate.source == f"a {size} model, from its name"


def test_estimate_of_an_unknown_model_assumes_the_large_one() -> None:
    estimate = estimate_weights("someone/asr-model-10.6b")
    assert estimate.bf16_bytes == MODEL_WEIGHT_BYTES["1.7B"]
    assert estimate.source == "unknown size; assumed 1.7B"


def test_estimate_from_local_safetensors(tmp_path: Path) -> None:
    for name, size in (("model-00001.safetensors", 3_000_000), ("model-00002.safetensors", 1_000_000)):
        with (tmp_path / name).open("wb") as file:
            file.truncate(size)
    estimate = estimate_weights(str(tmp_path))
    assert estimate.bf16_bytes == 4_000_000
    assert estimate.source.startswith("safetensors files in ")


def test_estimate_from_a_local_safetensors_index(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 123456}}))
    assert estimate_weights(str(tmp_path)).bf16_bytes == 123456


def test_estimate_from_a_local_config_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "Qwen/Qwen3-ASR-0.6B"}))
    assert estimate_weights(str(tmp_path)).bf16_bytes == MODEL_WEIGHT_BYTES["0.6B"]
    (tmp_path / "config.json").write_text("not json")
    assert estimate_weights(str(tmp_path)).bf16_bytes == MODEL_WEIGHT_BYTES["1.7B"]


def test_a_tiny_local_checkpoint_gets_bf16_on_a_small_card(tmp_path: Path) -> None:
    with (tmp_path / "model.safetensors").open("wb") as file:
        file.truncate(50_000_000)
    plans = chain(gpu_probe(8), model_id=str(tmp_path), cpu=False)
    assert plans[0].name == "vllm-bf16-util0.85"
    assert "safetensors files in" in plans[0].reason


def test_plans_are_frozen_and_carry_their_variant() -> None:
    plan = chain(gpu_probe(80))[0]
    with pytest.raises(AttributeError):
        plan.name = "other"  # type: ignore[misc]
    assert plan.variant == ("vllm", "bfloat16", None)
