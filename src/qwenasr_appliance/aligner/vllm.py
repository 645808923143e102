"""GPU aligner: Qwen3-ForcedAligner on vLLM's native forced-aligner model (a pooling model).

vLLM 0.26 serves the aligner as `Qwen3ASRForcedAlignerForTokenClassification`: the Qwen3-ASR audio
encoder and decoder with the checkpoint's `thinker.lm_head` loaded as a `classify_num`-way classifier
over time bins. It runs on the pooling runner (`runner="pooling"`, the architecture chosen through
`hf_overrides`, as vLLM's own forced-alignment example does) and answers `AsyncLLM.encode(...)` with one
row of class scores per prompt token. One alignment:

1. `aligner.text.split_units` cuts the transcript into the aligner's units and `build_align_prompt`
   writes `<|audio_start|><|audio_pad|><|audio_end|>unit<timestamp><timestamp>...`; vLLM's Qwen3-ASR
   processor expands the audio placeholder, in its renderer threads (`renderer.render_cmpl_async`,
   off the event loop, as the ASR engine does).
2. `encode` with `PoolingParams(task="token_classify", step_tag_id=<timestamp id>,
   use_activation=False)`. The engine is started with STEP token pooling, so vLLM returns only the
   rows of the `<timestamp>` slots (2 per unit) instead of every prompt token: about a fifth of the
   data (each row is `classify_num` floats, 5000 for the released model) crosses from the engine core.
   Without the activation the rows are logits; the argmax is the same.
3. The argmax of each row is a time bin; bins x `timestamp_segment_time` ms go through the package's
   repair (`fix_timestamps`) and become seconds.

The engine: its own `AsyncLLM` (its own engine-core process) next to the ASR engine's, with
`ALIGNER_GPU_MEMORY_UTILIZATION` of the GPU (the supervisor lowers it to what is free), eager mode
(alignment is one prefill per chunk, where CUDA graphs gain little and cost start-up time), no prefix
caching, and no Prometheus stat logger: vLLM's logger would unregister the ASR engine's `vllm:*`
metrics, which share the process's registry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from qwenasr_appliance.aligner.base import (
    AlignedUnit,
    AlignerDeadError,
    AlignerDescription,
    AlignerError,
    AlignerRequestError,
    check_align_input,
)
from qwenasr_appliance.aligner.text import build_align_prompt, split_units, units_from_bins
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.config import MAX_ALIGN_SECONDS
from qwenasr_appliance.engines.base import EngineDeadError, EngineLoadError
from qwenasr_appliance.engines.vllm.common import LLMFactory, OutputTap, ParamsFactory, audio_tokens, round_model_len
from qwenasr_appliance.engines.vllm.errors import classify_load_failure, map_request_error
from qwenasr_appliance.engines.vllm.lifecycle import attr, build_llm, import_vllm, release_llm

if TYPE_CHECKING:
    from qwenasr_appliance.config import Settings
    from qwenasr_appliance.engines.vllm.common import PlanLike

ARCHITECTURE: Final = "Qwen3ASRForcedAlignerForTokenClassification"
# Prompt tokens per aligned unit: the unit itself (a CJK character or a short word is one or two tokens;
# some characters take three bytes-tokens) plus its two <timestamp> slots. Units per output token: a
# Chinese token often holds two characters, each of which is a unit.
TOKENS_PER_OUTPUT_TOKEN: Final = 8
PROMPT_OVERHEAD_TOKENS: Final = 16
MAX_NUM_SEQS: Final = 64
WARMUP_SECONDS: Final = 1.0


# -- pure helpers (unit-tested without vLLM) ------------------------------------------------------


def derive_max_model_len(settings: Settings) -> int:
    """Room for the longest chunk's audio tokens and the transcript of `MAX_NEW_TOKENS` tokens."""
    seconds = min(settings.chunk_seconds, MAX_ALIGN_SECONDS)
    need = audio_tokens(seconds) + PROMPT_OVERHEAD_TOKENS + TOKENS_PER_OUTPUT_TOKEN * settings.max_new_tokens
    return round_model_len(need)


