"""Subtitle cues people can read, built from a finished transcript (SRT and WebVTT share them).

Rules (`SubtitleRules`), from common subtitle practice (the BBC's and Netflix's timed-text style
guides, EBU-TT): at most two lines of at most 42 columns, a cue at most 7 s on screen (the hard limit
of 10 s is therefore never reached), a new cue at every sentence end once the current one has been up
for a second, at every pause of `pause_seconds` between words, and at every chunk boundary (the
pipeline cuts chunks at the quietest point near its limit). When a cue is full (lines or duration), it
is split at its best earlier break: a sentence end, else a clause mark (`,` `;` `:` `、`...), else the
longest gap between words, else just before the word that did not fit.

Widths are display columns: a wide or full-width character (Chinese, Japanese, Korean) counts as two,
so a line holds 21 of them, close to the 16-20 those guides allow for East Asian text.

Timing:
* With word timestamps (the forced aligner was loaded), every word's cue time is its aligned time. The
  aligner's units are the transcript's letters and digits without punctuation (`aligner.text`), so the
  transcript's own words, punctuation included, are matched to them letter by letter.
* Without them, each chunk's stretches of sound (`TranscriptSegment.speech`, an energy gate over the
  chunk's audio) are shared among its words in proportion to their length in characters (spaces
  included), as speech runs at a roughly even rate of characters; pauses between the stretches stay
  pauses, so cues still break there. This is chosen over cutting the audio into shorter pieces for
  subtitle requests: that would cost more engine work per request, cut the model's context every few
  seconds and still not place words inside a piece. Its error grows with changes of speaking rate
  and with pauses the gate cannot see (noise); with the aligner loaded it does not apply.

Empty transcripts give no cues. Times are seconds, rounded to milliseconds, non-decreasing, and each
cue ends after it starts.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qwenasr_appliance.aligner.text import is_kept_char
from qwenasr_appliance.transcription.types import Transcript, TranscriptSegment, TranscriptWord
from qwenasr_appliance.writing import joins_without_space

__all__ = ["Cue", "SubtitleRules", "build_cues", "display_width"]

_SENTENCE_ENDS: Final = frozenset(".!?…。！？｡")  # noqa: RUF001 - the full-width marks are meant
_CLAUSE_MARKS: Final = frozenset(",;:，；：、–—")  # noqa: RUF001 - the full-width marks are meant
_CLOSING: Final = frozenset("\"'”’)]}»」』）】")  # noqa: RUF001 - the full-width marks are meant


@dataclass(frozen=True)
class SubtitleRules:
    """Limits for subtitle cues. Widths in display columns, times in seconds."""

    max_line_width: int = 42
    max_lines: int = 2  # 1 or 2
    max_cue_seconds: float = 7.0
    min_cue_seconds: float = 1.0  # a sentence end starts a new cue only after this long; short cues are held this long
    pause_seconds: float = 0.5  # a gap this long between words starts a new cue

    def __post_init__(self) -> None:
        if self.max_lines not in (1, 2):
            raise ValueError("max_lines must be 1 or 2")
        if self.max_line_width < 2:
            raise ValueError("max_line_width must hold a wide character")
        if not 0 < self.min_cue_seconds <= self.max_cue_seconds:
            raise ValueError("need 0 < min_cue_seconds <= max_cue_seconds")


@dataclass(frozen=True)
class Cue:
    """One subtitle: shown from `start` to `end` (seconds), one or two lines of text."""

    start: float
    end: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class _Token:
    text: str
    glue: str  # what goes between the previous token and this one: " " or ""
    start: float
    end: float
    segment: int


def display_width(text: str) -> int:
    """Columns `text` takes on screen: wide and full-width characters 2, combining marks 0, others 1."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _pieces(word: str, max_width: int) -> list[str]:
    """A whitespace-free word as display pieces: every character of unspaced writing (Chinese,
    Japanese) on its own, with the punctuation after it; runs of other characters whole, and any
    piece wider than `max_width` cut into pieces that fit (never before a combining mark)."""
    pieces: list[str] = []
    for char in word:
        is_mark = not is_kept_char(char)
        if pieces and (is_mark or not (joins_without_space(char) or joins_without_space(pieces[-1][-1]))):
            pieces[-1] += char
        else:
            pieces.append(char)
    fitted: list[str] = []
    for piece in pieces:
        current = ""
        for char in piece:
            if current and display_width(current + char) > max_width and not unicodedata.combining(char):
                fitted.append(current)
                current = ""
            current += char
        if current:
            fitted.append(current)
    return fitted


