"""Partial transcripts of a growing utterance: Qwen3-ASR's own streaming method, without its tokenizer.

qwen-asr's `Qwen3ASRModel.streaming_transcribe` re-decodes all audio of the utterance so far at every
step; from the third step on, the prompt's assistant turn holds the previous output minus its last 5
tokens (`unfixed_chunk_num=2`, `unfixed_token_num=5`), so the model continues stable text and may only
rewrite the unstable tail. Here the same happens on the session side, with one difference: the tokenizer
lives in the engine, so the roll-back counts estimated tokens: a CJK character (Han, kana, Hangul) as
one, any other whitespace-delimited word as `WORD_TOKENS` (English BPE averages about 1.3 tokens a word).

Deltas sent to the client must only ever append (`conversation.item.input_audio_transcription.delta`),
so the text sent is the rolled-back (fixed) text, and the next prefix never drops below it.
"""

from __future__ import annotations

import re
from typing import Final

from qwenasr_appliance.engines.prompt import ASR_TEXT_TAG

UNFIXED_DECODES: Final = 2  # qwen-asr's unfixed_chunk_num: the first decodes run without a prefix
ROLLBACK_TOKENS: Final = 5.0  # qwen-asr's unfixed_token_num
WORD_TOKENS: Final = 1.25
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_UNIT = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_IS_CJK = re.compile(rf"[{_CJK}]")


def rollback(text: str, tokens: float = ROLLBACK_TOKENS) -> str:
    """`text` without its last units worth at least `tokens` estimated tokens, trailing space removed."""
    units = list(_UNIT.finditer(text))
    removed = 0.0
    cut = len(text)
    while units and removed < tokens:
        unit = units.pop()
        removed += 1.0 if _IS_CJK.fullmatch(unit.group()) else WORD_TOKENS
        cut = unit.start()
    return text[:cut].rstrip()


class PartialStabilizer:
    """The fixed text of one utterance across its re-decodes: what to prefix next, what to send.

    Use: `prefix()` for the next decode's `assistant_prefix`, then `update(prefix, generated)` with the
    engine's output (which excludes the prefix); it returns the text to append (a delta, maybe "").
    """

    def __init__(self, forced_language: str | None) -> None:
        self._forced = forced_language
        self.emitted = ""  # transcript text sent so far; only grows
        self.decodes = 0
        self._meta = ""  # `language X<asr_text>` as the model wrote it (empty with a forced language)

    def prefix(self) -> str:
        if self.decodes < UNFIXED_DECODES or (not self._forced and not self._meta):
            return ""
        return self._meta + self.emitted

    def update(self, prefix: str, generated: str) -> str:
        self.decodes += 1
        raw = prefix + generated
        if self._forced:
            meta, body = "", raw
        else:
            head, tag, body = raw.partition(ASR_TEXT_TAG)
            if not tag or "language none" in head.lower():
                return ""  # no text yet, or silence so far
            meta = head + tag
        fixed = rollback(body).strip()
        if not fixed.startswith(self.emitted):
            return ""  # the model changed its mind about text already sent: keep what was sent as the prefix
        self._meta = meta
        delta = fixed[len(self.emitted) :]
        self.emitted = fixed
        return delta

    def remainder(self, final_text: str) -> str:
        """The last delta for a final transcript: the rest of it, if it continues what was sent."""
        if final_text.startswith(self.emitted) and len(final_text) > len(self.emitted):
            return final_text[len(self.emitted) :]
        return ""
