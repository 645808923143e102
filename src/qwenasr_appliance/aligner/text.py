"""What Qwen3-ForcedAligner expects around the model, without the `qwen-asr` package.

The GPU image has vLLM but not `qwen-asr` (their transformers pins conflict), so the vLLM aligner
needs the package's text side on its own: splitting the transcript into the aligner's units, the
prompt with two `<timestamp>` slots after each unit, and the repair of the predicted times. These
functions follow `qwen_asr.inference.qwen3_forced_aligner.Qwen3ForceAlignProcessor` (qwen-asr 0.0.6)
and are tested against it where the package is installed.

Two documented differences, for languages whose splitting needs extra packages:

* Japanese: words come from `nagisa` when it is installed (as in qwen-asr); otherwise every kana and
  kanji is a unit of its own (Latin and digit runs stay words).
* Korean: words are the space-separated eojeol (qwen-asr splits them further with `soynlp` and a
  dictionary shipped inside the package).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwenasr_appliance.aligner.base import AlignedUnit
from qwenasr_appliance.writing import is_cjk_ideograph

AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
TIMESTAMP_TOKEN = "<timestamp>"  # noqa: S105 - a model token, not a secret


def is_kept_char(char: str) -> bool:
    """Letters, digits and the apostrophe stay in a unit; punctuation and symbols go."""
    if char == "'":
        return True
    category = unicodedata.category(char)
    return category.startswith(("L", "N"))


def clean_token(token: str) -> str:
    return "".join(char for char in token if is_kept_char(char))


def _is_kana(char: str) -> bool:
    return 0x3040 <= ord(char) <= 0x30FF or 0x31F0 <= ord(char) <= 0x31FF


def _split_cjk(segment: str, *, kana: bool = False) -> list[str]:
    """Every ideograph (and kana, if asked) on its own; the runs between them stay whole."""
    units: list[str] = []
    buffer = ""
    for char in segment:
        if is_cjk_ideograph(char) or (kana and _is_kana(char)):
            if buffer:
                units.append(buffer)
                buffer = ""
            units.append(char)
        else:
            buffer += char
    if buffer:
        units.append(buffer)
    return units


def split_space_language(text: str) -> list[str]:
    """qwen-asr's `tokenize_space_lang`: whitespace words without punctuation, ideographs one by one."""
    units: list[str] = []
    for segment in text.split():
        cleaned = clean_token(segment)
        if cleaned:
            units.extend(_split_cjk(cleaned))
    return units


def _split_japanese(text: str) -> list[str]:
    try:
        import nagisa
    except ImportError:
        units: list[str] = []
        for segment in text.split():
            cleaned = clean_token(segment)
            if cleaned:
                units.extend(_split_cjk(cleaned, kana=True))
        return units
    words: list[Any] = nagisa.tagging(text).words
    return [cleaned for cleaned in (clean_token(str(word)) for word in words) if cleaned]


def split_units(text: str, language: str) -> list[str]:
    """The units the aligner times for `text` in `language` (the model's language name, or "")."""
    if language.strip().lower() == "japanese":
        return _split_japanese(text)
    return split_space_language(text)


def build_align_prompt(units: Sequence[str]) -> str:
    """The aligner's input text: the audio placeholder, then each unit followed by two timestamp slots."""
    slots = TIMESTAMP_TOKEN * 2
    return AUDIO_PLACEHOLDER + "".join(f"{unit}{slots}" for unit in units)


def fix_timestamps(values: Sequence[float]) -> list[int]:
    """qwen-asr's `fix_timestamp`: keep the longest non-decreasing subsequence of the predicted times and
    replace the others (short runs by the nearer neighbour, longer ones by linear interpolation).

    The same choices as the package's O(n^2) loop (the earliest longest subsequence), with the inner
    loop in numpy.
    """
    data = np.asarray(values, dtype=np.float64)
    n = int(data.shape[0])
    if n == 0:
        return []
    dp = np.ones(n, dtype=np.int64)
    parent = np.full(n, -1, dtype=np.int64)
    for i in range(1, n):
        candidates = np.where(data[:i] <= data[i], dp[:i], 0)
        best = int(candidates.max())
        if best > 0:
            dp[i] = best + 1
            parent[i] = int(np.argmax(candidates == best))
    normal = np.zeros(n, dtype=bool)
    index = int(np.argmax(dp))
    while index != -1:
        normal[index] = True
        index = int(parent[index])

    result: list[float] = data.tolist()
    i = 0
    while i < n:
        if normal[i]:
            i += 1
            continue
        j = i
        while j < n and not normal[j]:
            j += 1
        left = next((result[k] for k in range(i - 1, -1, -1) if normal[k]), None)
        right = next((result[k] for k in range(j, n) if normal[k]), None)
        if j - i <= 2:
            for k in range(i, j):
                if left is None:
                    result[k] = right if right is not None else result[k]
                elif right is None:
                    result[k] = left
                else:
                    result[k] = left if (k - (i - 1)) <= (j - k) else right
        elif left is not None and right is not None:
            step = (right - left) / (j - i + 1)
            for k in range(i, j):
                result[k] = left + step * (k - i + 1)
        elif left is not None or right is not None:
            fill = left if left is not None else right
            for k in range(i, j):
                result[k] = fill  # type: ignore[assignment]
        i = j
    return [int(value) for value in result]


def units_from_bins(units: Sequence[str], bins: Sequence[int], segment_ms: float) -> list[AlignedUnit]:
    """Pair the time bins predicted at the timestamp slots (two per unit) into timed units."""
    if len(bins) != 2 * len(units):
        raise ValueError(f"expected {2 * len(units)} timestamp predictions for {len(units)} units, got {len(bins)}")
    fixed = fix_timestamps([float(b) * segment_ms for b in bins])
    return [
        AlignedUnit(unit, round(fixed[2 * i] / 1000.0, 3), round(fixed[2 * i + 1] / 1000.0, 3))
        for i, unit in enumerate(units)
    ]


__all__ = [
    "AUDIO_PLACEHOLDER",
    "TIMESTAMP_TOKEN",
    "build_align_prompt",
    "clean_token",
    "fix_timestamps",
    "split_space_language",
    "split_units",
    "units_from_bins",
]
