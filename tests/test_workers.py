from __future__ import annotations

import asyncio
import os
import pickle

import numpy as np
import pytest

from qwenasr_appliance.audio.decode import AudioError, AudioTooLongError, decode_audio
from qwenasr_appliance.workers import WorkerCrashedError, WorkerPool


def _die() -> None:
    os._exit(3)  # what a decoder segfault looks like to the pool


def _pid() -> int:
    return os.getpid()


def test_a_crashed_worker_fails_only_its_task_and_the_pool_recovers() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "test")
        try:
            first = await pool.run(_pid)
            assert first != os.getpid()
            with pytest.raises(WorkerCrashedError):
                await pool.run(_die)
            assert await pool.run(_pid) not in (first, os.getpid())
        finally:
            pool.close()
        with pytest.raises(WorkerCrashedError):
            await pool.run(_pid)

    asyncio.run(scenario())


def test_decoding_in_a_worker_returns_audio_and_audio_errors_keep_their_code() -> None:
    async def scenario() -> None:
        pool = WorkerPool(1, "decode")
        try:
            with pytest.raises(AudioError) as empty:
                await pool.run(decode_audio, b"", "x.wav", max_seconds=10)
            assert empty.value.code == "empty_file"
            import io

            import soundfile as sf

            buffer = io.BytesIO()
            sf.write(buffer, np.zeros(8000, dtype=np.float32), 8000, format="WAV")
            decoded = await pool.run(decode_audio, buffer.getvalue(), "x.wav", max_seconds=10)
            assert decoded.samples.shape == (16_000,) and decoded.samples.dtype == np.float32
        finally:
            pool.close()

    asyncio.run(scenario())


def test_audio_errors_survive_pickling() -> None:
    error = pickle.loads(pickle.dumps(AudioError("invalid_audio", "bad")))
    assert (error.code, error.message, str(error)) == ("invalid_audio", "bad", "bad")
    too_long = pickle.loads(pickle.dumps(AudioTooLongError(9000.0, 7200.0, at_least=True)))
    assert isinstance(too_long, AudioTooLongError) and too_long.code == "audio_too_long" and too_long.at_least
