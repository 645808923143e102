"""The Qwen3-ASR prompt and the parsing of its raw output, shared by every engine.

Plain strings only: this module imports neither torch, transformers nor vLLM. The prompt is the string
`qwen_asr.Qwen3ASRModel._build_text_prompt` renders through the checkpoint's chat template (the tests
compare the two), and `parse_output` follows `qwen_asr.inference.utils.parse_asr_output`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qwenasr_appliance.languages import UnsupportedLanguageError, resolve_language

ASR_TEXT_TAG = "<asr_text>"
AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
REPETITION_THRESHOLD = 20
MAX_REPEATED_PATTERN = 20

_LANGUAGE_PREFIX = "language "
# Control tokens of the Qwen3 vocabulary. In the context they would open turns or add audio placeholders
# (more `<|audio_pad|>` than audios makes the processor fail), so they are removed; vLLM does the same.
_CONTROL_TOKEN = re.compile(r"<\|[^|<>]*\|>|</?(?:asr_text|timestamp|think|tool_call|tool_response|tts_[a-z_]+)>")


@dataclass(frozen=True)
class ParsedTranscript:
    language: str  # canonical name when the model named a supported one; "" when unknown or silent
    text: str


def sanitize_context(context: str) -> str:
    """The context without control tokens, removed until none is left (`<|im<|x|>_end|>` leaves nothing)."""
    previous = None
    while previous != context:
        previous = context
        context = _CONTROL_TOKEN.sub("", context)
    return context


def build_prompt(context: str, language: str | None, assistant_prefix: str = "") -> str:
    """The chat prompt for one audio: context as the system turn, the audio as the user turn.

    With `language` (a canonical name) the assistant turn starts with `language X<asr_text>`, so the
    model writes the transcript only. Equal to qwen-asr's prompt for any context without control tokens.
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


_REPEATED_CHAR = re.compile(rf"(.)\1{{{REPETITION_THRESHOLD},}}", re.DOTALL)
# Lazy: at each position the shortest pattern is tried first, as qwen-asr's loop over lengths does.
_REPEATED_PATTERN = re.compile(rf"(.{{1,{MAX_REPEATED_PATTERN}}}?)\1{{{REPETITION_THRESHOLD - 1},}}", re.DOTALL)


def fix_repetitions(text: str) -> str:
    """Collapse the runaway loops Qwen3-ASR can fall into on long audio.

    A character repeated more than `REPETITION_THRESHOLD` times, then a pattern of up to
    `MAX_REPEATED_PATTERN` characters repeated at least `REPETITION_THRESHOLD` times, becomes one
    occurrence: the idea of qwen-asr's `detect_and_fix_repetitions`, in two linear regex passes.
    Unlike it, a loop in the last 40 characters is collapsed too.
    """
    text = _REPEATED_CHAR.sub(r"\1", text)
    return _REPEATED_PATTERN.sub(r"\1", text)


def _canonical_language(named: str) -> str:
    try:
        return resolve_language(named)
    except UnsupportedLanguageError:
        return named[:1].upper() + named[1:].lower()  # qwen-asr's normalisation


def _language_in(meta: str) -> str:
    """The language named by the first metadata line that reads `language X`."""
    for line in meta.splitlines():
        line = line.strip()
        if line.lower().startswith(_LANGUAGE_PREFIX):
            named = line[len(_LANGUAGE_PREFIX) :].strip()
            return _canonical_language(named) if named else ""
    return ""


def parse_output(raw: str, forced_language: str | None) -> ParsedTranscript:
    """Split a finished output into language and text.

    Forms: `language English<asr_text>text`, metadata on several lines before the tag, no tag at all (all
    text, language unknown), and `language None<asr_text>` (silence: empty unless text follows anyway).
    With `forced_language` the prompt already ended in the tag, so the whole output is text.
    """
    text = fix_repetitions(raw.strip())
    if forced_language:
        return ParsedTranscript(forced_language, text)
    if ASR_TEXT_TAG not in text:
        return ParsedTranscript("", text)
    meta, _, body = text.partition(ASR_TEXT_TAG)
    if "language none" in meta.lower():
        return ParsedTranscript("", body.strip())
    return ParsedTranscript(_language_in(meta), body.strip())


def parse_partial(raw: str, forced_language: str | None = None) -> ParsedTranscript:
    """The transcript so far of an output still being generated.

    Empty until `<asr_text>` has appeared (unless the language was forced, when everything is text).
    No repetition fix and no trailing strip, so the text only grows as tokens arrive.
    """
    if forced_language:
        return ParsedTranscript(forced_language, raw.lstrip())
    meta, tag, body = raw.partition(ASR_TEXT_TAG)
    if not tag:
        return ParsedTranscript("", "")
    if "language none" in meta.lower():
        return ParsedTranscript("", body.lstrip())
    return ParsedTranscript(_language_in(meta), body.lstrip())
