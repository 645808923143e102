"""The Qwen3-ASR prompt and the parsing of its raw output, shared by every engine.

Plain strings only: this module imports neither torch, transformers nor vLLM. The prompt is the string
`qwen_asr.Qwen3ASRModel._build_text_prompt` renders through the checkpoint's chat template (the tests
compare the two), and `parse_output` follows `qwen_asr.inference.utils.parse_asr_output`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from qwenasr_appliance.engines.repetition import collapse_loops, unsettled_tail_start
from qwenasr_appliance.languages import UnsupportedLanguageError, resolve_language

ASR_TEXT_TAG = "<asr_text>"
AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
# A transcript of at least this many characters (case-folded, without punctuation) found in the context
# is the context written back, not speech.
ECHO_MIN_CHARS = 12

_LANGUAGE_PREFIX = "language "
# Control tokens of the Qwen3 vocabulary. In the context they would open turns or add audio placeholders
# (more `<|audio_pad|>` than audios makes the processor fail), so they are removed; vLLM does the same.
_CONTROL_TOKEN = re.compile(r"<\|[^|<>]*\|>|</?(?:asr_text|timestamp|think|tool_call|tool_response|tts_[a-z_]+)>")


def sanitize_context(context: str) -> str:
    """The context without control tokens, removed until none is left (`<|im<|x|>_end|>` leaves nothing)."""
    previous = None
    while previous != context:
        previous = context
        context = _CONTROL_TOKEN.sub("", context)
    return context


def build_prompt(context: str, language: str | None) -> str:
    """The chat prompt for one audio: context as the system turn, the audio as the user turn.

    With `language` (a canonical name) the assistant turn starts with `language X<asr_text>`, so the
    model writes the transcript only. Equal to qwen-asr's prompt for any context without control tokens.
    """
    prompt = (
        f"<|im_start|>system\n{sanitize_context(context)}<|im_end|>\n"
        f"<|im_start|>user\n{AUDIO_PLACEHOLDER}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    if language:
        prompt += f"{_LANGUAGE_PREFIX}{language}{ASR_TEXT_TAG}"
    return prompt


def fix_repetitions(text: str) -> str:
    """Collapse the runaway loops Qwen3-ASR can fall into to two copies (`engines.repetition`)."""
    return collapse_loops(text)[0]


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


# `language X` written again right before a tag (a second header inside the text, or the header the
# prompt already holds when the language was forced), and a header line that opens forced output.
_HEADER_BEFORE_TAG = re.compile(r"(?:^|(?<=\s))language[ \t]*[^\s<>]{0,40}\s*(?=<asr_text>)", re.IGNORECASE)
_HEADER_LINE = re.compile(r"\A\s*language[ \t]+([^\s<>]{1,40})[ \t]*(?:\n|\Z)", re.IGNORECASE)
_CONTROL_IN_TEXT = re.compile(rf"(\s*)(?:{_CONTROL_TOKEN.pattern})(\s*)")
_TAG_NAMES = ("asr_text", "timestamp", "think", "tool_call", "tool_response", "tts_")
_HEADER_BEING_WRITTEN = re.compile(
    r"(?:^|(?<=\s))l(?:a(?:n(?:g(?:u(?:a(?:g(?:e(?:[ \t]+[^\s<>]{0,40})?)?)?)?)?)?)?)?\s*\Z", re.IGNORECASE
)


def _is_header_name(named: str) -> bool:
    if named.lower() == "none":
        return True
    try:
        resolve_language(named)
    except UnsupportedLanguageError:
        return False
    return True


def _drop_control(match: re.Match[str]) -> str:
    return " " if match.group(1) or match.group(match.lastindex or 1) else ""


def _clean_text(text: str) -> str:
    """The transcript part of an output without any control token or repeated `language X` header."""
    text = _HEADER_BEFORE_TAG.sub("", text)
    header = _HEADER_LINE.match(text)
    if header and _is_header_name(header.group(1)):
        text = text[header.end() :]
    previous = None
    while previous != text:  # `<as<asr_text>r_text>` must not leave `<asr_text>` behind
        previous = text
        text = _CONTROL_IN_TEXT.sub(_drop_control, text)
    return text


def dangling_tag_start(text: str) -> int | None:
    """Where `text` ends in the beginning of a control token (`<asr_te`, `<|im_`, `<`), else None."""
    start = text.rfind("<")
    if start < 0 or len(text) - start > 32:
        return None
    tail = text[start + 1 :]
    if re.fullmatch(r"\|[^|<>\s]*\|?", tail):
        return start
    name = tail.removeprefix("/")
    if re.fullmatch(r"[a-z_]*", name) and any(tag.startswith(name) or name.startswith(tag) for tag in _TAG_NAMES):
        return start
    return None


def _without_dangling_tags(text: str) -> str:
    """`text` without the control-token beginnings at its end (`a<<asr_te` ends in two)."""
    while (start := dangling_tag_start(text)) is not None:
        text = text[:start]
    return text


def _header_prefix_start(text: str) -> int | None:
    """Where `text` ends in what may become a `language X` header before a tag (`lang`, `language Eng`)."""
    match = _HEADER_BEING_WRITTEN.search(text)
    return match.start() if match else None


def _normalized(text: str) -> str:
    kept = "".join(ch for ch in text.casefold() if not unicodedata.category(ch).startswith(("P", "S")))
    return " ".join(kept.split())


def is_context_echo(text: str, context: str, *, min_chars: int = ECHO_MIN_CHARS) -> bool:
    """Whether `text` is only words of the context written back (Qwen3-ASR#106: on quiet or noisy
    audio the model may return the prompt or its hotwords as the transcript).

    True when the text, case-folded without punctuation, is a run of at least `min_chars` characters
    found in the context so normalised. Shorter text (a single hotword that was really said) is kept.
    """
    said = _normalized(text)
    return len(said) >= min_chars and said in _normalized(sanitize_context(context))


def _may_become_echo(text: str, context: str) -> bool:
    said = _normalized(text)
    return bool(said) and said in _normalized(sanitize_context(context))


@dataclass(frozen=True)
class ParsedTranscript:
    language: str  # canonical name when the model named a supported one; "" when unknown or silent
    text: str
    loops: int = 0  # loops collapsed by the repetition fix
    echo: bool = False  # the text was the context written back, and was dropped


def _split_header(raw: str, forced_language: str | None) -> tuple[str, str] | None:
    """(language, text part) of an output; None while the `<asr_text>` tag has not appeared yet."""
    if forced_language:
        return forced_language, raw
    meta, tag, body = raw.partition(ASR_TEXT_TAG)
    if not tag:
        return None
    if "language none" in meta.lower():
        return "", body
    return _language_in(meta), body


def parse_output(raw: str, forced_language: str | None, context: str = "") -> ParsedTranscript:
    """Split a finished output into language and text.

    Forms: `language English<asr_text>text`, metadata on several lines before the tag, no tag at all (all
    text, language unknown), and `language None<asr_text>` (silence: empty unless text follows anyway).
    With `forced_language` the prompt already ended in the tag, so the whole output is text.
    The text never holds a control token (`<asr_text>`, `<|...|>`, a cut-off one at the end) nor a
    repeated `language X` header; loops are collapsed (`fix_repetitions`), and a text that is only the
    `context` written back is dropped (`is_context_echo`).
    """
    split = _split_header(raw.strip(), forced_language)
    language, body = split if split is not None else ("", raw.strip())
    text = _clean_text(body)
    text, loops = collapse_loops(_without_dangling_tags(text))
    text = text.strip()
    if context and is_context_echo(text, context):
        return ParsedTranscript(language, "", loops, echo=True)
    return ParsedTranscript(language, text, loops)


def parse_partial(raw: str, forced_language: str | None = None, context: str = "") -> ParsedTranscript:
    """The settled transcript so far of an output still being generated: a prefix of what
    `parse_output` will return for the finished output, whatever is generated next.

    Held back, until more text settles them: everything before `<asr_text>` (unless the language was
    forced), a control token still being written (`<asr_te`), what may become a `language X` header,
    a repetition that may become a loop beyond its second copy (`repetition.unsettled_tail_start`),
    trailing whitespace, and text that so far is only words of the context (it may become an echo).
    """
    split = _split_header(raw, forced_language)
    if split is None:
        return ParsedTranscript("", "")
    language, body = split
    text = _clean_text(body.lstrip()).lstrip()
    text = _without_dangling_tags(text)  # a tag being written; what precedes it may be a header being written
    header = _header_prefix_start(text)
    cut = min(unsettled_tail_start(text), len(text) if header is None else header)
    text, loops = collapse_loops(text[:cut])
    text = text.rstrip()
    if context and _may_become_echo(text, context):
        return ParsedTranscript(language, "", loops)
    return ParsedTranscript(language, text, loops)
