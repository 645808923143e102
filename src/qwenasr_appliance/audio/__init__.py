"""Audio input: decoding uploads to 16 kHz mono float32 and splitting long audio at quiet points."""

from qwenasr_appliance.audio.decode import (
    SUPPORTED_FORMATS,
    TARGET_SAMPLE_RATE,
    AudioError,
    AudioTooLongError,
    DecodedAudio,
    decode_audio,
    probe_duration,
)
from qwenasr_appliance.audio.split import AudioChunk, is_silent, pad_to_min, split_at_quiet_points

__all__ = [
    "SUPPORTED_FORMATS",
    "TARGET_SAMPLE_RATE",
    "AudioChunk",
    "AudioError",
    "AudioTooLongError",
    "DecodedAudio",
    "decode_audio",
    "is_silent",
    "pad_to_min",
    "probe_duration",
    "split_at_quiet_points",
]
