"""On real speech (the held-out utterances assembled into 3 minutes with known pauses), without a model:
chunks are cut in pauses, never inside an utterance; segment times bound the speech within 0.5 s of the
truth; subtitle cues built from the true words keep the limits. The statistics are in docs/accuracy.md."""

from __future__ import annotations

import statistics

import pytest

from qwenasr_appliance.audio.split import is_silent, split_at_quiet_points
from qwenasr_appliance.transcription.pipeline import _timed_segment as _segment
from qwenasr_appliance.transcription.subtitles import build_cues
from qwenasr_appliance.transcription.text import join_texts
from qwenasr_appliance.transcription.types import Transcript

from .long_recording import RATE, PlacedUtterance, assemble


@pytest.fixture(scope="module")
def recording() -> tuple[object, list[PlacedUtterance]]:
    return assemble(180.0)


@pytest.mark.parametrize("chunk_seconds", [30.0, 60.0])
def test_chunks_are_cut_in_pauses_and_segments_bound_the_speech(
    recording: tuple[object, list[PlacedUtterance]], chunk_seconds: float
) -> None:
    samples, placed = recording
    chunks = [c for c in split_at_quiet_points(samples, max_chunk_seconds=chunk_seconds) if not is_silent(c.samples)]  # type: ignore[arg-type]
    assert len(chunks) >= 180 / chunk_seconds
    for chunk in chunks:
        start, end = chunk.start_sample / RATE, chunk.end_sample / RATE
        inside = [u for u in placed if start <= u.start and u.end <= end]
        # No utterance straddles a cut: every one lies wholly in one chunk.
        assert not [u for u in placed if u.start < start < u.end or u.start < end < u.end]
        segment = _segment(chunk, join_texts([u.text for u in inside]))
        assert abs(segment.start - inside[0].start) <= 0.5 and abs(segment.end - inside[-1].end) <= 0.5


def test_cues_from_the_true_words_keep_the_subtitle_limits(recording: tuple[object, list[PlacedUtterance]]) -> None:
    samples, placed = recording
    chunks = split_at_quiet_points(samples, max_chunk_seconds=30.0)  # type: ignore[arg-type]
    segments = []
    for chunk in chunks:
        start, end = chunk.start_sample / RATE, chunk.end_sample / RATE
        text = join_texts([u.text + "." for u in placed if start <= u.start and u.end <= end])
        segments.append(_segment(chunk, text))
    transcript = Transcript(join_texts([s.text for s in segments]), "English", len(samples) / RATE, segments)  # type: ignore[arg-type]
    cues = build_cues(transcript)
    widths = [len(line) for c in cues for line in c.lines]
    durations = [c.end - c.start for c in cues]
    assert max(widths) <= 42 and max(len(c.lines) for c in cues) <= 2 and max(durations) <= 7.0
    # Each cue's words are spoken inside it, give or take 0.5 s (proportional timing within each utterance).
    for cue in cues:
        first_word = cue.text.split()[0].rstrip(".")
        assert any(u.start - 0.5 <= cue.start <= u.end + 0.5 and first_word in u.text.split() for u in placed)
    print(
        f"cues={len(cues)} max_chars_per_line={max(widths)} max_lines={max(len(c.lines) for c in cues)} "
        f"max_seconds={max(durations):.2f} mean_seconds={statistics.mean(durations):.2f}"
    )
