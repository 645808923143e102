"""Turning a plan into an (unloaded) engine.

The engine modules are imported lazily: the GPU image has no qwen-asr and the CPU image has no vLLM,
and importing vLLM takes seconds. A failed import is a load failure of kind "import", so the
supervisor moves on to the next plan.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from qwenasr_appliance.aligner.base import Aligner
from qwenasr_appliance.config import Settings, replace
from qwenasr_appliance.engines.base import Engine, EngineLoadError
from qwenasr_appliance.supervisor.plans import Plan
from qwenasr_appliance.supervisor.probe import gpu_name, used_vram_bytes

EngineFactory = Callable[[Plan, Settings], Engine]
AlignerFactory = Callable[[Plan, Settings], Aligner]

ENGINE_CLASSES: dict[str, tuple[str, str]] = {
    "vllm": ("qwenasr_appliance.engines.vllm.engine", "VLLMEngine"),
    "cpu": ("qwenasr_appliance.engines.cpu.engine", "CPUEngine"),
}
ALIGNER_CLASSES: dict[str, tuple[str, str]] = {
    "vllm": ("qwenasr_appliance.aligner.vllm", "VLLMAligner"),
    "cpu": ("qwenasr_appliance.aligner.cpu", "CPUAligner"),
}


def import_engine_class(plan: Plan, classes: dict[str, tuple[str, str]] | None = None) -> type:
    """The engine class for `plan` (from `classes`, default `ENGINE_CLASSES`); raises
    `EngineLoadError("import", ...)` when it cannot be imported."""
    module_name, class_name = (ENGINE_CLASSES if classes is None else classes)[plan.engine]
    try:
        module = importlib.import_module(module_name)
        engine_class = getattr(module, class_name)
    except (ImportError, AttributeError) as exc:
        raise EngineLoadError("import", f"cannot import {module_name}.{class_name}: {exc}") from exc
    return cast(type, engine_class)


def default_engine_factory(plan: Plan, settings: Settings) -> Engine:
    """`VLLMEngine(settings, plan)` or `CPUEngine(settings)` with the plan's dtype."""
    engine_class = import_engine_class(plan)
    if plan.engine == "vllm":
        return cast(Engine, engine_class(settings, plan, vram_probe=used_vram_bytes, gpu_name=gpu_name))
    return cast(Engine, engine_class(replace(settings, dtype=plan.dtype)))


def default_aligner_factory(plan: Plan, settings: Settings) -> Aligner:
    """`VLLMAligner(settings, plan)` or `CPUAligner(settings)` with the plan's dtype."""
    aligner_class = import_engine_class(plan, ALIGNER_CLASSES)
    if plan.engine == "vllm":
        return cast(Aligner, aligner_class(settings, plan))
    return cast(Aligner, aligner_class(replace(settings, dtype=plan.dtype)))
