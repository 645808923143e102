"""Confidence numbers of a chunk's transcript, in the meaning Whisper (and OpenAI's verbose_json) gives them.

- `avg_logprob`: the mean natural-log probability of the transcript's tokens, the end token included,
  as Whisper computes it (`whisper/decoding.py`: `sum_logprobs / (len(tokens) + 1)`, the +1 being the
  end-of-text token). Tokens of the `language X<asr_text>` header are not part of the transcript.
- `compression_ratio`: `len(text_bytes) / len(zlib.compress(text_bytes))` of the UTF-8 text, exactly
  Whisper's `whisper/utils.py: compression_ratio`; above 2.4 Whisper treats the text as repetitive.
- `no_speech_prob` comes from the engine (`EngineOutput.no_speech_prob`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from qwenasr_appliance.engines.base import TokenLogprob
from qwenasr_appliance.engines.prompt import ASR_TEXT_TAG


def compression_ratio(text: str) -> float:
    """Whisper's compression ratio of `text` (0.0 for empty text)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def transcript_tokens(tokens: Sequence[TokenLogprob], forced_language: str | None) -> list[TokenLogprob]:
    """The tokens after the `<asr_text>` tag (all of them when the prompt already ended in it)."""
    if forced_language:
        return list(tokens)
    written = ""
    for index, token in enumerate(tokens):
        written += token.token
        if ASR_TEXT_TAG in written:
            return list(tokens[index + 1 :])
    return list(tokens)  # no header: the model wrote text only


def avg_logprob(tokens: Sequence[TokenLogprob]) -> float | None:
    """Mean log-probability of `tokens` (the end token is among them when generation stopped on it)."""
    if not tokens:
        return None
    return sum(token.logprob for token in tokens) / len(tokens)


def visible_tokens(tokens: Sequence[TokenLogprob]) -> list[TokenLogprob]:
    """Tokens that carry text (the end token and other special tokens decode to nothing)."""
    return [token for token in tokens if token.token]
