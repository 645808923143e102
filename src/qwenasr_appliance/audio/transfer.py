"""Hand a long decoded signal from a decode worker to the serving process without copying it twice.

A result returned from a worker process is pickled: the serving process briefly holds the pickled
bytes and the unpickled array, two copies of the signal (measured: +0.95 GB for a 2-hour file). A long
signal is instead written to a file in shared memory (`/dev/shm`, else the temporary directory) and
mapped read-only by the server; the file is unlinked at once, so its memory goes with the mapping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenasr_appliance.audio.decode import DecodedAudio, decode_audio

# Below this a pickled copy is cheaper than a file: about 4 minutes of 16 kHz float32.
SPILL_ABOVE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class SpilledSamples:
    path: str
    length: int


def _spill_directory() -> str:
    shm = Path("/dev/shm")  # noqa: S108 - a tmpfs: the file never touches a disk
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


def decode_for_transfer(
    data: bytes, filename: str | None, *, max_seconds: float
) -> tuple[DecodedAudio, SpilledSamples | None]:
    """Runs in a worker: decode, and move a long signal into a file the server maps."""
    decoded = decode_audio(data, filename, max_seconds=max_seconds)
    samples = decoded.samples
    if samples.nbytes < SPILL_ABOVE_BYTES:
        return decoded, None
    path: str | None = None
    try:
        fd, path = tempfile.mkstemp(prefix="qwenasr-audio-", suffix=".f32", dir=_spill_directory())
        with os.fdopen(fd, "wb") as handle:
            samples.tofile(handle)
    except OSError:  # no room in /dev/shm: fall back to pickling
        if path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return decoded, None
    empty = np.zeros(0, dtype=np.float32)
    return dataclasses.replace(decoded, samples=empty), SpilledSamples(path, int(samples.size))


def receive(result: tuple[DecodedAudio, SpilledSamples | None]) -> DecodedAudio:
    """Runs in the server: map a spilled signal (read-only) and unlink its file."""
    decoded, spilled = result
    if spilled is None:
        return decoded
    try:
        samples = np.memmap(spilled.path, dtype=np.float32, mode="r", shape=(spilled.length,))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(spilled.path)
    return dataclasses.replace(decoded, samples=samples)
