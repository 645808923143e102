"""Subtitle cues (`transcription.subtitles`): the limits of common subtitle practice hold for any
transcript (hypothesis), the output parses with pysrt and webvtt-py, cues break at sentence ends and
pauses, and their times come from word timestamps when there are some, else from the sound's stretches."""

from __future__ import annotations

import itertools

import pysrt
import pytest
import webvtt
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenasr_appliance.api.render import to_srt, to_vtt
from qwenasr_appliance.transcription.subtitles import Cue, SubtitleRules, build_cues, display_width
from qwenasr_appliance.transcription.types import Transcript, TranscriptSegment, TranscriptWord

RULES = SubtitleRules()


def squeeze(text: str) -> str:
    return "".join(text.split())


def check_limits(cues: list[Cue], transcript: Transcript, rules: SubtitleRules = RULES) -> None:
    for cue in cues:
        assert 1 <= len(cue.lines) <= rules.max_lines
        assert all(display_width(line) <= rules.max_line_width and line.strip() == line for line in cue.lines)
        assert all(line for line in cue.lines)
        assert cue.end > cue.start >= 0.0
        assert cue.end - cue.start <= rules.max_cue_seconds + 1e-9
    for earlier, later in itertools.pairwise(cues):
        assert earlier.end <= later.start, "cues overlap"
    # Every character of the transcript, once and in order (whitespace aside).
    assert "".join(squeeze(c.text) for c in cues) == "".join(squeeze(s.text) for s in transcript.segments)


WORDS = st.text(
    alphabet=st.sampled_from([*"abcdefghij", "你", "好", "。", ",", ".", "?", "안", "녕", "ส", "ั", "-", "'"]),
    min_size=1,
    max_size=60,
)


@st.composite
def transcripts(draw: st.DrawFn) -> Transcript:
    segments: list[TranscriptSegment] = []
    time = draw(st.floats(0.0, 5.0))
    for _ in range(draw(st.integers(1, 5))):
        words = draw(st.lists(WORDS, min_size=0, max_size=40))
        length = draw(st.floats(0.0, 30.0))
        text = " ".join(words)
        speech: tuple[tuple[float, float], ...] = ()
        if draw(st.booleans()) and length > 0:
            cuts = sorted(draw(st.lists(st.floats(time, time + length), min_size=2, max_size=8)))
            speech = tuple((a, b) for a, b in zip(cuts[::2], cuts[1::2], strict=False) if b > a)
        start, end = (speech[0][0], speech[-1][1]) if speech else (time, time + length)
        segments.append(TranscriptSegment(start, end, text, speech))
        time += length + draw(st.floats(0.0, 3.0))
    return Transcript(text="", language="English", duration=time, segments=segments)


@settings(max_examples=300, deadline=None)
@given(transcripts())
def test_cues_keep_the_limits_for_any_transcript(transcript: Transcript) -> None:
    check_limits(build_cues(transcript), transcript)


@settings(max_examples=100, deadline=None)
@given(transcripts(), st.integers(10, 60), st.sampled_from([1, 2]), st.floats(1.0, 10.0))
def test_cues_keep_other_limits_too(transcript: Transcript, width: int, lines: int, seconds: float) -> None:
    rules = SubtitleRules(max_line_width=width, max_lines=lines, max_cue_seconds=seconds)
    check_limits(build_cues(transcript, rules), transcript, rules)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.text(alphabet="abcxyz", min_size=1, max_size=12), st.floats(0.0, 3.0)), min_size=1))
def test_cues_from_word_times_keep_the_limits_and_the_word_times(words: list[tuple[str, float]]) -> None:
    timed, time = [], 0.0
    for word, gap in words:
        timed.append(TranscriptWord(word, time + gap, time + gap + 0.2 + len(word) * 0.05))
        time = timed[-1].end
    text = " ".join(w.word for w in timed) + "."
    transcript = Transcript(text, "English", time + 1, [TranscriptSegment(0.0, time, text)], words=timed)
    cues = build_cues(transcript)
    check_limits(cues, transcript)
    starts = {round(w.start, 3) for w in timed}
    assert all(c.start in starts for c in cues), "a cue starts at a word's aligned start"


def long_english() -> Transcript:
    sentences = [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "It was a bright cold day in April, and the clocks were striking thirteen.",
        "Call me Ishmael.",
        "Some years ago, never mind how long precisely, having little or no money in my purse,"
        " and nothing particular to interest me on shore, I thought I would sail about a little.",
    ]
    text = " ".join(sentences)
    return Transcript(text, "English", 31.0, [TranscriptSegment(0.5, 29.5, text, ((0.5, 29.5),))])


