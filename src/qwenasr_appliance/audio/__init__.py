"""Audio input: decoding uploads to 16 kHz mono float32 and splitting long audio at quiet points."""

from qwenasr_appliance.audio.decode import (
    SUPPORTED_FORMATS,
    AudioError,
    AudioTooLongError,
    DecodedAudio,
    decode_audio,
    probe_duration,
)
from qwenasr_appliance.audio.samples import SAMPLE_RATE
from qwenasr_appliance.audio.split import AudioChunk, is_silent, pad_to_min, split_at_quiet_points

__all__ = [
    "SAMPLE_RATE",
    "SUPPORTED_FORMATS",
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
