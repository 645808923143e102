"""The forced aligner's small protocol, the values that cross it, and the merging of aligned chunks.

A forced aligner (Qwen3-ForcedAligner-0.6B) takes one audio chunk (16 kHz mono float32, at most
`MAX_ALIGN_SECONDS`) and the text the ASR model produced for it, and returns the text's units with
their start and end times: words for space-delimited languages, single characters for Chinese (the
units the aligner itself uses; punctuation is dropped). Implementations: `aligner.cpu.CPUAligner`
(the `qwen-asr` package on the CPU) and `aligner.vllm.VLLMAligner` (vLLM's native forced-aligner model).

Load failures raise `engines.base.EngineLoadError` (with its `kind`), as engines do, so the
supervisor reports them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.config import MAX_ALIGN_SECONDS


@dataclass(frozen=True)
class AlignedUnit:
    """One aligned word (or character), times in seconds from the start of the aligned audio."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class AlignerDescription:
    """What `/status` shows about the loaded aligner."""

    name: Literal["vllm", "cpu", "test-double"]
    model: str
    device: str
    dtype: str
    details: dict[str, str | int | float | bool | None] = field(default_factory=dict)


class AlignerError(RuntimeError):
    """Base class of alignment failures (never an ASR engine failure)."""


class AlignerDeadError(AlignerError):
    """The aligner can no longer serve; the supervisor reloads it."""


class AlignerRequestError(AlignerError):
    """One alignment failed while the aligner itself stays healthy."""


@runtime_checkable
class Aligner(Protocol):
    """A forced-alignment backend."""

    async def load(self) -> None:
        """Load weights and warm up. Raises `EngineLoadError`."""

    async def align(self, audio: AudioArray, text: str, language: str) -> list[AlignedUnit]:
        """Align `text` against `audio` (at most `MAX_ALIGN_SECONDS`); `language` is the model's name
        of the language ("English", "Chinese"...) or "" when unknown. Units come in text order."""
        ...

    async def close(self) -> None:
        """Release the model and its memory. Safe to call twice."""

    def describe(self) -> AlignerDescription:
        """Facts for `/status`; valid after `load()`."""
        ...


def check_align_input(audio: AudioArray) -> float:
    """The audio's duration in seconds; raises `AlignerRequestError` when the aligner cannot take it."""
    if audio.ndim != 1:
        raise AlignerRequestError(f"expected mono audio, got shape {audio.shape}")
    seconds = float(audio.shape[0]) / SAMPLE_RATE
    if seconds > MAX_ALIGN_SECONDS + 1e-6:
        raise AlignerRequestError(
            f"the forced aligner takes at most {MAX_ALIGN_SECONDS:.0f} s of audio at once, got {seconds:.1f} s"
        )
    return seconds


@dataclass(frozen=True)
class AlignedChunk:
    """The units aligned within one chunk of a longer recording."""

    offset: float  # where the chunk starts in the recording, seconds
    duration: float  # the chunk's own length (without padding), seconds
    units: Sequence[AlignedUnit]


def merge_chunks(chunks: Sequence[AlignedChunk], duration: float) -> list[AlignedUnit]:
    """The units of every chunk on the recording's time line, in order, and always well-formed.

    Each unit is moved by its chunk's offset and kept inside its chunk and inside [0, `duration`];
    then starts and ends are made non-decreasing over the whole list, and every end is at least its
    start. The aligner's own times are monotonic already (it repairs them), but padding, rounding
    and chunk edges can still nudge a time outside its chunk or behind its predecessor.
    """
    merged: list[AlignedUnit] = []
    last_start = last_end = 0.0
    total = max(0.0, duration)
    for chunk in sorted(chunks, key=lambda c: c.offset):
        low = min(max(0.0, chunk.offset), total)
        high = min(max(low, chunk.offset + chunk.duration), total)
        for unit in chunk.units:
            start = min(max(chunk.offset + unit.start, low), high)
            end = min(max(chunk.offset + unit.end, low), high)
            start = max(start, last_start)
            end = max(end, start, last_end)
            merged.append(AlignedUnit(unit.text, start, end))
            last_start, last_end = start, end
    return merged


__all__ = [
    "MAX_ALIGN_SECONDS",
    "AlignedChunk",
    "AlignedUnit",
    "Aligner",
    "AlignerDeadError",
    "AlignerDescription",
    "AlignerError",
    "AlignerRequestError",
    "check_align_input",
    "merge_chunks",
]
