"""Raw audio as live clients send it, turned into the one `AudioArray` (16 kHz mono float32) piece by piece.

The formats are the OpenAI Realtime API's input formats (`openai.types.realtime.RealtimeAudioFormats`):

- `audio/pcm`: 16-bit signed little-endian mono PCM at 24,000 Hz (the only rate the API accepts);
- `audio/pcmu`: G.711 mu-law, 8,000 Hz, one byte per sample;
- `audio/pcma`: G.711 A-law, 8,000 Hz, one byte per sample.

G.711 is expanded through 256-entry tables computed from ITU-T G.711's segment rules (no `audioop`, which
Python 3.13 removed); the tests compare them with `audioop` where it still exists. Resampling to 16 kHz
uses soxr's streaming resampler, so consecutive appends resample as one continuous signal.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import soxr

from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray

LiveAudioFormat = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
LIVE_AUDIO_FORMATS: Final[tuple[LiveAudioFormat, ...]] = ("audio/pcm", "audio/pcmu", "audio/pcma")
INPUT_RATES: Final[dict[LiveAudioFormat, int]] = {"audio/pcm": 24_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}
BYTES_PER_SAMPLE: Final[dict[LiveAudioFormat, int]] = {"audio/pcm": 2, "audio/pcmu": 1, "audio/pcma": 1}


def _mulaw_table() -> npt.NDArray[np.int16]:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> npt.NDArray[np.int16]:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


MULAW_TO_PCM16: Final = _mulaw_table()  # code -> linear 16-bit sample (range -32124..32124)
ALAW_TO_PCM16: Final = _alaw_table()  # code -> linear 16-bit sample (range -32256..32256)


def to_pcm16(data: bytes, audio_format: LiveAudioFormat) -> npt.NDArray[np.int16]:
    """Linear 16-bit samples of whole samples in `data` (an `audio/pcm` byte count must be even)."""
    if audio_format == "audio/pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    codes = np.frombuffer(data, dtype=np.uint8)
    table = MULAW_TO_PCM16 if audio_format == "audio/pcmu" else ALAW_TO_PCM16
    return table[codes]


class LiveAudioDecoder:
    """Bytes of one live format in, 16 kHz float32 out, continuous across calls.

    A PCM sample split between two appends is kept until its second byte arrives. Not thread-safe; one
    per session. Memory: the resampler's filter state and at most one carried byte.
    """

    def __init__(self, audio_format: LiveAudioFormat) -> None:
        self.audio_format: LiveAudioFormat = audio_format
        self.input_rate = INPUT_RATES[audio_format]
        self._carry = b""
        self._resampler = soxr.ResampleStream(self.input_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        self.input_samples = 0  # samples received so far, at `input_rate`

    def decode(self, data: bytes) -> AudioArray:
        """The 16 kHz samples for `data` (soxr delays a few milliseconds, released by later calls or `flush`)."""
        width = BYTES_PER_SAMPLE[self.audio_format]
        data = self._carry + data
        whole = len(data) - len(data) % width
        self._carry = data[whole:]
        pcm = to_pcm16(data[:whole], self.audio_format)
        self.input_samples += len(pcm)
        if not len(pcm):
            return np.zeros(0, dtype=np.float32)
        return self._resample(pcm.astype(np.float32) / 32768.0, last=False)

    def flush(self) -> AudioArray:
        """What the resampler still holds (the end of the signal); the decoder starts afresh after it."""
        self._carry = b""
        return self._resample(np.zeros(0, dtype=np.float32), last=True)

    def _resample(self, samples: AudioArray, *, last: bool) -> AudioArray:
        out = self._resampler.resample_chunk(samples, last=last)
        if last:
            self._resampler = soxr.ResampleStream(self.input_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return np.ascontiguousarray(np.clip(out, -1.0, 1.0), dtype=np.float32)
