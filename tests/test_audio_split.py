from __future__ import annotations

from itertools import pairwise

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenasr_appliance.audio.split import AudioChunk, is_silent, pad_to_min, split_at_quiet_points
from tests.audio_fixtures import sine, speech_like

RATE = 16000


def noisy_speech(seconds: float, pauses: list[tuple[float, float]], seed: int = 0) -> npt.NDArray[np.float32]:
    """Speech-like audio over a -50 dBFS noise floor, with digitally silent planted pauses.

    The noise floor makes the planted pauses the only truly quiet places.
    """
    rng = np.random.default_rng(seed)
    signal = speech_like(seconds, RATE, seed=seed) + rng.normal(0, 10 ** (-50 / 20), round(seconds * RATE))
    for start, length in pauses:
        signal[round(start * RATE) : round((start + length) * RATE)] = 0.0
    return signal.astype(np.float32)


def assert_exact_cover(chunks: list[AudioChunk], samples: npt.NDArray[np.float32], max_seconds: float) -> None:
    assert chunks[0].start_sample == 0 and chunks[-1].end_sample == samples.shape[0]
    for previous, chunk in pairwise(chunks):
        assert previous.end_sample == chunk.start_sample
    for chunk in chunks:
        assert 0 < chunk.end_sample - chunk.start_sample <= int(max_seconds * RATE)
        assert chunk.samples.shape[0] == chunk.end_sample - chunk.start_sample
        assert chunk.offset_seconds == chunk.start_sample / RATE
        assert chunk.samples.base is not None and np.shares_memory(chunk.samples, samples)  # a view
        assert np.array_equal(chunk.samples, samples[chunk.start_sample : chunk.end_sample])


def test_cuts_land_in_planted_pauses() -> None:
    pauses = [(26.0, 0.4), (52.5, 0.4), (79.0, 0.6)]
    samples = noisy_speech(100.0, pauses)
    chunks = split_at_quiet_points(samples)
    assert_exact_cover(chunks, samples, 30.0)
    cuts = [chunk.start_sample / RATE for chunk in chunks[1:]]
    assert len(cuts) == 3
    for cut, (start, length) in zip(cuts, pauses, strict=True):
        assert cut == pytest.approx(start + length / 2, abs=0.01)  # the middle of the pause


