"""The Qwen3-ASR prompt, shared by every engine, and the names of its output parsing.

Plain strings only: this module imports neither torch, transformers nor vLLM. The prompt is the string
`qwen_asr.Qwen3ASRModel._build_text_prompt` renders through the checkpoint's chat template (the tests
compare the two); the output is parsed by `engines.output_parser` (streamed and finished alike).
"""

from __future__ import annotations

from qwenasr_appliance.engines.output_parser import (
    ASR_TEXT_TAG,
    ECHO_MIN_CHARS,
    OutputParser,
    ParsedTranscript,
    is_context_echo,
    parse_output,
    parse_partial,
    sanitize_context,
)
from qwenasr_appliance.engines.repetition import collapse_loops

__all__ = [
    "ASR_TEXT_TAG",
    "AUDIO_PLACEHOLDER",
    "ECHO_MIN_CHARS",
    "OutputParser",
    "ParsedTranscript",
    "build_prompt",
    "fix_repetitions",
    "is_context_echo",
    "parse_output",
    "parse_partial",
    "sanitize_context",
]

AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
_LANGUAGE_PREFIX = "language "


def build_prompt(context: str, language: str | None, assistant_prefix: str = "") -> str:
    """The chat prompt for one audio: context as the system turn, the audio as the user turn.

    With `language` (a canonical name) the assistant turn starts with `language X<asr_text>`, so the
    model writes the transcript only. Equal to qwen-asr's prompt for any context without control tokens
    (`sanitize_context` removes them).
    `assistant_prefix` (model output of an earlier decode of the same audio, as qwen-asr's
    `streaming_transcribe` appends it) ends the prompt, so the model continues it.
    """
    prompt = (
        f"<|im_start|>system\n{sanitize_context(context)}<|im_end|>\n"
        f"<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    if language:
        prompt += f"{_LANGUAGE_PREFIX}{language}{ASR_TEXT_TAG}"
    return prompt + assistant_prefix


def fix_repetitions(text: str) -> str:
    """Collapse the runaway loops Qwen3-ASR can fall into to two copies (`engines.repetition`)."""
    return collapse_loops(text)[0]
