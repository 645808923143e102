"""Writing-system tests on single characters, by Unicode code point ranges.

Two questions, answered from one table each:
- `is_cjk_ideograph`: the CJK ideographs the forced aligner times one character at a time, exactly the
  ranges of qwen-asr's `is_cjk_char` (`qwen_asr/inference/qwen3_forced_aligner.py`).
- `joins_without_space`: characters of Chinese and Japanese writing, which puts no spaces between
  words (CJK ideographs of every block, kana, CJK symbols and punctuation such as 。and 「, full-width
  forms and half-width katakana), where chunk texts are joined without a space.

Korean is written with spaces between words (eojeol), so Hangul is not in the second table: two
Korean chunks are joined with a space like English ones. Thai, Lao, Khmer and Burmese put no spaces
between words but do put one between phrases and sentences; a chunk is cut at a pause, which is such
a boundary, so their chunks are joined with a space too.
"""

from __future__ import annotations

from typing import Final

_CJK_IDEOGRAPHS: Final = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
)
_UNSPACED: Final = (
    *_CJK_IDEOGRAPHS,
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。「」
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x31F0, 0x31FF),  # katakana phonetic extensions
    (0x3300, 0x33FF),  # CJK compatibility (square units)
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFF9F),  # full-width ASCII and punctuation, half-width katakana (not half-width Hangul)
    (0xFFE0, 0xFFEF),  # full-width signs
)


def _in_ranges(char: str, ranges: tuple[tuple[int, int], ...]) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in ranges)


def is_cjk_ideograph(char: str) -> bool:
    """True for a CJK ideograph (one character), as qwen-asr defines them."""
    return _in_ranges(char, _CJK_IDEOGRAPHS)


def joins_without_space(char: str) -> bool:
    """True for a character of a script whose chunk texts are joined without a space."""
    return _in_ranges(char, _UNSPACED)
