"""Our log-mel features must equal what Qwen3-ASR's processor (WhisperFeatureExtractor) computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

from qwenasr_appliance.audio.features import LogMelExtractor, mel_filter_bank


def test_filter_bank_matches_transformers() -> None:
    reference = hf_mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=128,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    )
    np.testing.assert_allclose(mel_filter_bank(400, 128, 16000), reference, atol=1e-12)


@pytest.mark.parametrize("samples", [16_000 * 30, 16_000 * 7 + 123, 8_000, 401])
def test_features_match_the_whisper_feature_extractor(samples: int) -> None:
    rng = np.random.default_rng(samples)
    t = np.arange(samples) / 16_000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(samples)).astype(np.float32)
    padded = np.pad(audio, (0, (-samples) % 160))  # vLLM pads to whole hops before the processor
    reference = WhisperFeatureExtractor(feature_size=128)(
        padded, sampling_rate=16_000, padding="longest", return_attention_mask=True, return_tensors="np"
    )
    frames = int(reference["attention_mask"][0].sum())
    ours = LogMelExtractor()(audio)
    assert ours.dtype == np.float32 and ours.shape == (128, frames) == (128, padded.size // 160)
    np.testing.assert_allclose(ours, reference["input_features"][0][:, :frames], atol=5e-5)


def test_settings_come_from_the_preprocessor_config(tiny_model_dir: Path) -> None:
    extractor = LogMelExtractor.from_preprocessor_config(tiny_model_dir / "preprocessor_config.json")
    assert (extractor.n_fft, extractor.hop_length, extractor.n_mels, extractor.sampling_rate) == (400, 160, 128, 16000)
