"""The one small protocol every engine implements, and the values that cross it.

An engine turns one prepared audio chunk (16 kHz mono float32, at most `CHUNK_SECONDS` long) into the
model's raw output text (`language English<asr_text>...`). Parsing that text, splitting long audio,
merging chunks and formatting responses happen outside the engines, once, for all of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from qwenasr_appliance.audio.samples import AudioArray

LoadFailureKind = Literal["import", "unsupported", "out_of_memory", "model_not_found", "other"]
# Why generation ended: the model's end token ("stop"), the `max_new_tokens` limit ("length": the chunk
# may be cut off), or the early stop of a runaway loop ("repetition").
FinishReason = Literal["stop", "length", "repetition"]


@dataclass(frozen=True)
class TranscribeOptions:
    """What a caller may steer for one chunk."""

    language: str | None = None  # canonical model name ("English"); None lets the model detect it
    context: str = ""  # the `prompt` field: biasing text placed in the system turn
    temperature: float = 0.0
    max_new_tokens: int = 512
    # True when the caller streams text to its client: the engine then reports partial output as it
    # goes. False lets an engine skip per-token work and report once, at the end.
    incremental: bool = False
    # True when the caller wants confidence (per-token log-probabilities and `no_speech_prob`): the
    # engine then asks the model for them. False keeps that work off the hot path.
    logprobs: bool = False

    # Text the assistant turn already holds, continued by the model (live re-decoding: the stable text of
    # the utterance so far, Qwen3-ASR's streaming method). The output's `raw_text` excludes it. Placed
    # after `language X<asr_text>` when `language` is set; otherwise it carries its own metadata.
    assistant_prefix: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text (as decoded alone; a piece of a multi-byte character decodes to
    U+FFFD), the natural-log probability the model gave it, before temperature, and the bytes it stands
    for (`raw`: for such a piece its own bytes, not the UTF-8 of U+FFFD; see `engines/token_bytes.py`)."""

    token: str
    logprob: float
    raw: bytes


@dataclass(frozen=True)
class EngineOutput:
    """Raw model output for one chunk, cumulative when streamed.

    The finished output (`finished=True`) also says why generation ended and, when
    `TranscribeOptions.logprobs` was set, carries every generated token with its log-probability (the
    end token included) and `no_speech_prob`: the probability of the model's "no speech" path at its
    first decision (see `docs/accuracy.md`, Confidence); None when the engine could not tell.
    """

    raw_text: str
    output_tokens: int = 0
    finished: bool = True
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    no_speech_prob: float | None = None


@dataclass(frozen=True)
class EngineDescription:
    """What `/status` shows about the loaded engine."""

    name: Literal["vllm", "cpu", "test-double"]
    model: str
    device: str
    dtype: str
    quantization: str | None
    max_concurrency: int
    details: dict[str, str | int | float | bool | None] = field(default_factory=dict)


class EngineError(RuntimeError):
    """Base class of engine failures."""


class EngineLoadError(EngineError):
    """Loading a plan failed; `kind` says why so the supervisor can pick the next plan."""

    def __init__(self, kind: LoadFailureKind, message: str) -> None:
        super().__init__(message)
        self.kind: LoadFailureKind = kind


class EngineDeadError(EngineError):
    """The engine can no longer serve (its process died, CUDA failed...). The supervisor restarts it."""


class EngineRequestError(EngineError):
    """One request failed inside the engine while the engine itself stays healthy."""


@runtime_checkable
class Engine(Protocol):
    """An inference backend. Implementations: `VLLMEngine` (GPU), `CPUEngine` (transformers)."""

    async def load(self) -> None:
        """Load weights and warm up. Raises `EngineLoadError`."""

    def stream(self, audio: AudioArray, options: TranscribeOptions, request_id: str) -> AsyncIterator[EngineOutput]:
        """Yield cumulative raw output as the model produces it; the last item has `finished=True`.

        Closing the iterator early (client gone) must abort the work for `request_id`.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop work for `request_id` if any is running; a no-op otherwise."""

    async def close(self) -> None:
        """Release the model and its memory. Safe to call twice."""

    def describe(self) -> EngineDescription:
        """Facts for `/status`; valid after `load()`."""
        ...


async def run_to_completion(
    engine: Engine, audio: AudioArray, options: TranscribeOptions, request_id: str
) -> EngineOutput:
    """Drive `engine.stream` to its final output."""
    last = EngineOutput(raw_text="", finished=False)
    stream = engine.stream(audio, options, request_id)
    try:
        async for output in stream:
            last = output
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    if not last.finished:
        raise EngineRequestError("the engine stopped before finishing the request")
    return last
