"""`logprobs[].bytes` are each token's own bytes (OpenAI's meaning), also when a token holds only part of a
multi-byte character: byte-level BPE splits `ü` (C3 BC) over two tokens in the tiny tokenizers, and a
Qwen-style vocabulary with merges cuts a CJK character (3 bytes) into a 2-byte and a 1-byte token.
Decoded alone such a token is U+FFFD, whose UTF-8 is EF BF BD: that was the bug.

Tokenizers: the tiny byte-level one of `tests/fixtures/tiny-asr-en-de` (one token per byte, Qwen3's
special tokens), the same with BPE merges added (as Qwen's real vocabulary has), and duck-typed ones
(SentencePiece byte fallback; no `convert_ids_to_tokens`, as the vLLM test doubles).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from qwenasr_appliance.api.render import to_logprobs
from qwenasr_appliance.engines.token_bytes import token_bytes, token_texts
from qwenasr_appliance.transcription.types import TokenConfidence, Transcript, TranscriptSegment
from tests.tiny_model import _bytes_to_unicode, _write_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "tiny-asr-en-de"
SPEECH = FIXTURES / "speech-en-de"
REPLACEMENT = "\ufffd"
TEXTS = ["grün", "zwölf schön", "weiß", "中文", "Grüße 🎤 ok", "a\u00a0b"]  # 2-, 3- and 4-byte characters


def _load(directory: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def byte_level() -> Any:
    """The tiny checkpoint's tokenizer: one token per byte."""
    return _load(CHECKPOINT)


# Merges a Qwen-style vocabulary has, as byte pairs: whole `ü`, the first two bytes of `中` (E4 B8), `gr`, ` s`.
_SYMBOL = _bytes_to_unicode()
MERGES = [(_SYMBOL[left], _SYMBOL[right]) for left, right in ((0xC3, 0xBC), (0xE4, 0xB8), (0x67, 0x72), (0x20, 0x73))]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("bpe-tokenizer")
    _write_tokenizer(directory)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    vocab.update({left + right: 400 + index for index, (left, right) in enumerate(MERGES)})
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{left} {right}" for left, right in MERGES)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return _load(directory)


