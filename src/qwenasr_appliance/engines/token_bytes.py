"""Each generated token's text and its own bytes (OpenAI's `logprobs[].token` and `logprobs[].bytes`).

Qwen's tokenizer is a byte-level BPE: a token is a run of bytes, and may hold part of a multi-byte UTF-8
character (`ü` is C3 BC; `zwölf` may be `zw`, C3, B6 `lf`). Decoded alone such a token is U+FFFD, whose
UTF-8 (EF BF BD) is not what the token holds; its bytes come from the vocabulary instead: a byte-level
token is written as one printable symbol per byte (GPT-2's `bytes_to_unicode` table), SentencePiece's
byte fallback as `<0xC3>`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-level table, reversed: the symbol a byte-level vocabulary writes for each byte (the
    printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    symbols = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in symbols)
    symbols.update({byte: chr(256 + index) for index, byte in enumerate(shifted)})
    return {symbol: byte for byte, symbol in symbols.items()}


def token_texts(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Each token decoded alone, special tokens (the end token) as "": OpenAI's `token`. A token that
    holds part of a character decodes to U+FFFD."""
    return [str(tokenizer.decode([token], skip_special_tokens=True)) for token in token_ids]


def token_bytes(tokenizer: Any, token_ids: Sequence[int], texts: Sequence[str]) -> list[bytes]:
    """The bytes each token stands for (OpenAI's `bytes`): the UTF-8 of its `texts` entry (from
    `token_texts`) when that is whole, else read from the vocabulary, so a character split over tokens
    gives each token its own bytes and their concatenation is the text's UTF-8.

    `tokenizer` is a Hugging Face tokenizer (`decode`, `convert_ids_to_tokens`); without the latter, or for
    a vocabulary entry that is neither byte-level nor a byte fallback, the token's text is encoded."""
    pieces = [text.encode("utf-8") for text in texts]
    partial = [index for index, text in enumerate(texts) if _REPLACEMENT in text]
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if not partial or convert is None:
        return pieces
    entries = convert([int(token_ids[index]) for index in partial])
    for index, entry in zip(partial, entries, strict=True):
        raw = _vocabulary_bytes(entry)
        if raw is not None:
            pieces[index] = raw
    return pieces


def _vocabulary_bytes(entry: object) -> bytes | None:
    """The bytes a vocabulary entry stands for; None when it is neither byte-level nor a byte fallback."""
    if not isinstance(entry, str) or not entry:
        return None
    fallback = _BYTE_FALLBACK.fullmatch(entry)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    table = _byte_of_symbol()
    if all(symbol in table for symbol in entry):
        return bytes(table[symbol] for symbol in entry)
    return None