def _segment_tokens(segment: TranscriptSegment, max_width: int) -> list[tuple[str, str]]:
    """(text, glue) of a segment's display tokens, in order."""
    tokens: list[tuple[str, str]] = []
    for word in segment.text.split():
        for i, piece in enumerate(_pieces(word, max_width)):
            tokens.append((piece, " " if i == 0 and tokens else ""))
    return tokens


_BOUNDARY_WINDOW: Final = 8  # tokens either side of the proportional place a stretch boundary may move
_SENTENCE_BONUS: Final = 0.5  # cost units a boundary after a sentence end saves (a clause mark: half)
_EMPTY_STRETCH_COST: Final = 1.0  # per second of a stretch of sound given no words (noise, breath)


def _stretch_starts(texts: list[tuple[str, str]], weights: list[int], lengths: list[float]) -> list[int]:
    """The index of the first token of each stretch of sound.

    Dynamic programming over token boundaries near their proportional places (`_BOUNDARY_WINDOW`):
    each stretch costs its length times the squared log of its speaking rate (characters per second)
    against the segment's, so rates stay even; a boundary after a sentence end or clause mark is
    cheaper (`_SENTENCE_BONUS`). Speaking rates differ between voices and sentences, which proportion
    alone turns into words put in the wrong stretch; the sentence ends the model writes correct that.
    """
    count, stretches = len(texts), len(lengths)
    before = [0]
    for weight in weights:
        before.append(before[-1] + weight)
    total, speech = before[-1], sum(lengths)
    rate = total / speech if speech > 0 else 1.0

    def bonus(boundary: int) -> float:
        if boundary in (0, count):
            return 0.0
        mark = texts[boundary - 1][0].rstrip("".join(_CLOSING))[-1:]
        return _SENTENCE_BONUS if mark in _SENTENCE_ENDS else _SENTENCE_BONUS / 2 if mark in _CLAUSE_MARKS else 0.0

    def cost(stretch: int, first: int, stop: int) -> float:
        seconds = max(lengths[stretch], 1e-3)
        chars = before[stop] - before[first]
        if chars == 0:
            return _EMPTY_STRETCH_COST * seconds
        expected = seconds * rate
        ratio = chars / expected if 0 < expected < math.inf else 1.0
        return seconds * math.log(min(max(ratio, 1e-12), 1e12)) ** 2

    passed = 0.0
    candidates: list[range] = [range(0, 1)]
    for stretch in range(stretches - 1):
        passed += lengths[stretch]
        target = passed / speech * total if speech > 0 else 0.0
        place = min(range(count + 1), key=lambda b: abs(before[b] - target))
        candidates.append(range(max(0, place - _BOUNDARY_WINDOW), min(count, place + _BOUNDARY_WINDOW) + 1))
    candidates.append(range(count, count + 1))
    gains = [bonus(boundary) for boundary in range(count + 1)]
    best: dict[int, float] = {0: 0.0}
    pointers: list[dict[int, int]] = []  # per stretch: its end boundary -> its first token
    for stretch in range(stretches):
        following: dict[int, float] = {}
        pointer: dict[int, int] = {}
        for stop in candidates[stretch + 1]:
            for first, value in best.items():
                if first <= stop:
                    total_cost = value + cost(stretch, first, stop) - gains[stop]
                    if total_cost < following.get(stop, math.inf):
                        following[stop], pointer[stop] = total_cost, first
        pointers.append(pointer)
        best = following
    starts: list[int] = []
    boundary = count
    for pointer in reversed(pointers):
        boundary = pointer[boundary]
        starts.append(boundary)
    return starts[::-1]


