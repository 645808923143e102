from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from qwenasr_appliance.audio.decode import DecodedAudio, decode_audio
from qwenasr_appliance.audio.transfer import (
    SPILL_ABOVE_BYTES,
    SharedFiles,
    SpilledSamples,
    decode_for_transfer,
    owner_tag,
    receive,
    sweep_orphaned_files,
)
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


def test_the_sweep_removes_only_files_of_owners_that_are_gone(tmp_path: Path) -> None:
    """Issue 12 (K6): shared files of a dead owner (or of a pid now reused by another process) go; files
    of living owners and names of another form stay."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ours = owner_tag()
    pid, started = ours[1:].split(".")
    names = {
        f"qwenasr-audio-o{gone.pid}.12345-abc.f32": False,  # its owner exited
        f"qwenasr-upload-o{pid}.{int(started) + 1}-abc.bin": False,  # our pid, another start: a reused pid
        f"qwenasr-audio-{ours}-abc.f32": True,  # ours
        "qwenasr-audio-legacy.f32": True,  # no owner in the name: not ours to judge
        "other-file": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert sweep_orphaned_files(str(tmp_path)) == 2
    assert {p.name for p in tmp_path.iterdir()} == {name for name, kept in names.items() if kept}


def test_shared_files_carry_their_owner() -> None:
    files = SharedFiles.create()
    assert files is not None
    try:
        for path in (files.upload_path, files.output_path):
            assert os.path.basename(path).startswith(("qwenasr-upload-" + owner_tag(), "qwenasr-audio-" + owner_tag()))
    finally:
        files.discard()