def test_cut_without_silence_takes_the_quietest_window() -> None:
    # A 200 Hz tone whose level dips once, at 28 s: no silence, but one clear minimum.
    t = np.arange(40 * RATE) / RATE
    level = 1.0 - 0.9 * np.exp(-(((t - 28.0) / 0.3) ** 2))
    samples = (0.3 * level * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    chunks = split_at_quiet_points(samples)
    assert len(chunks) == 2
    assert chunks[1].start_sample / RATE == pytest.approx(28.0, abs=0.05)


def test_short_audio_is_one_chunk() -> None:
    samples = noisy_speech(30.0, [])
    (chunk,) = split_at_quiet_points(samples)
    assert (chunk.start_sample, chunk.end_sample, chunk.offset_seconds) == (0, samples.shape[0], 0.0)
    assert split_at_quiet_points(np.zeros(0, dtype=np.float32)) == []
    assert len(split_at_quiet_points(np.zeros(30 * RATE + 1, dtype=np.float32))) == 2


def test_final_chunk_is_not_left_tiny() -> None:
    samples = noisy_speech(30.2, [])
    chunks = split_at_quiet_points(samples)
    assert_exact_cover(chunks, samples, 30.0)
    assert len(chunks) == 2 and chunks[-1].samples.shape[0] >= 0.5 * RATE


def test_tiny_final_chunk_is_kept_when_merging_would_exceed_the_limit() -> None:
    samples = noisy_speech(30.2, [])
    chunks = split_at_quiet_points(samples, search_seconds=0.0)  # no search range: cut at the limit
    assert [c.end_sample - c.start_sample for c in chunks] == [30 * RATE, round(0.2 * RATE)]


def test_digital_silence_is_cut_in_its_middle() -> None:
    samples = np.zeros(50 * RATE, dtype=np.float32)
    chunks = split_at_quiet_points(samples)
    assert_exact_cover(chunks, samples, 30.0)
    assert chunks[1].start_sample / RATE == pytest.approx(25.0, abs=0.01)  # middle of the window [20 s, 30 s]


def test_two_hours_split_with_bounded_work() -> None:
    minute = noisy_speech(61.0, [(13.0, 0.3), (41.0, 0.3)])
    samples = np.resize(minute, 2 * 3600 * RATE)  # repeats the minute; an array of its own
    chunks = split_at_quiet_points(samples)
    assert_exact_cover(chunks, samples, 30.0)
    assert 2 * 3600 / 30 <= len(chunks) <= 2 * 3600 / 20 + 1  # each cut within 10 s before the limit
    assert is_silent(samples[: 10 * RATE]) is False


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(0, 200 * 1000),
    max_chunk=st.floats(0.1, 40.0),
    search=st.floats(0.0, 45.0),
    min_chunk=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunks_always_cover_the_signal(
    total: int, max_chunk: float, search: float, min_chunk: float, seed: int
) -> None:
    rate = 1000
    samples = np.random.default_rng(seed).normal(0, 0.1, total).astype(np.float32)
    samples[::7] = 0.0
    chunks = split_at_quiet_points(
        samples, sample_rate=rate, max_chunk_seconds=max_chunk, search_seconds=search, min_chunk_seconds=min_chunk
    )
    if total == 0:
        assert chunks == []
        return
    max_len = int(max_chunk * rate)
    assert chunks[0].start_sample == 0 and chunks[-1].end_sample == total
    assert all(a.end_sample == b.start_sample for a, b in pairwise(chunks))
    assert all(0 < c.end_sample - c.start_sample <= max_len for c in chunks)
    assert all(np.shares_memory(c.samples, samples) for c in chunks)
    if len(chunks) > 1 and min(search, max_chunk) >= min_chunk + 0.002:
        assert chunks[-1].end_sample - chunks[-1].start_sample >= round(min_chunk * rate)


def test_split_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        split_at_quiet_points(np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        split_at_quiet_points(np.zeros(10, dtype=np.float32), max_chunk_seconds=0)
    with pytest.raises(ValueError):
        split_at_quiet_points(np.zeros(10, dtype=np.float32), max_chunk_seconds=1e-6)


def test_pad_to_min() -> None:
    short = sine(440, 0.1, RATE)
    padded = pad_to_min(short)
    assert padded.shape == (8000,) and padded.dtype == np.float32
    assert np.array_equal(padded[:1600], short) and not padded[1600:].any()
    exact = np.ones(8000, dtype=np.float32)
    assert pad_to_min(exact) is exact
    assert pad_to_min(np.zeros(0, dtype=np.float32)).shape == (8000,)
    assert pad_to_min(short, 1.0, sample_rate=8000).shape == (8000,)


def test_is_silent() -> None:
    assert is_silent(np.zeros(RATE * 5, dtype=np.float32))
    assert is_silent(np.zeros(0, dtype=np.float32))
    rng = np.random.default_rng(0)
    assert is_silent(rng.normal(0, 10 ** (-70 / 20), RATE * 5).astype(np.float32))
    assert not is_silent(sine(440, 1.0, RATE, amplitude=10 ** (-50 / 20)))
    assert is_silent(sine(440, 1.0, RATE, amplitude=10 ** (-50 / 20)), threshold_dbfs=-40.0)
    # One short word in a long quiet stretch is sound, whatever the average level.
    long_quiet = np.zeros(RATE * 120, dtype=np.float32)
    long_quiet[RATE * 60 : RATE * 60 + 1600] = sine(300, 0.1, RATE, amplitude=0.05)
    assert not is_silent(long_quiet)


def test_a_pause_up_to_ten_seconds_before_the_limit_is_found() -> None:
    """The search window is as wide as qwen-asr's (5 s on both sides of its target: 10 s), all of it
    below the hard limit: a pause 8 s before the limit is where the cut goes, not into a word."""
    rng = np.random.default_rng(7)
    samples = (0.3 * rng.standard_normal(50 * RATE)).astype(np.float32)  # loud throughout ...
    samples[int(21.8 * RATE) : int(22.2 * RATE)] *= 0.001  # ... but for one pause, 8 s before 30 s
    (first, second) = split_at_quiet_points(samples)
    assert 21.8 * RATE <= first.end_sample <= 22.2 * RATE
    assert second.start_sample == first.end_sample and second.end_sample == samples.shape[0]
    narrow = split_at_quiet_points(samples, search_seconds=5.0)  # the old window misses it
    assert narrow[0].end_sample > 25 * RATE