def build_aligner_engine_args(settings: Settings, plan: PlanLike) -> dict[str, Any]:
    """Keyword arguments of vLLM's `AsyncEngineArgs` for the aligner."""
    util = plan.gpu_memory_utilization
    max_model_len = derive_max_model_len(settings)
    return {
        "model": settings.aligner_model_id,
        "runner": "pooling",
        "hf_overrides": {"architectures": [ARCHITECTURE]},
        "pooler_config": {"tok_pooling_type": "STEP"},
        "dtype": plan.dtype,
        "gpu_memory_utilization": settings.aligner_gpu_memory_utilization if util is None else util,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max(max_model_len, 8192),
        "max_num_seqs": MAX_NUM_SEQS,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "limit_mm_per_prompt": {"audio": 1},
        "mm_processor_cache_gb": 0.0,
        "disable_log_stats": True,
        "enable_log_requests": False,
        "trust_remote_code": False,
        "seed": 0,
    }


def build_pooling_kwargs(timestamp_token_id: int) -> dict[str, Any]:
    """Keyword arguments of vLLM's `PoolingParams` for one alignment."""
    return {"task": "token_classify", "use_activation": False, "step_tag_id": timestamp_token_id}


def timestamp_bins(rows: Any, prompt_token_ids: Sequence[int], timestamp_token_id: int) -> list[int]:
    """The predicted time bin of each `<timestamp>` slot.

    `rows` (a [n, classify_num] tensor or array) holds one row per slot with STEP pooling, or one per
    prompt token with ALL pooling (vLLM's default for the model): both are accepted.
    """
    data = rows.float().cpu().numpy() if hasattr(rows, "cpu") else np.asarray(rows, dtype=np.float32)
    if data.ndim != 2:
        raise AlignerRequestError(f"expected one row of class scores per token, got shape {data.shape}")
    if prompt_token_ids:  # without ids the rows are taken as STEP rows; the caller checks their count
        slots = [index for index, token in enumerate(prompt_token_ids) if token == timestamp_token_id]
        if data.shape[0] == len(prompt_token_ids) and data.shape[0] != len(slots):
            data = data[slots]
        elif data.shape[0] != len(slots):
            raise AlignerRequestError(
                f"vLLM returned {data.shape[0]} rows for a prompt of {len(prompt_token_ids)} tokens "
                f"with {len(slots)} timestamp slots"
            )
    return [int(b) for b in data.argmax(axis=-1).tolist()]


def timestamp_config(hf_config: Any) -> tuple[int, float]:
    """(timestamp token id, ms per bin) from the checkpoint's config; `EngineLoadError` when absent."""
    token_id = getattr(hf_config, "timestamp_token_id", None)
    segment = getattr(hf_config, "timestamp_segment_time", None)
    if token_id is None or segment is None:
        raise EngineLoadError(
            "unsupported",
            "the aligner checkpoint has no timestamp_token_id / timestamp_segment_time: "
            "ALIGNER_MODEL_ID must name a Qwen3-ForcedAligner model",
        )
    return int(token_id), float(segment)


# -- vLLM glue ---------------------------------------------------------------------------------------


def _default_llm_factory(engine_kwargs: dict[str, Any]) -> Any:
    from vllm.config import PoolerConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = dict(engine_kwargs)
    if isinstance(kwargs.get("pooler_config"), dict):
        kwargs["pooler_config"] = PoolerConfig(**kwargs["pooler_config"])
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), usage_context=UsageContext.OPENAI_API_SERVER)


def _default_params_factory(kwargs: dict[str, Any]) -> Any:
    from vllm.pooling_params import PoolingParams

    return PoolingParams(**kwargs)


