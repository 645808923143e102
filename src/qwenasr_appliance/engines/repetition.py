"""Runaway loops in decoded text: collapse them to two copies, also while the text is still being
generated, and find them (for tests and analysis).

A *loop* is a pattern of `L` characters (1 ≤ L ≤ `MAX_PATTERN_CHARS`) written `k` times in a row with
`k ≥ min_copies(L)`: 20 copies for patterns of one or two characters ("hahaha...", "0000..." stay
legitimate below that), fewer for longer ones (at least 40 characters of repetition), and 3 copies for
patterns of 14 characters or more: people do not say the same sentence three times in a row, a
looping decoder does (Qwen3-ASR#129: one phrase 2,000 times). A loop is replaced by its first two
copies; the text before and after it is kept. `MAX_PATTERN_CHARS` = 200 covers a long sentence; a
longer "pattern" repeated three times needs 600+ characters, more than a 30 s chunk ever holds.

Differences from the reference (`qwen_asr.inference.utils.detect_and_fix_repetitions`, which keeps one
copy of patterns up to 20 characters repeated 20 times): longer patterns are caught, two copies stay
(a genuine "no, no" is not lost), and a loop at the very end is collapsed too.

The collapse is one online algorithm (`LoopCollapser`), read one character at a time, so text that is
still being generated and the finished text go through the same steps: what it has released (`push`)
is never taken back, and `finish` only adds to it. `collapse_loops` runs it over a whole text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

MAX_PATTERN_CHARS: Final = 200
MIN_LOOP_CHARS: Final = 40
MAX_MIN_COPIES: Final = 20
KEPT_COPIES: Final = 2
# Above this many characters the (positions x pattern lengths) table is built one length at a time.
_TABLE_MAX_CHARS: Final = 8192
_RING: Final = MAX_PATTERN_CHARS + 1  # the last characters a pattern length can look back to


def min_copies(length: int) -> int:
    """Copies in a row that make a pattern of `length` characters a loop: min(20, max(3, ceil(40/L)))."""
    return min(MAX_MIN_COPIES, max(KEPT_COPIES + 1, math.ceil(MIN_LOOP_CHARS / length)))


_MIN_COPIES: Final = np.array([0] + [min_copies(n) for n in range(1, MAX_PATTERN_CHARS + 1)], dtype=np.int64)


@dataclass(frozen=True)
class Loop:
    """A loop found in text: `copies` copies of `text[start:start + length]` from `start`."""

    start: int
    length: int
    copies: int

    @property
    def end(self) -> int:
        return self.start + self.length * self.copies


def _codes(text: str) -> npt.NDArray[np.uint32]:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _runs(eq: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Starts and (exclusive) ends of the runs of True in a 1-D boolean array."""
    padded = np.concatenate(([False], eq, [False])).astype(np.int8)
    edges = np.diff(padded)
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def candidate_lengths(text: str) -> list[int]:
    """Pattern lengths with enough equal character pairs in all of `text` to hold a loop anywhere in it
    (a cheap necessary test: a loop of length L needs `(min_copies(L) - 1) * L` pairs at distance L)."""
    codes = _codes(text)
    n = codes.size
    top = min(MAX_PATTERN_CHARS, n // (KEPT_COPIES + 1))
    if top < 1:
        return []
    need = (_MIN_COPIES[1 : top + 1] - 1) * np.arange(1, top + 1)
    if n <= _TABLE_MAX_CHARS:
        padded = np.concatenate((codes, np.full(top, np.iinfo(np.uint32).max, dtype=np.uint32)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, top + 1)[:n]
        counts = (windows[:, 1:] == windows[:, :1]).sum(axis=0)
    else:
        counts = np.array([np.count_nonzero(codes[length:] == codes[:-length]) for length in range(1, top + 1)])
    return [int(length) + 1 for length in np.flatnonzero(counts >= need)]


def find_loops(text: str) -> list[Loop]:
    """Every maximal loop in `text`, ordered by start, then by pattern length (overlapping ones included)."""
    codes = _codes(text)
    loops: list[Loop] = []
    for length in candidate_lengths(text):
        starts, ends = _runs(codes[length:] == codes[:-length])
        # A run of r equal pairs at distance L is a periodic stretch of r + L characters.
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            copies = (end - start + length) // length
            if copies >= _MIN_COPIES[length]:
                loops.append(Loop(start, length, copies))
    loops.sort(key=lambda loop: (loop.start, loop.length))
    return loops


class LoopCollapser:
    """Collapses loops in text that arrives a piece at a time; releases only text no later piece can change.

    Per character, for every tracked pattern length L, it keeps the length of the periodic stretch with
    period L that ends at that character. A stretch of more than two copies *may* become a loop, so its
    third copy on is held back; when a stretch reaches `min_copies(L)` copies it is a loop: its first two
    copies are released, the rest dropped, and further characters that continue the pattern are dropped a
    whole copy at a time (a partial copy followed by other text is released: it is ordinary text). Held-back
    text is always after the first two copies of every stretch that may still become a loop, so nothing
    released is ever dropped later.

    `release(text)` receives the released text in order; `loops` counts the loops collapsed.
    `lengths` restricts the pattern lengths tracked (`candidate_lengths` of the whole text gives the same
    result for that text, faster); None tracks every length up to `MAX_PATTERN_CHARS`.
    """

    def __init__(self, release: Callable[[str], None], lengths: Sequence[int] | None = None) -> None:
        self._release = release
        tracked = range(1, MAX_PATTERN_CHARS + 1) if lengths is None else sorted(set(lengths))
        self._lengths = np.array(list(tracked), dtype=np.int64)
        self._min_copies = _MIN_COPIES[self._lengths] if self._lengths.size else self._lengths
        self.loops = 0
        self._reset()
        self._pattern = ""  # the loop being dropped ("" when none)
        self._phase = 0  # characters of the current copy of `_pattern` seen so far

    def _reset(self) -> None:
        self._ring = np.zeros(_RING, dtype=np.int64)  # last characters as code points, at index n % _RING
        self._runs = np.zeros(self._lengths.size, dtype=np.int64)  # trailing equal pairs per length
        self._text: list[str] = []  # characters since the last loop
        self._released = 0  # characters of `_text` released

    def push(self, text: str) -> None:
        """Read more text."""
        for char in text:
            if self._pattern:
                self._push_in_loop(char)
            else:
                self._push(char)

    def _push_in_loop(self, char: str) -> None:
        if char == self._pattern[self._phase]:
            self._phase = (self._phase + 1) % len(self._pattern)
            return
        partial = self._pattern[: self._phase]  # not a whole copy: ordinary text
        self._pattern, self._phase = "", 0
        self._reset()
        if partial:
            self._release(partial)
        self._push(char)

    def _push(self, char: str) -> None:
        n = len(self._text)  # index of `char`
        code = ord(char)
        self._text.append(char)
        self._ring[n % _RING] = code
        if not self._lengths.size:
            self._flush(n + 1)
            return
        lengths = self._lengths
        back = self._ring[(n - lengths) % _RING]
        equal = (back == code) & (lengths <= n)
        self._runs = np.where(equal, self._runs + 1, 0)
        stretch = self._runs + lengths  # periodic characters ending at `char`, per length
        loops = stretch >= self._min_copies * lengths
        if loops.any():
            cuts = (n + 1 - stretch + KEPT_COPIES * lengths)[loops]
            best = int(np.lexsort((lengths[loops], cuts))[0])
            cut, length = int(cuts[best]), int(lengths[loops][best])
            self._flush(cut)
            self._pattern = "".join(self._text[n + 1 - length :])
            self._phase = 0
            self.loops += 1
            self._reset()
            return
        forming = stretch > KEPT_COPIES * lengths
        settled = int((n + 1 - stretch + KEPT_COPIES * lengths)[forming].min()) if forming.any() else n + 1
        self._flush(settled)

    def _flush(self, end: int) -> None:
        if end > self._released:
            self._release("".join(self._text[self._released : end]))
            self._released = end

    def finish(self) -> None:
        """No more text: release what was held back, including the partial copy of a loop being dropped (not a
        whole copy, so ordinary text, as in `collapse_loops`)."""
        if self._pattern:
            partial = self._pattern[: self._phase]
            self._pattern, self._phase = "", 0
            if partial:
                self._release(partial)
        else:
            self._flush(len(self._text))
        self._reset()


def collapse_loops(text: str) -> tuple[str, int]:
    """`text` with every loop replaced by its first `KEPT_COPIES` copies, and how many were collapsed
    (`LoopCollapser` over the whole text, tracking only the lengths of the loops `find_loops` sees in it:
    the collapser only ever stops at a loop of the text, so the result is the same, faster)."""
    lengths = {loop.length for loop in find_loops(text)}
    if not lengths:
        return text, 0
    pieces: list[str] = []
    collapser = LoopCollapser(pieces.append, sorted(lengths))
    collapser.push(text)
    collapser.finish()
    return "".join(pieces), collapser.loops
