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

# The languages Qwen3-ForcedAligner-0.6B is trained for (its model card; qwen-asr reads them from the
# model's config through `get_supported_languages`), as the model's canonical names (`languages.py`).
# Text in any other language is not aligned: the pipeline leaves its words out (`aligner_supports`).
ALIGNER_LANGUAGES: frozenset[str] = frozenset(
    {
        "Chinese",
        "English",
        "Cantonese",
        "French",
        "German",
        "Italian",
        "Japanese",
        "Korean",
        "Portuguese",
        "Russian",
        "Spanish",
    }
)


def aligner_supports(language: str) -> bool:
    """True when the forced aligner is trained for `language` (a canonical model name)."""
    return language in ALIGNER_LANGUAGES


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
    then no unit starts before the one before it ends, and every end is at least its start. The aligner's own times are monotonic already (it repairs them), but padding, rounding
    and chunk edges can still nudge a time outside its chunk or behind its predecessor.

    Finally no unit keeps zero length (`end == start`, which the aligner gives when it puts several
    units at one instant): see `spread_instants`.
    """
    merged: list[AlignedUnit] = []
    last_end = 0.0
    total = max(0.0, duration)
    for chunk in sorted(chunks, key=lambda c: c.offset):
        low = min(max(0.0, chunk.offset), total)
        high = min(max(low, chunk.offset + chunk.duration), total)
        for unit in chunk.units:
            start = min(max(chunk.offset + unit.start, low), high)
            end = min(max(chunk.offset + unit.end, low), high)
            start = max(start, last_end)  # units never overlap
            end = max(end, start)
            merged.append(AlignedUnit(unit.text, start, end))
            last_end = end
    return spread_instants(merged, total)


MAX_SPREAD_SECONDS = 0.3  # a zero-length unit gets at most this much time (about one short word)


def spread_instants(units: Sequence[AlignedUnit], duration: float) -> list[AlignedUnit]:
    """Give every zero-length unit of a well-formed list (non-decreasing, within [0, `duration`]) a
    share of time, keeping the list well-formed and every other unit's times unless stated.

    A run of consecutive zero-length units at one instant takes equal shares, of at most
    `MAX_SPREAD_SECONDS` each, of the room after that instant up to the next unit's start (`duration`
    at the end), or when there is none, of the room before it back to the previous unit's end (0 at the
    start), ending at the instant. Without room on either side (the run touches both neighbours), the unit before gives up the second half of its span, or when
    there is none, the unit after its first half. Only when every unit has zero length and there is no
    room around them (a recording of zero duration) do they stay as they are.
    """
    out = list(units)
    index = 0
    while index < len(out):
        if out[index].end > out[index].start:
            index += 1
            continue
        stop = index
        while stop < len(out) and out[stop].end <= out[stop].start == out[index].start:
            stop += 1
        count = stop - index
        instant = out[index].start
        after = out[stop].start if stop < len(out) else max(duration, instant)
        before = out[index - 1].end if index else 0.0
        if after > instant:  # room after the instant: the run starts there
            low, high = instant, min(after, instant + MAX_SPREAD_SECONDS * count)
        elif instant > before:  # room before it: the run ends there
            low, high = max(before, instant - MAX_SPREAD_SECONDS * count), instant
        elif index and out[index - 1].end > out[index - 1].start:  # the unit before gives up half its span
            previous = out[index - 1]
            low, high = max((previous.start + previous.end) / 2, instant - MAX_SPREAD_SECONDS * count), instant
            out[index - 1] = AlignedUnit(previous.text, previous.start, low)
        elif stop < len(out) and out[stop].end > out[stop].start:  # ... or the unit after, half of its own
            following = out[stop]
            low, high = instant, min((following.start + following.end) / 2, instant + MAX_SPREAD_SECONDS * count)
            out[stop] = AlignedUnit(following.text, high, following.end)
        else:
            low = high = instant
        bounds = [low + (high - low) * k / count for k in range(count)] + [high]
        for offset in range(count):
            unit = out[index + offset]
            out[index + offset] = AlignedUnit(unit.text, bounds[offset], bounds[offset + 1])
        index = stop
    return out


__all__ = [
    "ALIGNER_LANGUAGES",
    "MAX_ALIGN_SECONDS",
    "AlignedChunk",
    "AlignedUnit",
    "Aligner",
    "AlignerDeadError",
    "AlignerDescription",
    "AlignerError",
    "AlignerRequestError",
    "aligner_supports",
    "check_align_input",
    "merge_chunks",
    "spread_instants",
]