class VLLMAligner:
    """Qwen3-ForcedAligner on vLLM's `AsyncLLM` (pooling runner). Implements `aligner.base.Aligner`.

    `llm_factory` and `params_factory` default to vLLM's own and exist so tests run without vLLM.
    """

    def __init__(
        self,
        settings: Settings,
        plan: PlanLike,
        *,
        llm_factory: LLMFactory | None = None,
        params_factory: ParamsFactory | None = None,
    ) -> None:
        self._settings = settings
        self._plan = plan
        self._llm_factory = llm_factory
        self._params_factory = params_factory or _default_params_factory
        self._capture_output = llm_factory is None  # vLLM's own engine core: keep its output's tail
        self._engine_args = build_aligner_engine_args(settings, plan)
        self._llm: Any = None
        self._tap: OutputTap | None = None
        self._timestamp_token_id = -1
        self._segment_ms = 0.0
        self._active: set[str] = set()
        self._closed = False

    @property
    def engine_args(self) -> dict[str, Any]:
        return dict(self._engine_args)

    async def load(self) -> None:
        if self._closed:
            raise EngineLoadError("other", "this aligner was closed; make a new one")
        if self._llm is not None:
            return
        factory = self._llm_factory
        if factory is None:
            await asyncio.to_thread(import_vllm)
            factory = _default_llm_factory
        tap = OutputTap() if self._capture_output else None
        self._tap = tap
        llm = await build_llm(factory, self._engine_args, tap)
        self._llm = llm
        try:
            self._timestamp_token_id, self._segment_ms = timestamp_config(
                attr(llm, "vllm_config.model_config.hf_config")
            )
            await self.align(np.zeros(int(WARMUP_SECONDS * SAMPLE_RATE), dtype=np.float32), "warm up", "English")
        except asyncio.CancelledError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            if isinstance(exc, EngineLoadError):
                raise
            raise classify_load_failure(exc, tap.text() if tap else "") from exc

    async def align(self, audio: AudioArray, text: str, language: str) -> list[AlignedUnit]:
        check_align_input(audio)
        llm = self._llm
        if llm is None:
            raise AlignerDeadError("the vLLM aligner is closed" if self._closed else "the vLLM aligner is not loaded")
        if getattr(llm, "errored", False):
            raise AlignerDeadError("the vLLM aligner's engine core is dead")
        units = split_units(text, language)
        if not units:
            return []
        request_id = f"align-{uuid.uuid4().hex}"
        samples = np.ascontiguousarray(audio, dtype=np.float32)
        prompt = {"prompt": build_align_prompt(units), "multi_modal_data": {"audio": (samples, SAMPLE_RATE)}}
        self._active.add(request_id)
        final: Any = None
        try:
            engine_input = await self._render(llm, prompt)
            params = self._params_factory(build_pooling_kwargs(self._timestamp_token_id))
            async for output in llm.encode(engine_input, params, request_id):
                final = output
            if final is None or not getattr(final, "finished", True):
                raise AlignerRequestError(f"vLLM ended alignment {request_id!r} without a result")
            rows, token_ids = final.outputs.data, list(final.prompt_token_ids or [])
            return await asyncio.to_thread(self._units, units, rows, token_ids)
        except AlignerError:
            raise
        except Exception as exc:
            error = map_request_error(exc, engine_errored=bool(getattr(llm, "errored", False)))
            if isinstance(error, EngineDeadError):
                raise AlignerDeadError(f"the vLLM aligner died: {error}") from exc
            raise AlignerRequestError(f"alignment failed: {error}") from exc
        finally:
            self._active.discard(request_id)

    def _units(self, units: list[str], rows: Any, token_ids: list[int]) -> list[AlignedUnit]:
        bins = timestamp_bins(rows, token_ids, self._timestamp_token_id)
        try:
            return units_from_bins(units, bins, self._segment_ms)
        except ValueError as exc:
            raise AlignerRequestError(str(exc)) from exc

    async def _render(self, llm: Any, prompt: dict[str, Any]) -> Any:
        render = getattr(getattr(llm, "renderer", None), "render_cmpl_async", None)
        if render is None:
            return prompt
        rendered = await render([prompt])
        return rendered[0]

    def _take_llm(self) -> Any:
        llm, self._llm = self._llm, None
        return llm

    async def close(self) -> None:
        self._closed = True
        await release_llm(self._take_llm, self._active)

    def describe(self) -> AlignerDescription:
        model_config = attr(self._llm, "vllm_config.model_config")
        dtype = str(getattr(model_config, "dtype", None) or self._plan.dtype).removeprefix("torch.")
        details: dict[str, str | int | float | bool | None] = {
            "plan": self._plan.name,
            "gpu_memory_utilization": float(self._engine_args["gpu_memory_utilization"]),
            "max_model_len": int(self._engine_args["max_model_len"]),
            "timestamp_segment_ms": self._segment_ms,
        }
        return AlignerDescription(name="vllm", model=self._settings.aligner_model_id, device="cuda:0",
                                  dtype=dtype, details=details)  # fmt: skip


__all__ = [
    "ARCHITECTURE",
    "VLLMAligner",
    "build_aligner_engine_args",
    "build_pooling_kwargs",
    "derive_max_model_len",
    "timestamp_bins",
    "timestamp_config",
]
