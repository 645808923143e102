"""Server VAD turn detection: per-frame speech decisions in, start and end of speech out.

Positions are 16 kHz sample indices on the session's time line (0 = the first sample appended in the
session), which is what OpenAI's `audio_start_ms` / `audio_end_ms` count in milliseconds.

- Speech starts after `START_FRAMES` consecutive voiced frames (90 ms), at the first of them; the turn
  then begins `prefix_padding_ms` earlier (never before the end of the previous turn).
- Speech stops once `silence_duration_ms` of unvoiced frames follow; the turn ends there, so it includes
  that silence, as OpenAI's `audio_end_ms` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.audio.vad import FRAME_SAMPLES, FrameVAD

START_FRAMES: Final = 3


@dataclass(frozen=True)
class SpeechStart:
    turn_start: int  # samples: where the turn's audio begins (speech start minus the prefix padding)
    speech_start: int  # samples: the first voiced frame


@dataclass(frozen=True)
class SpeechEnd:
    turn_end: int  # samples: end of the turn (the last voiced frame plus the silence duration)


TurnEvent = SpeechStart | SpeechEnd


def ms_to_samples(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000


class TurnDetector:
    def __init__(
        self, threshold: float, prefix_padding_ms: int, silence_duration_ms: int, *, position: int = 0,
        speaking: bool = False,
    ) -> None:  # fmt: skip
        """`position`: the session sample index of the next sample to be pushed; `speaking`: a turn is
        already open (server VAD switched on during a manual turn), so the next silence ends it."""
        self._vad = FrameVAD(threshold)
        self._padding = ms_to_samples(prefix_padding_ms)
        self._silence_frames = max(1, -(-ms_to_samples(silence_duration_ms) // FRAME_SAMPLES))
        self._frame_start = position  # start of the next complete frame
        self._floor = position  # a turn never starts before this (end of the previous turn)
        self.speaking = speaking
        self._voiced_run = 0
        self._unvoiced_run = 0

    @property
    def lookback_samples(self) -> int:
        """Samples before the newest ones that a speech start may still reach back to (buffer them)."""
        return self._padding + (START_FRAMES + 1) * FRAME_SAMPLES

    def reset(self, position: int) -> None:
        """Forget any speech in progress (after a clear or a forced commit); next turn starts >= `position`."""
        self.speaking = False
        self._voiced_run = self._unvoiced_run = 0
        self._floor = max(self._floor, position)

    def push(self, samples: AudioArray) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        for voiced in self._vad.frames(samples):
            frame_end = self._frame_start + FRAME_SAMPLES
            if not self.speaking:
                self._voiced_run = self._voiced_run + 1 if voiced else 0
                if self._voiced_run >= START_FRAMES:
                    speech_start = frame_end - START_FRAMES * FRAME_SAMPLES
                    turn_start = max(self._floor, speech_start - self._padding)
                    events.append(SpeechStart(turn_start=turn_start, speech_start=speech_start))
                    self.speaking, self._unvoiced_run = True, 0
            else:
                self._unvoiced_run = 0 if voiced else self._unvoiced_run + 1
                if self._unvoiced_run >= self._silence_frames:
                    events.append(SpeechEnd(turn_end=frame_end))
                    self.speaking, self._voiced_run = False, 0
                    self._floor = frame_end
            self._frame_start = frame_end
        return events
