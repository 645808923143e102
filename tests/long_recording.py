"""A long recording assembled from the held-out utterances of `tests/fixtures/speech-en-de/`, with
pauses of known length between them, so every word's true place in time is known."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf

SPEECH_DIR = Path(__file__).parent / "fixtures" / "speech-en-de"
RATE = 16_000


@dataclass(frozen=True)
class PlacedUtterance:
    """Where an utterance's sound is: its file without the digital silence espeak-ng leaves around it."""

    start: float  # seconds on the recording's time line
    end: float
    text: str
    language: str


def assemble(
    seconds: float = 180.0, *, seed: int = 16, pause_range: tuple[float, float] = (0.4, 1.6)
) -> tuple[npt.NDArray[np.float32], list[PlacedUtterance]]:
    """The held-out utterances in a seeded order, repeated until `seconds` is reached, each followed by a
    pause of a seeded length in `pause_range` (seconds) holding faint noise (-70 dBFS)."""
    manifest = json.loads((SPEECH_DIR / "manifest.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    pieces: list[npt.NDArray[np.float32]] = []
    placed: list[PlacedUtterance] = []
    position = 0
    while position < seconds * RATE:
        for index in rng.permutation(len(manifest)):
            entry = manifest[int(index)]
            audio, rate = sf.read(SPEECH_DIR / entry["file"], dtype="float32", always_2d=False)
            assert rate == RATE
            sound = np.flatnonzero(np.abs(audio) > 1e-3)  # above -60 dBFS: speech (and the noise mixed into it)
            first, last = int(sound[0]), int(sound[-1]) + 1
            placed.append(
                PlacedUtterance((position + first) / RATE, (position + last) / RATE, entry["text"], entry["language"])
            )
            pause = rng.normal(0.0, 10 ** (-70 / 20), round(rng.uniform(*pause_range) * RATE)).astype(np.float32)
            pieces += [audio, pause]
            position += audio.size + pause.size
            if position >= seconds * RATE:
                break
    return np.concatenate(pieces), placed