def _proportional(segment: TranscriptSegment, texts: list[tuple[str, str]]) -> list[tuple[float, float]]:
    """Times of a segment's tokens in proportion to their characters, laid over the segment's stretches
    of sound (`TranscriptSegment.speech`; the whole segment when unknown). Each stretch gets the tokens
    between two boundaries placed in proportion, sentence ends preferred (`_stretch_starts`), so no
    word straddles a pause and pauses stay pauses."""
    spans = [(a, b) for a, b in segment.speech if b > a] or [(segment.start, max(segment.start, segment.end))]
    weights = [len(glue) + len(text) for text, glue in texts]
    if not texts:
        return []
    starts = [*_stretch_starts(texts, weights, [b - a for a, b in spans]), len(texts)]
    times: list[tuple[float, float]] = []
    for (start, end), first, stop in zip(spans, starts, starts[1:], strict=False):
        share = sum(weights[first:stop]) or 1
        used = 0.0
        for weight in weights[first:stop]:
            begin = start + (end - start) * used / share
            used += weight
            times.append((begin, start + (end - start) * used / share))
    return times


def _aligned(texts: list[tuple[str, str]], words: Sequence[TranscriptWord]) -> list[tuple[float, float]] | None:
    """Times of the display tokens from the aligned units, matched letter by letter; None when the
    letters differ (the caller then times by proportion)."""
    letters = [(char, index) for index, word in enumerate(words) for char in word.word]
    position = 0
    times: list[tuple[float, float]] = []
    previous_end = words[0].start if words else 0.0
    for text, _glue in texts:
        used: list[int] = []
        for char in text:
            if not is_kept_char(char):
                continue
            if position >= len(letters) or letters[position][0] != char:
                return None
            used.append(letters[position][1])
            position += 1
        if used:
            start, end = words[used[0]].start, max(words[used[-1]].end, words[used[0]].start)
        else:  # punctuation alone: it sits at the end of what came before
            start = end = previous_end
        times.append((start, end))
        previous_end = end
    return times if position == len(letters) else None


def _tokens(transcript: Transcript, rules: SubtitleRules) -> list[_Token]:
    segments = [s for s in transcript.segments if s.text.strip()]
    per_segment = [_segment_tokens(s, rules.max_line_width) for s in segments]
    flat = [token for tokens in per_segment for token in tokens]
    aligned = _aligned(flat, transcript.words) if transcript.words else None
    tokens: list[_Token] = []
    previous = ""
    for index, (segment, texts) in enumerate(zip(segments, per_segment, strict=True)):
        times = (
            aligned[len(tokens) : len(tokens) + len(texts)] if aligned is not None else _proportional(segment, texts)
        )
        for position, ((text, glue), (start, end)) in enumerate(zip(texts, times, strict=True)):
            if position == 0 and previous:
                # Between chunks, the transcript's own join rule (`transcription.text.join_texts`).
                glue = "" if joins_without_space(previous[-1]) or joins_without_space(text[0]) else " "
            tokens.append(_Token(text, glue, start, end, index))
            previous = text
    return tokens


def _joined(tokens: Sequence[_Token]) -> str:
    return "".join((t.glue if i else "") + t.text for i, t in enumerate(tokens))


def _lines(tokens: Sequence[_Token], rules: SubtitleRules) -> tuple[str, ...] | None:
    """The tokens as at most `max_lines` lines within the width, the two lines as even as possible
    (the top one no longer than the bottom on a tie); None when they do not fit."""
    whole = _joined(tokens)
    if display_width(whole) <= rules.max_line_width:
        return (whole,)
    if rules.max_lines < 2:
        return None
    best: tuple[int, int, int] | None = None
    for split in range(1, len(tokens)):
        top, bottom = display_width(_joined(tokens[:split])), display_width(_joined(tokens[split:]))
        if top > rules.max_line_width or bottom > rules.max_line_width:
            continue
        key = (max(top, bottom), 0 if top <= bottom else 1, split)
        if best is None or key < best:
            best = key
    if best is None:
        return None
    split = best[2]
    return (_joined(tokens[:split]), _joined(tokens[split:]))


