"""vLLM engine inputs for Qwen3-ASR, built from log-mel features computed in worker processes.

Left to itself, vLLM renders every chunk in the serving process. Its Qwen3-ASR processor extracts the
Whisper features (13-18 ms of CPU per 30 s chunk), hashes the samples and converts tensors, in renderer
threads that share one interpreter lock with request handling and vLLM's output processing. At high
concurrency that serial work bounds the throughput of the whole server.

vLLM 0.26 has no supported way to take precomputed Qwen3-ASR features: its dict-of-features input
reaches the model's HF processor with a `<|audio_pad|>` token and no audio, which that processor refuses.
So this module builds what the renderer would have built: the prompt tokens with the audio placeholder
expanded to one token per encoder output, the processor's three tensors, and a content hash. The
features come from the workers (`chunk_features`); the prompt text is tokenized by vLLM's own renderer
once per distinct prompt.

`differences` compares the result with the renderer's output for the same chunk. The engine runs that
check at start-up and keeps the renderer when they differ, which is what would happen with a vLLM
version whose processor has changed.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from qwenasr_appliance.audio.features import FloatArray, LogMelExtractor

AUDIO_PAD_TOKEN: Final = "<|audio_pad|>"  # noqa: S105 - a token of the vocabulary, not a secret
# Rendered prompts kept: one per distinct (language, context) pair in recent requests.
PROMPT_CACHE_SIZE: Final = 512
# Worker features are float32 numpy; vLLM's are torch's. After the cast to the model's dtype they agree to
# one bf16 step (measured: 99.997% of values identical, the rest one step apart).
FEATURE_TOLERANCE: Final = 1.0 / 64


@dataclass(frozen=True)
class ChunkFeatures:
    """What a worker returns for one chunk: its log-mel features, already in the model's dtype (numpy
    has no bfloat16: those travel as the raw 16-bit patterns), and a hash of its samples."""

    features: npt.NDArray[Any]  # (n_mels, frames), C order
    digest: str
    dtype: str = "float32"  # the torch dtype the features are in: float32, float16 or bfloat16

    @property
    def frames(self) -> int:
        return int(self.features.shape[1])


def chunk_features(extractor: LogMelExtractor, samples: FloatArray, dtype: str = "float32") -> ChunkFeatures:
    """Features and content hash of one 16 kHz mono chunk (runs in a worker process).

    The cast to the model's dtype happens here rather than in the serving process: there a float32 to
    bfloat16 conversion of 30 s of features was the largest single cost under load (an H100 host, 64
    concurrent requests: 41% of the event loop's time), and the cast halves what crosses the pipe."""
    audio = np.ascontiguousarray(samples, dtype=np.float32)
    digest = hashlib.blake2b(audio.tobytes(), digest_size=20, person=b"qwenasr-audio").hexdigest()
    features = np.ascontiguousarray(extractor(audio))
    if dtype == "bfloat16":
        return ChunkFeatures(bfloat16_bits(features), f"qwenasr-{digest}", dtype)
    if dtype == "float16":
        return ChunkFeatures(features.astype(np.float16), f"qwenasr-{digest}", dtype)
    return ChunkFeatures(features, f"qwenasr-{digest}", "float32")


def bfloat16_bits(values: FloatArray) -> npt.NDArray[np.uint16]:
    """The bfloat16 bit patterns of finite float32 values, rounded to nearest even as torch rounds."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16  # finite values cannot overflow 32 bits
    return rounded.astype(np.uint16)


def placeholder_tokens(frames: int) -> int:
    """Audio tokens the encoder makes of `frames` mel frames (vLLM's `_get_feat_extract_output_lengths`)."""
    leave = frames % 100
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13


def expand_placeholder(token_ids: Sequence[int], pad_id: int, count: int) -> tuple[list[int], int]:
    """The prompt with its one audio placeholder repeated `count` times, and where the repeats start."""
    positions = [index for index, token in enumerate(token_ids) if token == pad_id]
    if len(positions) != 1:
        raise ValueError(f"expected one audio placeholder in the prompt, found {len(positions)}")
    if count < 1:
        raise ValueError("the audio is too short to be represented inside the model")
    offset = positions[0]
    return [*token_ids[:offset], *([pad_id] * count), *token_ids[offset + 1 :]], offset


Tokenize = Callable[[str], Awaitable[Sequence[int]]]
# (prompt text, expanded token ids, placeholder offset, placeholder length, chunk) -> vLLM engine input
Assemble = Callable[[str, list[int], int, int, ChunkFeatures], Any]


class EngineInputBuilder:
    """Builds vLLM engine inputs from a prompt text and a chunk's worker-computed features."""

    def __init__(self, tokenize: Tokenize, assemble: Assemble, pad_id: int, feature_dtype: str = "float32") -> None:
        self._tokenize = tokenize
        self._assemble = assemble
        self._pad_id = pad_id
        self.feature_dtype = feature_dtype  # what `chunk_features` should cast to
        self._prompts: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    async def prompt_tokens(self, prompt: str) -> tuple[int, ...]:
        tokens = self._prompts.get(prompt)
        if tokens is None:
            tokens = tuple(await self._tokenize(prompt))
            self._prompts[prompt] = tokens
            if len(self._prompts) > PROMPT_CACHE_SIZE:
                self._prompts.popitem(last=False)
        else:
            self._prompts.move_to_end(prompt)
        return tokens

    async def build(self, prompt: str, chunk: ChunkFeatures) -> Any:
        tokens = await self.prompt_tokens(prompt)
        count = placeholder_tokens(chunk.frames)
        expanded, offset = expand_placeholder(tokens, self._pad_id, count)
        return self._assemble(prompt, expanded, offset, count, chunk)


def vllm_input_builder(llm: Any) -> EngineInputBuilder:
    """The builder for a vLLM 0.26 `AsyncLLM` serving Qwen3-ASR. Raises when vLLM lacks a piece it needs."""
    import torch
    from transformers import BatchFeature
    from vllm.inputs.engine import mm_input
    from vllm.multimodal.inputs import MultiModalKwargsItems, PlaceholderRange

    renderer = llm.renderer
    processor = renderer.mm_processor
    if processor is None:
        raise RuntimeError("vLLM's renderer has no multimodal processor for this model")
    fields_config = processor._get_mm_fields_config  # the model's own field layout, not a copy of it
    dtype = llm.vllm_config.model_config.dtype
    pad_id = renderer.tokenizer.get_vocab()[AUDIO_PAD_TOKEN]
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

    def features_tensor(chunk: ChunkFeatures) -> Any:
        tensor = torch.from_numpy(chunk.features)
        if chunk.dtype == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        return tensor if tensor.dtype == dtype else tensor.to(dtype)

    async def tokenize(prompt: str) -> Sequence[int]:
        (rendered,) = await renderer.render_cmpl_async([{"prompt": prompt}])
        return list(rendered["prompt_token_ids"])

    def assemble(prompt: str, token_ids: list[int], offset: int, length: int, chunk: ChunkFeatures) -> Any:
        frames = chunk.frames
        hf_inputs = BatchFeature(
            {
                "input_audio_features": features_tensor(chunk),
                "feature_attention_mask": [torch.ones(frames)],
                "audio_feature_lengths": torch.tensor([frames]),
            }
        )
        engine_input = mm_input(
            prompt_token_ids=token_ids,
            mm_kwargs=MultiModalKwargsItems.from_hf_inputs(hf_inputs, fields_config(hf_inputs, {})),
            mm_hashes={"audio": [chunk.digest]},
            mm_placeholders={"audio": [PlaceholderRange(offset=offset, length=length)]},
            prompt=prompt,
        )
        engine_input["arrival_time"] = time.time()
        return engine_input

    return EngineInputBuilder(tokenize, assemble, pad_id, names.get(dtype, "float32"))


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """How two vLLM multimodal engine inputs for the same chunk differ (empty: interchangeable)."""
    found: list[str] = []
    for key in ("type", "prompt_token_ids"):
        if list(_sequence(ours.get(key))) != list(_sequence(theirs.get(key))):
            found.append(f"{key}: {_short(ours.get(key))} != {_short(theirs.get(key))}")
    our_ranges = _ranges(ours.get("mm_placeholders"))
    their_ranges = _ranges(theirs.get("mm_placeholders"))
    if our_ranges != their_ranges:
        found.append(f"mm_placeholders: {our_ranges} != {their_ranges}")
    try:
        (our_item,) = ours["mm_kwargs"]["audio"]
        (their_item,) = theirs["mm_kwargs"]["audio"]
    except (KeyError, TypeError, ValueError) as exc:
        return [*found, f"mm_kwargs: not one audio item each ({exc!r})"]
    if set(our_item) != set(their_item):
        return [*found, f"mm_kwargs fields: {sorted(our_item)} != {sorted(their_item)}"]
    for name in sorted(our_item):
        found.extend(_field_differences(name, our_item[name], their_item[name]))
    return found


def _field_differences(name: str, ours: Any, theirs: Any) -> list[str]:
    if type(getattr(ours, "field", None)) is not type(getattr(theirs, "field", None)):
        return [f"{name}: field kinds differ"]
    a, b = getattr(ours, "data", ours), getattr(theirs, "data", theirs)
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return [f"{name}: {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}"]
    if a.is_floating_point():
        gap = (a.float() - b.float()).abs()
        if gap.numel() and (float(gap.max()) > FEATURE_TOLERANCE or float(gap.mean()) > FEATURE_TOLERANCE / 100):
            return [f"{name}: values differ (max {float(gap.max()):.3g}, mean {float(gap.mean()):.3g})"]
        return []
    if not bool((a == b).all()):
        return [f"{name}: values differ"]
    return []


def _ranges(placeholders: Any) -> list[tuple[int, int]]:
    if not isinstance(placeholders, Mapping):
        return []
    return [(int(p.offset), int(p.length)) for p in placeholders.get("audio", [])]


def _sequence(value: Any) -> Sequence[Any]:
    if isinstance(value, str) or value is None:
        return [value]
    return list(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
