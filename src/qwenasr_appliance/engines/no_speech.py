"""Where Qwen3-ASR decides between speech and silence, for `no_speech_prob`.

Whisper's `no_speech_prob` is the probability of its `<|nospeech|>` token at the first decoding step.
Qwen3-ASR has no such token; it has two equivalent decisions:

- language detected by the model: the output starts `language X<asr_text>`, and on silence X is
  `None`. The decision is the step right after `language`; the "no speech" tokens are the first
  token of ` None`.
- language forced: the prompt already ends in `<asr_text>`; silence is an empty transcript, so the
  decision is the first step and the "no speech" tokens are the end tokens.

Both engines use these helpers; each reads the probabilities its own way (see `docs/accuracy.md`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_HEADER_WORD = "language"
_MAX_HEADER_TOKENS = 4


def decision_step(token_texts: Sequence[str], forced: bool) -> int | None:
    """The index of the generated token at which the model chose speech or silence; None when the
    output does not start with the `language` header (then there is no such decision to read)."""
    if forced:
        return 0 if token_texts else None
    written = ""
    for index, text in enumerate(token_texts[:_MAX_HEADER_TOKENS]):
        written += text
        if written.strip() == _HEADER_WORD:
            return index + 1 if index + 1 < len(token_texts) else None
        if not _HEADER_WORD.startswith(written.strip()):
            return None
    return None


def no_speech_token_ids(tokenizer: Any, forced: bool, end_ids: Sequence[int]) -> list[int]:
    """The token ids that start the "no speech" path at the decision step."""
    if forced:
        return list(end_ids)
    ids: list[int] = tokenizer.encode(" None", add_special_tokens=False)
    return ids[:1]
