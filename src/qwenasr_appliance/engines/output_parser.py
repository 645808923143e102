"""Parsing Qwen3-ASR's raw output into language and transcript, the same way while it streams and when
it has finished.

`OutputParser` reads the raw output (`language English<asr_text>text`) one character at a time through
five stages, each of which releases only text that no later character can change:

1. header: the language named before the first `<asr_text>` (everything is held until the tag appears;
   with a forced language the prompt already ended in it, so all output is text), and a `language X`
   line that opens the text;
2. control tokens: `<|...|>` tokens, `<asr_text>`-like tags and a `language X` header written again
   right before `<asr_text>` are removed; a possible beginning of one is held (`<asr_te`, `language Eng`);
3. whitespace: leading and trailing whitespace dropped, every inner run written as one space;
4. loops: runaway repetitions collapsed to two copies (`repetition.LoopCollapser`);
5. context echo: text that so far is only words of the context is held; a whole chunk of them is dropped.

`feed` returns the text released so far, `finish` releases the rest: the finished transcript is the
streamed one plus its held-back tail, by construction. Since every stage works per character, the result
does not depend on how the output was cut into pieces: `parse_output(raw)` (the finished output in one
piece) equals what a stream of any prefixes of `raw` ends with. Plain strings and numpy only: no torch,
transformers or vLLM. Follows `qwen_asr.inference.utils.parse_asr_output` for the header forms.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from qwenasr_appliance.engines.repetition import LoopCollapser, collapse_loops
from qwenasr_appliance.languages import UnsupportedLanguageError, resolve_language

ASR_TEXT_TAG: Final = "<asr_text>"
# A transcript of at least this many characters (case-folded, without punctuation) found in the context
# is the context written back, not speech.
ECHO_MIN_CHARS: Final = 12

_TAGS: Final = ("asr_text", "timestamp", "think", "tool_call", "tool_response")
# Control tokens of the Qwen3 vocabulary (special tokens have no whitespace and are short) and its tags.
CONTROL_TOKEN: Final = re.compile(rf"<\|[^|<>\s]{{0,40}}\|>|</?(?:{'|'.join(_TAGS)}|tts_[a-z_]{{1,30}})>")
_TOKEN_AT_END: Final = re.compile(rf"(?:{CONTROL_TOKEN.pattern})\Z")
_PIPE_TOKEN_PREFIX: Final = re.compile(r"[^|<>\s]{0,40}\|?")
_TTS_TAG_PREFIX: Final = re.compile(r"t|tt|tts|tts_[a-z_]{0,30}")
# `language X` written again right before `<asr_text>` (after whitespace or at the start of the text).
_HEADER_AT_END: Final = re.compile(r"(?i:language)[ \t]{0,4}[^\s<>]{0,40}\s{0,4}\Z")
_HEADER_SPACES: Final = 4
_HEADER_NAME_CHARS: Final = 40
_HOLD_CHARS: Final = 80  # longer than any header plus tag
_OPENERS: Final = re.compile(r"[<lL]")  # characters a token or a header can start with
# A `language X` line that opens the text, and what may still become one.
_OPENING_HEADER: Final = re.compile(r"\s*language[ \t]+([^\s<>]{1,40})[ \t]*\n", re.IGNORECASE)
_OPENING_HEADER_AT_END: Final = re.compile(r"\s*language[ \t]+([^\s<>]{1,40})[ \t]*", re.IGNORECASE)
_OPENING_HEADER_PREFIX: Final = re.compile(
    r"\s*(?:l(?:a(?:n(?:g(?:u(?:a(?:g(?:e(?:[ \t]+(?:[^\s<>]{1,40}[ \t]*)?)?)?)?)?)?)?)?)?)?", re.IGNORECASE
)
_LANGUAGE_PREFIX: Final = "language "

Release = Callable[[str], None]


def sanitize_context(context: str) -> str:
    """The context without control tokens, removed until none is left (`<|im<|x|>_end|>` leaves nothing).

    In the context they would open turns or add audio placeholders (more `<|audio_pad|>` than audios makes
    the processor fail); vLLM's renderer does the same.
    """
    previous = None
    while previous != context:
        previous = context
        context = CONTROL_TOKEN.sub("", context)
    return context


def _canonical_language(named: str) -> str:
    try:
        return resolve_language(named)
    except UnsupportedLanguageError:
        return named[:1].upper() + named[1:].lower()  # qwen-asr's normalisation


def _language_in(meta: str) -> str:
    """The language of the metadata before `<asr_text>`: "" for `language None`, none named, or empty."""
    if "language none" in meta.lower():
        return ""
    for line in meta.splitlines():
        line = line.strip()
        if line.lower().startswith(_LANGUAGE_PREFIX):
            named = line[len(_LANGUAGE_PREFIX) :].strip()
            return _canonical_language(named) if named else ""
    return ""


def _is_header_name(named: str) -> bool:
    if named.lower() == "none":
        return True
    try:
        resolve_language(named)
    except UnsupportedLanguageError:
        return False
    return True


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


def _is_token_prefix(text: str) -> bool:
    """Whether `text` (starting with `<`) may still become a control token."""
    rest = text[1:]
    if not rest:
        return True
    if rest[0] == "|":
        return _PIPE_TOKEN_PREFIX.fullmatch(rest[1:]) is not None
    name = rest[1:] if rest[0] == "/" else rest
    return any(tag.startswith(name) for tag in _TAGS) or _TTS_TAG_PREFIX.fullmatch(name) is not None


def _is_header_prefix(text: str) -> bool:
    """Whether `text` may still become `language X<asr_text>` (`_HEADER_AT_END` followed by the tag)."""
    word = text[:8].lower()
    if not "language".startswith(word):
        return False
    if len(word) < 8:
        return len(text) == len(word)
    spaces = 8
    while spaces < len(text) and text[spaces] in " \t" and spaces - 8 < _HEADER_SPACES:
        spaces += 1
    name = spaces
    while name < len(text) and not text[name].isspace() and text[name] not in "<>" and name - spaces < 40:
        name += 1
    gap = name
    while gap < len(text) and text[gap].isspace() and gap - name < _HEADER_SPACES:
        gap += 1
    return ASR_TEXT_TAG.startswith(text[gap:])


class _Header:
    """Stage 1: the language, and the text part of the output (after the first `<asr_text>`)."""

    def __init__(self, forced_language: str | None, release: Release) -> None:
        self._release = release
        self.language = forced_language or ""
        self._in_text = bool(forced_language)
        self._meta = ""  # output before the tag (unforced)
        self._opening: str | None = ""  # start of the text while it may be a `language X` line; None: decided

    def push(self, text: str) -> None:
        if not self._in_text:
            self._meta += text
            meta, tag, text = self._meta.partition(ASR_TEXT_TAG)
            if not tag:
                return
            self.language = _language_in(meta)
            self._in_text = True
        self._push_text(text)

    def _push_text(self, text: str) -> None:
        if self._opening is None:
            self._release(text)
            return
        opening = self._opening + text
        header = _OPENING_HEADER.match(opening)
        if header and _is_header_name(header.group(1)):
            self._opening = None
            self._release(opening[header.end() :])
        elif header is None and _OPENING_HEADER_PREFIX.fullmatch(opening):
            self._opening = opening
        else:
            self._opening = None
            self._release(opening)

    def finish(self) -> None:
        if not self._in_text:  # no tag at all: the whole output is text, the language unknown
            self._in_text = True
            self._push_text(self._meta)
        if self._opening:
            header = _OPENING_HEADER_AT_END.fullmatch(self._opening)
            if not (header and _is_header_name(header.group(1))):
                self._release(self._opening)
        self._opening = None


class _ControlTokens:
    """Stage 2: control tokens removed (again when removing one completes another: `<as<asr_text>r_text>`),
    with a `language X` header right before `<asr_text>`; what may still become one is held."""

    def __init__(self, release: Release) -> None:
        self._release = release
        self._pending = ""
        self._after_space = True  # the last released character was whitespace, or none was released

    def _emit(self, text: str) -> None:
        if text:
            self._release(text)
            self._after_space = text[-1].isspace()

    def _opens_at(self, text: str, index: int) -> bool:
        """Whether a token or header may start at `text[index]` (text = pending characters)."""
        char = text[index]
        if char == "<":
            return True
        if char not in "lL":
            return False
        return text[index - 1].isspace() if index else self._after_space

    def push(self, text: str) -> None:
        start = 0
        while start < len(text):
            if not self._pending:
                opening = next(
                    (m.start() for m in _OPENERS.finditer(text, start) if self._opens_at_free(text, m.start(), start)),
                    len(text),
                )
                self._emit(text[start:opening])
                start = opening
                if start == len(text):
                    return
            self._pending += text[start]
            start += 1
            self._settle()

    def _opens_at_free(self, text: str, index: int, start: int) -> bool:
        """`_opens_at` for `text[index]` (one of `_OPENERS`) when nothing is pending and `text[start:index]`
        will be released first."""
        if text[index] == "<":
            return True
        return text[index - 1].isspace() if index > start else self._after_space

    def _header_start(self, pending: str, end: int) -> int | None:
        """Where a `language X` header ending at `pending[:end]` starts (after whitespace or at the start)."""
        for index in range(max(0, end - _HOLD_CHARS), end):
            header = pending[index] != "<" and self._opens_at(pending, index)
            if header and _HEADER_AT_END.fullmatch(pending, index, end):
                return index
        return None

    def _settle(self) -> None:
        pending = self._pending
        if pending.endswith(">") and (token := _TOKEN_AT_END.search(pending)):
            cut = token.start()
            if pending.endswith(ASR_TEXT_TAG):
                header = self._header_start(pending, cut)
                cut = cut if header is None else header
            pending = pending[:cut]
        hold = len(pending)
        moved = True
        while moved:  # a held piece may complete, vanish, and let what precedes it complete in turn
            moved = False
            for index in range(max(0, hold - _HOLD_CHARS), hold):
                if self._opens_at(pending, index) and self._may_open(pending[index:hold]):
                    hold, moved = index, True
                    break
        self._pending = pending[hold:]
        self._emit(pending[:hold])

    @staticmethod
    def _may_open(text: str) -> bool:
        return _is_token_prefix(text) if text[0] == "<" else _is_header_prefix(text)

    def finish(self) -> None:
        """Release what is held, without the beginnings of control tokens at its end (`a<<asr_te` → `a`)."""
        pending = self._pending
        while (start := pending.rfind("<")) >= 0 and _is_token_prefix(pending[start:]):
            pending = pending[:start]
        self._pending = ""
        self._emit(pending)


class _Whitespace:
    """Stage 3: no leading or trailing whitespace, every inner run of it one space."""

    def __init__(self, release: Release) -> None:
        self._release = release
        self._started = False
        self._gap = False

    def push(self, text: str) -> None:
        out: list[str] = []
        for char in text:
            if char.isspace():
                self._gap = self._started
            else:
                if self._gap:
                    out.append(" ")
                    self._gap = False
                out.append(char)
                self._started = True
        if out:
            self._release("".join(out))

    def finish(self) -> None:
        self._gap = False


class _Loops:
    """Stage 4: `LoopCollapser` as the text streams; for a finished output read at once, `collapse_loops`
    (the same result, faster)."""

    def __init__(self, release: Release, *, whole: bool) -> None:
        self._release = release
        self._whole: list[str] | None = [] if whole else None
        self._collapser = LoopCollapser(release)
        self.loops = 0

    def push(self, text: str) -> None:
        if self._whole is not None:
            self._whole.append(text)
        else:
            self._collapser.push(text)

    def finish(self) -> None:
        if self._whole is not None:
            text, self.loops = collapse_loops("".join(self._whole))
            if text:
                self._release(text)
        else:
            self._collapser.finish()
            self.loops = self._collapser.loops


class _EchoGate:
    """Stage 5: text held while it is only words of the context; at the end, such text of at least
    `ECHO_MIN_CHARS` normalised characters is the context written back and is dropped (`is_context_echo`)."""

    def __init__(self, context: str, release: Release) -> None:
        self._release = release
        self._context = _normalized(sanitize_context(context))
        self._open = not self._context
        self._held = ""
        self._said = ""  # `_held` normalised, built as it grows
        self._space = False
        self.echo = False

    def push(self, text: str) -> None:
        if self._open:
            self._release(text)
            return
        self._held += text
        for char in text.casefold():
            if unicodedata.category(char).startswith(("P", "S")):
                continue
            if char.isspace():
                self._space = bool(self._said)
            else:
                self._said += (" " if self._space else "") + char
                self._space = False
        if self._said not in self._context:
            self._open = True
            self._release(self._held)
            self._held = ""

    def finish(self) -> None:
        if not self._open and self._held:
            if len(self._said) >= ECHO_MIN_CHARS:
                self.echo = True
            else:
                self._release(self._held)
        self._held = ""
        self._open = True


@dataclass(frozen=True)
class ParsedTranscript:
    language: str  # canonical name when the model named a supported one; "" when unknown or silent
    text: str
    loops: int = 0  # loops collapsed by the repetition fix
    echo: bool = False  # the text was the context written back, and was dropped


class OutputParser:
    """Parses one chunk's raw output as it streams (`feed` each cumulative output, then `finish`).

    `feed(raw)` returns the settled transcript so far: never shorter than the one before, always a prefix
    of every later one and of `finish(raw_final).text`. `finish` releases the held-back tail: the finished
    text is the streamed text plus that tail, so joined deltas equal the final text by construction.
    `forced_language`: the prompt ended in `language X<asr_text>` (all output is text). `context`: the
    request's prompt, for the echo guard. `whole=True` when the output is read once, finished (faster).
    An engine whose cumulative output stops extending the previous one (`diverged`) has its new characters
    appended as if it had.
    """

    def __init__(self, forced_language: str | None = None, context: str = "", *, whole: bool = False) -> None:
        self._text: list[str] = []
        self._echo = _EchoGate(context, self._text.append)
        self._loops = _Loops(self._echo.push, whole=whole)
        self._spaces = _Whitespace(self._loops.push)
        self._tokens = _ControlTokens(self._spaces.push)
        self._header = _Header(forced_language, self._tokens.push)
        self._raw = ""
        self._finished = False
        self.diverged = False

    def _read(self, raw: str) -> None:
        if self._finished:
            raise RuntimeError("the output was already finished")
        if not raw.startswith(self._raw):
            self.diverged = True
        new = raw[len(self._raw) :]
        self._raw = raw
        if new:
            self._header.push(new)

    def _result(self, text: str) -> ParsedTranscript:
        return ParsedTranscript(self._header.language, text, self._loops.loops, self._echo.echo)

    def feed(self, raw: str) -> ParsedTranscript:
        """Read the cumulative output `raw`; the settled transcript so far (language "" until it is known)."""
        self._read(raw)
        return self._result("".join(self._text))

    def finish(self, raw: str) -> ParsedTranscript:
        """Read the finished output `raw` and release everything held back: the final transcript."""
        self._read(raw)
        self._finished = True
        self._header.finish()
        self._tokens.finish()
        self._spaces.finish()
        self._loops.finish()
        self._echo.finish()
        return self._result("".join(self._text))


def parse_output(raw: str, forced_language: str | None, context: str = "") -> ParsedTranscript:
    """Split a finished output into language and text (`OutputParser`, read at once).

    Forms: `language English<asr_text>text`, metadata on several lines before the tag, no tag at all (all
    text, language unknown), and `language None<asr_text>` (silence: empty unless text follows anyway).
    With `forced_language` the prompt already ended in the tag, so the whole output is text.
    The text never holds a control token (`<asr_text>`, `<|...|>`, a cut-off one at the end) nor a
    repeated `language X` header; whitespace runs are one space; loops are collapsed to two copies; a text
    that is only the `context` written back is dropped (`is_context_echo`).
    """
    return OutputParser(forced_language, context, whole=True).finish(raw)


def parse_partial(raw: str, forced_language: str | None = None, context: str = "") -> ParsedTranscript:
    """The settled transcript of an output still being generated: a prefix of what `parse_output` returns
    for any output that starts with `raw` (`OutputParser.feed` on a fresh parser)."""
    return OutputParser(forced_language, context).feed(raw)
