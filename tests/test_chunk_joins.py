"""Joining chunk texts (`transcription.text.join_texts`) by writing system, and the languages of a
recording of several (`transcription.pipeline.spoken_languages`, `api.render.transcript_headers`)."""

from __future__ import annotations

import numpy as np
import pytest

from qwenasr_appliance.api.render import render, transcript_headers
from qwenasr_appliance.audio.split import AudioChunk
from qwenasr_appliance.engines.prompt import ParsedTranscript
from qwenasr_appliance.transcription.pipeline import spoken_languages
from qwenasr_appliance.transcription.text import join_texts
from qwenasr_appliance.transcription.types import Transcript, TranscriptSegment
from qwenasr_appliance.writing import joins_without_space


@pytest.mark.parametrize(
    ("parts", "joined"),
    [
        # Korean puts spaces between words (eojeol): chunks join with one, like English.
        (["안녕하세요 여러분", "오늘은 날씨가"], "안녕하세요 여러분 오늘은 날씨가"),
        (["감사합니다.", "네"], "감사합니다. 네"),
        # Chinese and Japanese put none, also around their full-width punctuation.
        (["你好", "世界"], "你好世界"),
        (["你好。", "世界"], "你好。世界"),
        (["今日は", "いい天気です"], "今日はいい天気です"),
        (["「こんにちは」", "カタカナ"], "「こんにちは」カタカナ"),
        (["𠀀𠀁", "𠀂"], "𠀀𠀁𠀂"),  # ideographs outside the basic plane
        # Thai: no spaces between words, one between phrases; a chunk ends at a pause.
        (["สวัสดีครับ", "วันนี้อากาศดี"], "สวัสดีครับ วันนี้อากาศดี"),
        # Mixed: a space only where neither side is Chinese or Japanese writing.
        (["I said 你好", "and left"], "I said 你好and left"),
        (["안녕", "hello"], "안녕 hello"),
        (["hello", "こんにちは"], "helloこんにちは"),
        (["Hello world", "how are you"], "Hello world how are you"),
        (["", "  a ", "", "b"], "a b"),
    ],
)
def test_chunks_join_by_writing_system(parts: list[str], joined: str) -> None:
    assert join_texts(parts) == joined


@pytest.mark.parametrize("char", ["가", "힣", "ᄀ", "ㄱ", "ﾡ", "ก", "a", "1", "é"])
def test_spaced_scripts_are_not_unspaced(char: str) -> None:
    assert not joins_without_space(char)


@pytest.mark.parametrize(
    "char", ["中", "𠀀", "あ", "ア", "ｱ", "。", "、", "「", "\uff0c", "\uff21"]
)  # full-width comma and A
def test_chinese_and_japanese_writing_is_unspaced(char: str) -> None:
    assert joins_without_space(char)


def _chunk(start: float, seconds: float) -> AudioChunk:
    samples = np.zeros(int(seconds * 16_000), dtype=np.float32)
    first = int(start * 16_000)
    return AudioChunk(first, first + samples.size, start, samples)


def test_languages_are_listed_longest_first_and_forced_is_alone() -> None:
    chunks = [_chunk(0, 10), _chunk(10, 25), _chunk(35, 12), _chunk(47, 3)]
    parsed = [
        ParsedTranscript(language="Chinese", text="你好"),
        ParsedTranscript(language="English", text="hello"),
        ParsedTranscript(language="Chinese", text="世界"),
        ParsedTranscript(language="German", text=""),  # no text: it does not count
    ]
    assert spoken_languages(parsed, chunks, None) == ("English", "Chinese")  # 25 s against 22 s
    assert spoken_languages(parsed, chunks, "German") == ("German",)
    assert spoken_languages([ParsedTranscript(language="", text="")], chunks[:1], None) == ()


def test_content_language_lists_every_language_and_verbose_json_names_the_main_one() -> None:
    transcript = Transcript(
        "hello 你好",
        "English",
        50.0,
        [TranscriptSegment(0, 25, "hello"), TranscriptSegment(25, 47, "你好")],
        languages=("English", "Chinese", "Cantonese"),
    )
    headers = transcript_headers(transcript)
    assert headers["Content-Language"] == "en, zh, yue"
    assert "X-Unaligned-Languages" not in headers
    body, _ = render(transcript, "verbose_json")
    assert b'"language":"english"' in body
    assert "Content-Language" not in transcript_headers(Transcript("", "", 1.0))


def test_languages_left_without_word_timestamps_are_named() -> None:
    transcript = Transcript("x", "Thai", 5.0, languages=("Thai", "English"), unaligned_languages=("Thai", "Vietnamese"))
    assert transcript_headers(transcript)["X-Unaligned-Languages"] == "th, vi"
