from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import soundfile as sf

from qwenasr_appliance.audio.decode import DecodedAudio, decode_audio
from qwenasr_appliance.audio.transfer import SPILL_ABOVE_BYTES, SpilledSamples, decode_for_transfer, receive
from qwenasr_appliance.workers import WorkerPool


def _flac(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16_000, format="FLAC")
    return out.getvalue()


def test_a_long_signal_travels_as_a_mapped_file_that_is_gone_at_once() -> None:
    data = _flac(330)  # 5.5 minutes: 21 MB of float32, above the threshold
    assert SPILL_ABOVE_BYTES < 330 * 16_000 * 4

    async def in_a_worker() -> tuple[DecodedAudio, SpilledSamples | None]:
        pool = WorkerPool(1, "decode")
        try:
            return await pool.run(decode_for_transfer, data, "long.flac", max_seconds=600)
        finally:
            pool.close()

    result = asyncio.run(in_a_worker())
    metadata, spilled = result
    assert spilled is not None and os.path.exists(spilled.path) and metadata.samples.size == 0
    decoded = receive(result)
    assert not os.path.exists(spilled.path)
    assert isinstance(decoded.samples, np.memmap) and not decoded.samples.flags.writeable
    np.testing.assert_array_equal(decoded.samples, decode_audio(data, "long.flac", max_seconds=600).samples)
    assert decoded.duration_seconds == metadata.duration_seconds


def test_a_short_signal_is_returned_directly() -> None:
    decoded, spilled = decode_for_transfer(_flac(3), "short.flac", max_seconds=600)
    assert spilled is None and decoded.samples.shape == (48_000,)
    assert receive((decoded, None)) is decoded