def _expected(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """Each token's bytes straight from its vocabulary entry (GPT-2's table, written out independently)."""
    byte_of = {symbol: byte for byte, symbol in enumerate(_bytes_to_unicode())}
    return [bytes(byte_of[symbol] for symbol in entry) for entry in tokenizer.convert_ids_to_tokens(ids)]


def _pieces(tokenizer: Any, text: str) -> tuple[list[int], list[str], list[bytes]]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    texts = token_texts(tokenizer, ids)
    return ids, texts, token_bytes(tokenizer, ids, texts)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("name", ["byte_level", "bpe"])
def test_every_token_gets_its_own_bytes(request: pytest.FixtureRequest, name: str, text: str) -> None:
    tokenizer = request.getfixturevalue(name)
    ids, texts, raw = _pieces(tokenizer, text)
    assert raw == _expected(tokenizer, ids)
    assert b"".join(raw) == text.encode("utf-8")  # a client can rebuild the text from `bytes`
    for token, piece in zip(texts, raw, strict=True):
        if REPLACEMENT in token:
            assert piece != REPLACEMENT.encode() and len(piece) < 4
        else:
            assert piece == token.encode("utf-8")


def test_a_german_u_umlaut_split_over_two_tokens_gives_each_its_one_byte(byte_level: Any) -> None:
    _, texts, raw = _pieces(byte_level, "grün")
    assert texts == ["g", "r", REPLACEMENT, REPLACEMENT, "n"]
    assert raw == [b"g", b"r", b"\xc3", b"\xbc", b"n"]


def test_merged_tokens_carry_whole_and_partial_characters(bpe: Any) -> None:
    _, texts, raw = _pieces(bpe, "grün 中")
    assert list(zip(texts, raw, strict=True)) == [
        ("gr", b"gr"),
        ("ü", "ü".encode()),  # a whole character in one token: its text's UTF-8
        ("n", b"n"),
        (" ", b" "),
        (REPLACEMENT, b"\xe4\xb8"),  # two of the three bytes of 中
        (REPLACEMENT, b"\xad"),
    ]


def test_special_and_added_tokens(byte_level: Any) -> None:
    end, tag = byte_level.convert_tokens_to_ids(["<|im_end|>", "<asr_text>"])
    texts = token_texts(byte_level, [end, tag])
    assert texts == ["", "<asr_text>"]  # the end token is skipped in the text, as in the transcript
    assert token_bytes(byte_level, [end, tag], texts) == [b"", b"<asr_text>"]


class _SentencePieceLike:
    """A SentencePiece vocabulary with byte fallback: `ü` as `<0xC3>` `<0xBC>`; `▁` is not a byte symbol."""

    pieces = {1: "<0xC3>", 2: "<0xBC>", 3: "▁gr", 4: "▁"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return {1: REPLACEMENT, 2: REPLACEMENT, 3: " gr", 4: REPLACEMENT}[ids[0]]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.pieces[i] for i in ids]


def test_sentencepiece_byte_fallback_and_unknown_entries() -> None:
    tokenizer = _SentencePieceLike()
    texts = token_texts(tokenizer, [3, 1, 2, 4])
    # An entry that is neither byte-level nor a byte fallback keeps its text's UTF-8: nothing better is known.
    assert token_bytes(tokenizer, [3, 1, 2, 4], texts) == [b" gr", b"\xc3", b"\xbc", REPLACEMENT.encode()]


def test_a_tokenizer_without_a_vocabulary_view_gets_the_texts_utf8() -> None:
    class Plain:
        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return ["hi", REPLACEMENT][ids[0]]

    assert token_bytes(Plain(), [0, 1], ["hi", REPLACEMENT]) == [b"hi", REPLACEMENT.encode()]


def test_the_api_sends_the_tokens_bytes() -> None:
    tokens = (
        TokenConfidence("gr", -0.1, b"gr"),
        TokenConfidence(REPLACEMENT, -0.2, b"\xc3"),
        TokenConfidence(REPLACEMENT, -0.3, b"\xbc"),
        TokenConfidence("n", -0.4, b"n"),
    )
    segment = TranscriptSegment(start=0.0, end=1.0, text="grün", tokens=tokens)
    transcript = Transcript(text="grün", language="German", duration=1.0, segments=[segment])
    logprobs = to_logprobs(transcript)
    assert [(item.token, item.bytes) for item in logprobs] == [
        ("gr", [0x67, 0x72]),
        (REPLACEMENT, [0xC3]),
        (REPLACEMENT, [0xBC]),
        ("n", [0x6E]),
    ]


# -- the CPU engine on the trained tiny checkpoint: German speech with umlauts --------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    pytest.importorskip("qwen_asr")
    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}: see training/README.md")
    import torch

    from qwenasr_appliance.config import Settings
    from qwenasr_appliance.engines.cpu.engine import CPUEngine

    threads = torch.get_num_threads()
    loaded = CPUEngine(Settings(model_id=str(CHECKPOINT), cpu_threads=1, max_new_tokens=96))
    asyncio.run(loaded.load())
    yield loaded
    asyncio.run(loaded.close())
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(("clip", "umlaut"), [("26-ge.flac", "ü"), ("31-ge.flac", "ö")])
@pytest.mark.parametrize("language", [None, "German"])
def test_the_cpu_engine_gives_split_umlauts_their_own_bytes(
    engine: Any, clip: str, umlaut: str, language: str | None
) -> None:
    from qwenasr_appliance.engines.base import TranscribeOptions, run_to_completion

    audio, rate = sf.read(SPEECH / clip, dtype="float32")
    assert rate == 16000
    options = TranscribeOptions(language=language, max_new_tokens=96, logprobs=True)
    output = asyncio.run(run_to_completion(engine, audio, options, clip))
    assert umlaut in output.raw_text and output.logprobs is not None
    assert b"".join(token.raw for token in output.logprobs) == output.raw_text.encode("utf-8")
    partial = [token.raw for token in output.logprobs if REPLACEMENT in token.token]
    assert partial == [bytes([byte]) for byte in umlaut.encode("utf-8")]  # e.g. [b"\xc3", b"\xbc"] for ü