def test_srt_and_vtt_parse_and_keep_the_limits() -> None:
    transcript = long_english()
    subs = pysrt.from_string(to_srt(transcript), error_handling=pysrt.ERROR_RAISE)
    captions = webvtt.from_string(to_vtt(transcript)).captions
    assert len(subs) == len(captions) >= 5
    for sub, caption in zip(subs, captions, strict=True):
        lines = sub.text.split("\n")
        assert len(lines) <= 2 and max(len(line) for line in lines) <= 42
        assert (sub.end.ordinal - sub.start.ordinal) / 1000 <= 7.0
        assert caption.text == sub.text
        assert caption.start == str(sub.start).replace(",", ".") and caption.end == str(sub.end).replace(",", ".")
    assert squeeze("".join(s.text for s in subs)) == squeeze(transcript.segments[0].text)


def test_cues_end_at_sentence_ends_where_they_can() -> None:
    cues = build_cues(long_english())
    texts = [c.text.replace("\n", " ") for c in cues]
    assert "Call me Ishmael." in texts  # a short sentence keeps a cue of its own
    assert any(t.endswith("river bank.") for t in texts)
    assert any(t.endswith("thirteen.") for t in texts)


def test_a_pause_between_words_ends_a_cue() -> None:
    words = [TranscriptWord("one", 0.0, 0.4), TranscriptWord("two", 0.5, 0.9), TranscriptWord("three", 2.0, 2.5)]
    transcript = Transcript("one two three", "English", 3.0, [TranscriptSegment(0.0, 2.5, "one two three")], words)
    cues = build_cues(transcript)
    assert [c.text for c in cues] == ["one two", "three"]
    # The last cue, 0.5 s of speech, stays up for a second (`min_cue_seconds`) as the recording allows.
    assert (cues[0].start, cues[0].end, cues[1].start, cues[1].end) == (0.0, 1.0, 2.0, 3.0)


def test_without_word_times_the_stretches_of_sound_time_the_cues() -> None:
    # Two stretches of sound with a pause between: the pause separates the cues.
    text = "first part here. second part here."
    segment = TranscriptSegment(1.0, 9.0, text, ((1.0, 3.0), (7.0, 9.0)))
    cues = build_cues(Transcript(text, "English", 10.0, [segment]))
    assert [c.text for c in cues] == ["first part here.", "second part here."]
    assert cues[0].start == 1.0 and cues[0].end <= 3.0 + 1e-3
    assert cues[1].start >= 7.0 - 1e-3 and cues[1].end == 9.0


def test_punctuation_is_matched_to_the_aligners_letters() -> None:
    text = "Hello, world! It's 42."
    words = [
        TranscriptWord("Hello", 0.1, 0.5),
        TranscriptWord("world", 0.6, 1.0),
        TranscriptWord("It's", 1.2, 1.4),
        TranscriptWord("42", 1.5, 1.9),
    ]
    cues = build_cues(Transcript(text, "English", 2.0, [TranscriptSegment(0.0, 2.0, text)], words))
    assert "".join(c.text for c in cues).replace("\n", " ").replace("!", "! ").split() == text.split()
    assert cues[0].start == 0.1 and cues[-1].end == 1.9


def test_chinese_and_japanese_lines_break_between_characters_within_the_width() -> None:
    text = "今天天气很好，我们一起去公园散步吧。" * 3  # noqa: RUF001 - a Chinese comma
    segment = TranscriptSegment(0.0, 12.0, text, ((0.0, 12.0),))
    cues = build_cues(Transcript(text, "Chinese", 12.0, [segment]))
    assert all(display_width(line) <= 42 for c in cues for line in c.lines)
    assert all(" " not in c.text for c in cues)  # no spaces put into unspaced writing
    assert "".join(c.text.replace("\n", "") for c in cues) == text


def test_a_word_wider_than_a_line_is_cut_to_fit() -> None:
    text = "x" * 100
    cues = build_cues(Transcript(text, "English", 5.0, [TranscriptSegment(0.0, 5.0, text)]))
    assert all(len(line) <= 42 for c in cues for line in c.lines)
    assert "".join(c.text.replace("\n", "") for c in cues) == text


def test_vtt_escapes_markup_characters() -> None:
    text = "a <b> & c --> d"
    vtt = to_vtt(Transcript(text, "English", 2.0, [TranscriptSegment(0.0, 2.0, text)]))
    assert "&lt;b&gt; &amp; c --&gt; d" in vtt
    (caption,) = webvtt.from_string(vtt).captions
    assert "-->" not in caption.raw_text


@pytest.mark.parametrize("silent", ["", "   "])
def test_no_text_gives_no_cues(silent: str) -> None:
    transcript = Transcript(silent, "", 3.0, [TranscriptSegment(0.0, 3.0, silent)])
    assert build_cues(transcript) == [] and to_srt(transcript) == "" and to_vtt(transcript) == "WEBVTT\n\n"
