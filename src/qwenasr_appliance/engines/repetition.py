"""Runaway loops in decoded text: find them, collapse them to two copies, and know where a loop may
still be forming at the end of text that is still being generated.

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

Everything is computed on code points with numpy (`eq[L, i] = text[i] == text[i + L]`), so a chunk's
text costs well under a millisecond and long text stays linear in its length times `MAX_PATTERN_CHARS`.
"""

from __future__ import annotations

import math
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


def _candidate_lengths(codes: npt.NDArray[np.uint32]) -> list[int]:
    """Pattern lengths that have enough equal pairs anywhere to hold a loop (a cheap necessary test)."""
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
    for length in _candidate_lengths(codes):
        starts, ends = _runs(codes[length:] == codes[:-length])
        # A run of r equal pairs at distance L is a periodic stretch of r + L characters.
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            copies = (end - start + length) // length
            if copies >= _MIN_COPIES[length]:
                loops.append(Loop(start, length, copies))
    loops.sort(key=lambda loop: (loop.start, loop.length))
    return loops


def collapse_loops(text: str) -> tuple[str, int]:
    """`text` with every loop replaced by its first `KEPT_COPIES` copies, and how many were collapsed.

    Loops are taken left to right (the shortest pattern first at one start); one that starts inside a
    collapsed loop is part of it. A partial copy after the last whole one stays as ordinary text.
    """
    pieces: list[str] = []
    position = 0
    collapsed = 0
    for loop in find_loops(text):
        if loop.start < position:
            continue
        pieces.append(text[position : loop.start + loop.length * KEPT_COPIES])
        position = loop.end
        collapsed += 1
    if not collapsed:
        return text, 0
    pieces.append(text[position:])
    return "".join(pieces), collapsed


def unsettled_tail_start(text: str) -> int:
    """Where a loop may still be forming at the end of `text` (text still being generated): the start
    of the third copy of the earliest periodic stretch at the end; `len(text)` when there is none.

    Whatever more is generated, `collapse_loops` keeps the first two copies of a stretch that becomes a
    loop, and text before it: so `text[:unsettled_tail_start(text)]` is settled.
    """
    window = MAX_PATTERN_CHARS * (KEPT_COPIES + 2)
    offset = max(0, len(text) - window)
    reversed_codes = _codes(text[offset:])[::-1]
    n = reversed_codes.size
    top = min(MAX_PATTERN_CHARS, n // KEPT_COPIES)
    if top < 1:
        return len(text)
    # Row j, column L-1: the j-th character from the end equals the one L before it. The padding never
    # equals a character, so every column has a False where its pairs run out.
    padded = np.concatenate((reversed_codes, np.full(top, np.iinfo(np.uint32).max, dtype=np.uint32)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, top + 1)[:n]
    runs = np.argmin(windows[:, 1:] == windows[:, :1], axis=0)  # trailing equal pairs per length
    lengths = np.arange(1, top + 1)
    stretch = runs + lengths  # trailing periodic characters
    forming = stretch > KEPT_COPIES * lengths
    if not forming.any():
        return len(text)
    cuts = n - stretch[forming] + KEPT_COPIES * lengths[forming]
    return offset + int(cuts.min())
