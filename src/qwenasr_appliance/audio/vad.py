"""Voice activity per 30 ms frame of 16 kHz audio: WebRTC's VAD (`webrtcvad-wheels`) behind an energy gate.

OpenAI's `server_vad.threshold` (0.0-1.0, default 0.5; "a higher threshold will require louder audio to
activate the model", `openai.types.realtime.realtime_transcription_session_audio_input_turn_detection`)
maps onto two knobs here:

- WebRTC's aggressiveness mode, `min(3, floor(threshold * 4))`: 0.0-0.24 -> 0 (least aggressive in
  filtering out non-speech), 0.25-0.49 -> 1, 0.5-0.74 -> 2, 0.75-1.0 -> 3;
- an energy floor, `ENERGY_FLOOR_DBFS_AT_0 + threshold * ENERGY_FLOOR_DBFS_SPAN` dBFS (-70 dBFS at 0, -50 at
  the default 0.5, -30 at 1.0): quieter frames are never speech.

WebRTC's VAD costs a few microseconds per frame, so hundreds of sessions run it on the event loop.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
import webrtcvad

from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray

FRAME_SAMPLES: Final = 480  # 30 ms at 16 kHz, one of the frame lengths WebRTC's VAD accepts
FRAME_SECONDS: Final = FRAME_SAMPLES / SAMPLE_RATE
ENERGY_FLOOR_DBFS_AT_0: Final = -70.0
ENERGY_FLOOR_DBFS_SPAN: Final = 40.0


def aggressiveness(threshold: float) -> int:
    """WebRTC's mode (0-3) for an OpenAI `threshold` in [0, 1]."""
    return min(3, max(0, math.floor(threshold * 4)))


def energy_floor_dbfs(threshold: float) -> float:
    return ENERGY_FLOOR_DBFS_AT_0 + min(1.0, max(0.0, threshold)) * ENERGY_FLOOR_DBFS_SPAN


class FrameVAD:
    """Feed 16 kHz samples in any sizes; get one speech/non-speech decision per complete 30 ms frame.

    Keeps at most one incomplete frame (479 samples) between calls.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._vad = webrtcvad.Vad(aggressiveness(threshold))
        self._floor = 10.0 ** (energy_floor_dbfs(threshold) / 20.0)  # RMS amplitude, full scale = 1.0
        self._pending = np.zeros(0, dtype=np.float32)

    def frames(self, samples: AudioArray) -> list[bool]:
        """Decisions for the complete frames now available, oldest first."""
        if len(self._pending):
            samples = np.concatenate([self._pending, samples])
        count = len(samples) // FRAME_SAMPLES
        self._pending = samples[count * FRAME_SAMPLES :].copy()
        decisions: list[bool] = []
        for index in range(count):
            frame = samples[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES]
            decisions.append(self._is_speech(frame))
        return decisions

    def _is_speech(self, frame: AudioArray) -> bool:
        rms = float(np.sqrt(np.mean(np.square(frame, dtype=np.float64))))
        if rms < self._floor:
            return False
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        return bool(self._vad.is_speech(pcm, SAMPLE_RATE))
