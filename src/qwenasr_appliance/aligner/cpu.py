"""CPU aligner: `qwen_asr.Qwen3ForcedAligner` (the `qwen-asr` package's transformers code), one alignment
at a time on a worker thread.

The package does everything between text and times itself (splitting into units, the prompt with
timestamp slots, one forward pass, the repair of non-monotonic predictions), so this class only moves
the work off the event loop and turns failures into the aligner's errors. torch and qwen_asr are
imported inside `load`, so this module imports without them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from qwenasr_appliance.aligner.base import (
    AlignedUnit,
    AlignerDeadError,
    AlignerDescription,
    AlignerRequestError,
    check_align_input,
)
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.audio.split import pad_to_min
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import EngineLoadError
from qwenasr_appliance.engines.cpu.loading import CPU_DTYPES, load_failure_kind, load_on_own_thread, model_location

log = logging.getLogger(__name__)

# The Whisper feature extractor needs some audio; shorter chunks are padded with silence at the end.
_MIN_AUDIO_SECONDS = 0.5
_WARM_UP_SECONDS = 1.0


class CPUAligner:
    """Qwen3-ForcedAligner on the CPU through transformers."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model_id = settings.aligner_model_id
        self._dtype_name = CPU_DTYPES[settings.dtype]
        self._executor: ThreadPoolExecutor | None = None
        self._aligner: Any = None  # qwen_asr.Qwen3ForcedAligner
        self._details: dict[str, str | int | float | bool | None] = {}

    async def load(self) -> None:
        if self._aligner is not None:
            return
        self._executor = await load_on_own_thread(self._load_blocking, "cpu-aligner")

    def _load_blocking(self) -> None:
        location = model_location(self._model_id)
        try:
            import torch
            from qwen_asr import Qwen3ForcedAligner
        except ImportError as exc:
            raise EngineLoadError("import", f"the CPU aligner needs qwen-asr and torch: {exc}") from exc
        try:
            aligner = Qwen3ForcedAligner.from_pretrained(
                location, device_map="cpu", dtype=getattr(torch, self._dtype_name)
            )
        except AttributeError as exc:
            if "timestamp_" not in str(exc):
                raise EngineLoadError("other", f"loading the aligner {self._model_id!r} failed: {exc}") from exc
            raise EngineLoadError("unsupported", self._not_an_aligner()) from exc
        except Exception as exc:
            kind = load_failure_kind(exc)
            raise EngineLoadError(kind, f"loading the aligner {self._model_id!r} failed ({kind}): {exc}") from exc
        if "forced_aligner" not in str(getattr(aligner.model.config.thinker_config, "model_type", "")):
            raise EngineLoadError("unsupported", self._not_an_aligner())
        self._aligner = aligner
        try:
            self._align_blocking(np.zeros(int(_WARM_UP_SECONDS * SAMPLE_RATE), dtype=np.float32), "warm up", "English")
        except Exception as exc:
            self._aligner = None
            kind = load_failure_kind(exc)
            raise EngineLoadError(kind, f"warm-up of the aligner {self._model_id!r} failed: {exc}") from exc
        self._details = {
            "timestamp_segment_ms": float(aligner.timestamp_segment_time),
            "torch_threads": torch.get_num_threads(),
        }

    def _not_an_aligner(self) -> str:
        return (
            f"{self._model_id!r} is not a Qwen3-ForcedAligner checkpoint (no timestamp classifier: "
            "a Qwen3-ASR model?); ALIGNER_MODEL_ID must name one such as Qwen/Qwen3-ForcedAligner-0.6B"
        )

    def _align_blocking(self, audio: AudioArray, text: str, language: str) -> list[AlignedUnit]:
        results = self._aligner.align(
            audio=(pad_to_min(audio, _MIN_AUDIO_SECONDS), SAMPLE_RATE), text=text, language=language
        )
        return [AlignedUnit(str(item.text), float(item.start_time), float(item.end_time)) for item in results[0]]

    async def align(self, audio: AudioArray, text: str, language: str) -> list[AlignedUnit]:
        check_align_input(audio)
        executor = self._executor
        if executor is None or self._aligner is None:
            raise AlignerDeadError("the CPU aligner is not loaded")
        if not text.strip():
            return []
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self._align_blocking, audio, text, language or "")
        except RuntimeError as exc:
            if "cannot schedule new futures after shutdown" in str(exc):
                raise AlignerDeadError("the CPU aligner was closed") from exc
            raise AlignerRequestError(f"CPU alignment failed: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            raise AlignerRequestError(f"CPU alignment failed: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._aligner = None
        gc.collect()

    def describe(self) -> AlignerDescription:
        return AlignerDescription(
            name="cpu", model=self._model_id, device="cpu", dtype=self._dtype_name, details=dict(self._details)
        )
