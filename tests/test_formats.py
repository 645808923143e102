from __future__ import annotations

import json

from qwenasr_appliance.api.render import Transcript, TranscriptSegment, render, to_srt, to_vtt
from qwenasr_appliance.transcription.pipeline import join_texts

TRANSCRIPT = Transcript(
    text="Hello there. General Kenobi.",
    language="English",
    duration=3725.5,
    segments=[
        TranscriptSegment(0.5, 1.87, "Hello there.", speech=((0.5, 1.87),)),
        TranscriptSegment(29.87, 31.0, "   "),
        TranscriptSegment(3700.25, 3702.5, "General Kenobi.", speech=((3700.25, 3702.5),)),
    ],
)


def test_srt_counts_cues_and_formats_hours() -> None:
    srt = to_srt(TRANSCRIPT)
    assert srt.startswith("1\n00:00:00,500 --> 00:00:01,870\nHello there.\n")
    assert "2\n01:01:40,250 --> 01:01:42,500\nGeneral Kenobi.\n" in srt


def test_vtt_header_and_dot_separator() -> None:
    vtt = to_vtt(TRANSCRIPT)
    assert vtt.startswith("WEBVTT\n\n00:00:00.500 --> 00:00:01.870\nHello there.\n")
    assert "01:01:40.250 --> 01:01:42.500" in vtt


def test_json_text_and_verbose_json_shapes() -> None:
    body, content_type = render(TRANSCRIPT, "json")
    assert content_type == "application/json"
    assert json.loads(body) == {"text": TRANSCRIPT.text, "usage": {"type": "duration", "seconds": 3725.5}}
    body, content_type = render(TRANSCRIPT, "text")
    assert body.decode() == TRANSCRIPT.text + "\n" and content_type.startswith("text/plain")
    verbose = json.loads(render(TRANSCRIPT, "verbose_json")[0])
    assert verbose["task"] == "transcribe" and verbose["language"] == "english"
    assert [s["id"] for s in verbose["segments"]] == [0, 1]
    assert verbose["segments"][1]["start"] == 3700.25 and "words" not in verbose


def test_join_texts_spaces_words_but_not_cjk() -> None:
    assert join_texts(["Hello world", "how are you"]) == "Hello world how are you"
    assert join_texts(["你好", "世界"]) == "你好世界"
    assert join_texts(["", "  a ", "", "b"]) == "a b"
