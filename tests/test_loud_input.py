"""Loud input is scaled by its peak, as qwen-asr does (`float_range_normalize`), never clipped flat:
float files over full scale, the resampler's overshoot, and a long file decoded in pieces (the whole
signal's peak scales every piece)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from qwen_asr.inference.utils import float_range_normalize

from qwenasr_appliance.audio.decode import decode_audio, peak_normalize
from qwenasr_appliance.audio.decoder_pool import AudioDecoder
from qwenasr_appliance.audio.samples import SAMPLE_RATE

from .audio_fixtures import encode, float_wav, sine, speech_like


def decode(data: bytes, name: str = "loud.wav") -> np.ndarray:
    return np.asarray(decode_audio(data, name, max_seconds=600.0).samples)


@pytest.mark.parametrize("gain", [1.5, 4.0, 1000.0])
def test_a_float_file_over_full_scale_is_scaled_by_its_peak_like_the_reference(gain: float) -> None:
    base = speech_like(3.0, SAMPLE_RATE, seed=3)
    signal = base * np.float32(gain / np.abs(base).max())
    samples = decode(float_wav(signal, SAMPLE_RATE))
    reference = float_range_normalize(signal)
    np.testing.assert_allclose(samples, reference, rtol=0, atol=1e-6)
    assert np.abs(samples).max() == pytest.approx(1.0, abs=1e-6)
    # The waveform keeps its shape: one scale factor, no flattened peaks.
    assert np.corrcoef(samples, signal)[0, 1] > 0.999999
    assert np.count_nonzero(np.abs(samples) >= 1.0 - 1e-6) <= 1 < np.count_nonzero(np.abs(signal) >= 1.0)


def test_a_signal_within_full_scale_is_left_exactly_as_it_is() -> None:
    signal = sine(440, 1.0, SAMPLE_RATE, amplitude=0.999)
    samples = decode(float_wav(signal, SAMPLE_RATE))
    np.testing.assert_array_equal(samples, signal)
    assert np.array_equal(float_range_normalize(signal), samples)


@pytest.mark.parametrize(("fmt", "rate"), [("wav", 44_100), ("flac", 48_000), ("mp3", 44_100)])
def test_the_resampler_overshoot_of_a_full_scale_square_wave_is_scaled_not_clipped(fmt: str, rate: int) -> None:
    t = np.arange(rate * 2) / rate
    square = np.where(np.sin(2 * np.pi * 300 * t) >= 0, 1.0, -1.0).astype(np.float32)
    samples = decode(encode(square, rate, fmt), f"square.{fmt}")
    assert np.abs(samples).max() <= 1.0
    # Clipping would leave long runs of samples at exactly full scale; scaling leaves the overshoot's tips.
    assert np.count_nonzero(np.abs(samples) >= 1.0 - 1e-6) < samples.size * 0.001


def test_peak_normalize_leaves_silence_and_empty_input_alone() -> None:
    for signal in (np.zeros(100, dtype=np.float32), np.zeros(0, dtype=np.float32)):
        before = signal.copy()
        peak_normalize(signal)
        np.testing.assert_array_equal(signal, before)


def test_a_long_loud_file_decoded_in_pieces_is_scaled_by_the_whole_signal_peak() -> None:
    rate = 44_100
    signal = speech_like(95.0, rate, seed=5) * np.float32(0.5)
    signal[rate * 70 : rate * 71] *= np.float32(8.0)  # one loud second, in the last piece only
    data = float_wav(signal, rate)
    reference = decode(data)

    async def run() -> tuple[np.ndarray, int]:
        decoder = AudioDecoder(3, max_seconds=600.0)
        try:
            result = await decoder.decode(data, "long.wav")
            return np.asarray(result.audio.samples), result.pieces
        finally:
            decoder.close()

    samples, pieces = asyncio.run(run())
    assert pieces > 1
    assert np.abs(reference).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(samples, reference, rtol=0, atol=2e-6)
