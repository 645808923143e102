"""Whisper-style log-mel features, computed the way Qwen3-ASR's processor computes them.

The vLLM engine computes them in worker processes and builds vLLM's engine input from them
(`engines.vllm.inputs`), which takes the feature extraction off the serving process, where it would
compete for one interpreter lock with request handling, decoding and vLLM's own frontend.
Only numpy: the workers import neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]


def _hz_to_mel_slaney(hz: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, 27.0 / np.log(6.4)
    mels = 3.0 * hz / 200.0
    log_region = hz >= min_log_hz
    mels[log_region] = min_log_mel + np.log(hz[log_region] / min_log_hz) * logstep
    return mels


def _mel_to_hz_slaney(mels: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    min_log_hz, min_log_mel, logstep = 1000.0, 15.0, np.log(6.4) / 27.0
    hz = 200.0 * mels / 3.0
    log_region = mels >= min_log_mel
    hz[log_region] = min_log_hz * np.exp(logstep * (mels[log_region] - min_log_mel))
    return hz


def mel_filter_bank(
    n_fft: int, n_mels: int, sampling_rate: int, f_min: float = 0.0, f_max: float = 8000.0
) -> npt.NDArray[np.float64]:
    """Slaney-scale, Slaney-normalised triangular filters, shape (1 + n_fft // 2, n_mels)."""
    fft_freqs = np.linspace(0, sampling_rate // 2, 1 + n_fft // 2)
    mel_edges = np.linspace(
        _hz_to_mel_slaney(np.array([f_min]))[0], _hz_to_mel_slaney(np.array([f_max]))[0], n_mels + 2
    )
    hz_edges = _mel_to_hz_slaney(mel_edges)
    slopes = hz_edges[None, :] - fft_freqs[:, None]
    widths = np.diff(hz_edges)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    filters *= 2.0 / (hz_edges[2 : n_mels + 2] - hz_edges[:n_mels])
    return filters


def pad_to_hop(samples: FloatArray, hop_length: int = 160) -> FloatArray:
    """`samples` zero-padded at the end to a whole number of hops (a new array; as is when already whole).

    vLLM's Qwen3-ASR renderer does this before its Whisper feature extractor
    (`Qwen3OmniMoeThinkerMultiModalProcessor._call_hf_processor`, `pad_to_hop_length`), so the GPU
    path sees ceil(n / hop) frames where the processor alone (qwen-asr's CPU path) gives floor(n / hop):
    the CPU engine pads the same way, so both paths see the same frames for the same audio.
    """
    short = samples.shape[0] % hop_length
    if not short:
        return samples
    return np.pad(np.asarray(samples, dtype=np.float32), (0, hop_length - short))


@dataclass(frozen=True)
class LogMelExtractor:
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 128
    sampling_rate: int = 16_000

    @classmethod
    def from_preprocessor_config(cls, path: Path) -> LogMelExtractor:
        """Read the model's `preprocessor_config.json` (a WhisperFeatureExtractor's settings)."""
        config = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            n_fft=int(config.get("n_fft", 400)),
            hop_length=int(config.get("hop_length", 160)),
            n_mels=int(config.get("feature_size", 128)),
            sampling_rate=int(config.get("sampling_rate", 16_000)),
        )

    def filters(self) -> npt.NDArray[np.float32]:
        return _cached_filters(self.n_fft, self.n_mels, self.sampling_rate)

    def __call__(self, samples: FloatArray) -> FloatArray:
        """Features of one mono 16 kHz signal, shape (n_mels, frames), as Qwen3-ASR's vLLM processor makes them.

        The signal is zero-padded to a whole number of hops first (as vLLM does), so
        `frames == len(padded) // hop_length`.
        """
        hop = self.hop_length
        audio = pad_to_hop(np.asarray(samples, dtype=np.float32), hop)
        half = self.n_fft // 2
        padded = np.pad(audio, (half, half), mode="reflect")
        count = 1 + (padded.size - self.n_fft) // hop
        frames = np.lib.stride_tricks.as_strided(
            padded, shape=(count, self.n_fft), strides=(padded.strides[0] * hop, padded.strides[0]), writeable=False
        )
        window = np.hanning(self.n_fft + 1)[:-1].astype(np.float32)  # periodic Hann
        spectrum = np.fft.rfft(frames * window, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        mel = power @ self.filters()
        log_spec = np.log10(np.maximum(mel, 1e-10)).T[:, :-1]
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
        features: FloatArray = ((log_spec + 4.0) / 4.0).astype(np.float32)
        return features


_FILTERS: dict[tuple[int, int, int], npt.NDArray[np.float32]] = {}


def _cached_filters(n_fft: int, n_mels: int, sampling_rate: int) -> npt.NDArray[np.float32]:
    key = (n_fft, n_mels, sampling_rate)
    if key not in _FILTERS:
        _FILTERS[key] = mel_filter_bank(n_fft, n_mels, sampling_rate).astype(np.float32)
    return _FILTERS[key]


def find_extractor(model_id: str) -> LogMelExtractor | None:
    """The extractor for a local model directory or a Hub model already in the local cache; None if neither."""
    local = Path(model_id).expanduser() / "preprocessor_config.json"
    if local.is_file():
        return LogMelExtractor.from_preprocessor_config(local)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(model_id, "preprocessor_config.json")
    return LogMelExtractor.from_preprocessor_config(Path(cached)) if isinstance(cached, str) else None
