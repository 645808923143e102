"""Writing-system tests on single characters, by Unicode code point ranges.

Two questions, answered from one table each:
- `is_cjk_ideograph`: the CJK ideographs the forced aligner times one character at a time, exactly the
  ranges of qwen-asr's `is_cjk_char` (`qwen_asr/inference/qwen3_forced_aligner.py`).
- `joins_without_space`: characters of scripts written without spaces between words (kana, CJK
  ideographs, Hangul syllables, compatibility ideographs, full-width forms), where chunk texts are
  joined without a space.
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
    (0x3040, 0x30FF),  # kana
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),  # hangul
    (0xF900, 0xFAFF),
    (0xFF00, 0xFFEF),
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