def _ends_sentence(text: str) -> bool:
    stripped = text.rstrip("".join(_CLOSING))
    return bool(stripped) and stripped[-1] in _SENTENCE_ENDS


def _break_score(before: _Token, after: _Token) -> float:
    """How good a cue break between two tokens is: sentence end > clause mark > pause > nothing."""
    stripped = before.text.rstrip("".join(_CLOSING))
    if stripped and stripped[-1] in _SENTENCE_ENDS:
        return 3.0
    if stripped and stripped[-1] in _CLAUSE_MARKS:
        return 2.0
    gap = after.start - before.end
    return min(1.0, gap / 0.25) if gap > 0 else 0.0


def _fits(tokens: Sequence[_Token], rules: SubtitleRules) -> bool:
    return tokens[-1].end - tokens[0].start <= rules.max_cue_seconds and _lines(tokens, rules) is not None


def _split_point(current: list[_Token], nxt: _Token) -> int:
    """Where to end a full cue: an index into `current` (the cue keeps `current[:index]`). Only the
    second half of the cue (by characters) is considered, so no tiny cue is left behind."""
    total = len(_joined(current))
    best_index, best_score = len(current), _break_score(current[-1], nxt)
    for index in range(len(current) - 1, 0, -1):
        if len(_joined(current[:index])) * 2 < total:
            break
        score = _break_score(current[index - 1], current[index])
        if score > best_score:
            best_index, best_score = index, score
    return best_index


def _group(tokens: list[_Token], rules: SubtitleRules) -> list[list[_Token]]:
    groups: list[list[_Token]] = []
    current: list[_Token] = []
    for token in tokens:
        if current and (token.segment != current[-1].segment or token.start - current[-1].end >= rules.pause_seconds):
            groups.append(current)
            current = []
        while current and not _fits([*current, token], rules):
            index = _split_point(current, token)
            groups.append(current[:index])
            current = current[index:]
        current.append(token)
        if _ends_sentence(token.text) and current[-1].end - current[0].start >= rules.min_cue_seconds:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def build_cues(transcript: Transcript, rules: SubtitleRules | None = None) -> list[Cue]:
    """The transcript's subtitle cues, in time order, within `rules` (see the module docstring)."""
    rules = rules or SubtitleRules()
    cues: list[Cue] = []
    previous_end = 0.0
    for group in _group(_tokens(transcript, rules), rules):
        lines = _lines(group, rules)
        if lines is None:  # cannot happen: a lone token always fits one line (see `_pieces`)
            raise AssertionError("a subtitle token is wider than a line")
        start = max(round(group[0].start, 3), previous_end)
        end = min(round(group[-1].end, 3), math.floor((start + rules.max_cue_seconds) * 1000) / 1000)
        cues.append(Cue(start, end, lines))
        previous_end = end
    return _held(cues, transcript.duration, rules)


def _held(cues: list[Cue], duration: float, rules: SubtitleRules) -> list[Cue]:
    """Short cues stay up for `min_cue_seconds` where the next cue and the recording leave room, and
    every cue lasts at least one millisecond."""
    held: list[Cue] = []
    for index, cue in enumerate(cues):
        limit = cues[index + 1].start if index + 1 < len(cues) else max(duration, cue.end)
        end = max(cue.end, min(round(cue.start + rules.min_cue_seconds, 3), round(limit, 3)))
        if end <= cue.start:
            end = round(cue.start + 0.001, 3)
        if held and cue.start < held[-1].end:
            cue = Cue(held[-1].end, max(end, round(held[-1].end + 0.001, 3)), cue.lines)
            end = cue.end
        held.append(Cue(cue.start, end, cue.lines))
    return held
