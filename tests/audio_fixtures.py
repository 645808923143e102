"""Synthetic audio for the decoder and splitter tests (and bench/decode_speed.py).

Everything is generated in memory with soundfile (libsndfile) and PyAV (bundled FFmpeg), so the
tests need no system tools and no binary files in the repository.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

FloatArray = npt.NDArray[np.float32]

SAMPLES_DIR = Path(__file__).resolve().parent / "fixtures" / "samples"  # real speech, licences in MANIFEST.md

# name -> (libsndfile format, subtype)
SOUNDFILE_FORMATS: dict[str, tuple[str, str]] = {
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "aiff": ("AIFF", "PCM_16"),
}
# name -> (FFmpeg muxer, encoder)
PYAV_FORMATS: dict[str, tuple[str, str]] = {
    "m4a": ("ipod", "aac"),
    "mp4": ("mp4", "aac"),
    "webm": ("webm", "libopus"),
    "mpeg": ("mpeg", "mp2"),  # MPEG program stream with MPEG-1 Layer II audio
    "mpga": ("mp3", "libmp3lame"),  # a bare MP3 stream, OpenAI's "mpga"
    "aac": ("adts", "aac"),
    "mka": ("matroska", "flac"),
}
ALL_FORMATS = tuple(SOUNDFILE_FORMATS) + tuple(PYAV_FORMATS)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def speech_like(
    seconds: float,
    sample_rate: int = 16000,
    *,
    channels: int = 1,
    seed: int = 0,
    pauses: Sequence[tuple[float, float]] = (),
    peak: float = 0.5,
) -> FloatArray:
    """A voiced, syllable-modulated harmonic signal with word gaps: speech-like energy structure.

    `pauses` are (start, length) spans in seconds forced to digital silence. Returns (n,) for mono,
    (n, channels) otherwise (later channels are attenuated, slightly delayed copies).
    """
    rng = np.random.default_rng(seed)
    n = round(seconds * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    syllable_rate = 4.0
    syllable = np.floor(t * syllable_rate).astype(np.int64)
    syllables = int(syllable[-1]) + 1 if n else 0
    voiced = rng.random(syllables) < 0.8  # whole syllables drop out: word gaps
    pitch_offset = rng.uniform(-25.0, 25.0, syllables)
    f0 = 140.0 + 30.0 * np.sin(2 * np.pi * 0.3 * t) + pitch_offset[syllable]
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    signal = np.zeros(n, dtype=np.float64)
    for k in range(1, 9):
        formant = 1.0 + 1.5 * np.exp(-(((k * 140.0) - 700.0) ** 2) / 2e5)  # a crude first formant
        signal += (formant / k) * np.sin(k * phase)
    envelope = 0.5 * (1.0 - np.cos(2 * np.pi * syllable_rate * t))  # zero at syllable boundaries
    signal *= envelope * voiced[syllable]
    for start, length in pauses:
        signal[round(start * sample_rate) : round((start + length) * sample_rate)] = 0.0
    top = float(np.abs(signal).max()) if n else 0.0
    if top > 0:
        signal *= peak / top
    mono = signal.astype(np.float32)
    if channels == 1:
        return mono
    columns = [mono] + [np.roll(mono, 7 * c) * (1.0 - 0.1 * c) for c in range(1, channels)]
    return np.stack(columns, axis=1).astype(np.float32)


def sine(frequency: float, seconds: float, sample_rate: int, *, amplitude: float = 0.5) -> FloatArray:
    t = np.arange(round(seconds * sample_rate), dtype=np.float64) / sample_rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def _as_2d(signal: npt.NDArray[Any]) -> npt.NDArray[Any]:
    return signal[:, None] if signal.ndim == 1 else signal


def encode(signal: npt.NDArray[Any], sample_rate: int, fmt: str, **options: str) -> bytes:
    """Encode (n,) or (n, channels) float samples in [-1, 1] to the named format (see ALL_FORMATS).

    Opus only takes a few rates; other rates are resampled to 48 kHz first (same duration).
    """
    signal = _as_2d(np.asarray(signal, dtype=np.float32))
    if fmt in ("opus", "webm") and sample_rate not in OPUS_RATES:
        signal = np.ascontiguousarray(soxr.resample(signal, sample_rate, 48000, "HQ"), dtype=np.float32)
        sample_rate = 48000
    if fmt in SOUNDFILE_FORMATS:
        return _encode_soundfile(signal, sample_rate, *SOUNDFILE_FORMATS[fmt])
    if fmt in PYAV_FORMATS:
        return encode_pyav(signal, sample_rate, *PYAV_FORMATS[fmt], container_options=options)
    raise ValueError(f"unknown fixture format {fmt!r}")


def _encode_soundfile(signal: FloatArray, sample_rate: int, container: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", sample_rate, signal.shape[1], subtype=subtype, format=container) as out:
        # Block writes: libsndfile 1.2.2 crashes writing minutes of Ogg Vorbis in one call.
        for start in range(0, signal.shape[0], 1 << 15):
            out.write(signal[start : start + (1 << 15)])
    return buffer.getvalue()


_LAYOUTS = {1: "mono", 2: "stereo", 3: "3.0", 4: "quad", 6: "5.1", 8: "7.1"}


def encode_pyav(
    signal: npt.NDArray[Any],
    sample_rate: int,
    muxer: str,
    encoder: str,
    *,
    container_options: dict[str, str] | None = None,
    bit_rate: int | None = None,
) -> bytes:
    signal = _as_2d(np.asarray(signal, dtype=np.float32))
    channels = signal.shape[1]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer, options=container_options or {}) as container:
        stream: Any = container.add_stream(encoder, rate=sample_rate, layout=_LAYOUTS[channels])
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        pts = 0
        for start in range(0, signal.shape[0], 4096):
            block = signal[start : start + 4096]
            # Packed float frames (one plane): PyAV converts them to the encoder's sample format, and
            # its planar frame code breaks with 8 channels.
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(block.reshape(1, -1)), format="flt", layout=_LAYOUTS[channels]
            )
            frame.sample_rate = sample_rate
            frame.pts = pts
            pts += block.shape[0]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


# --------------------------------------------------------------------------- crafted / damaged files


def wav_bytes(
    pcm: bytes,
    *,
    sample_rate: int,
    channels: int = 1,
    bits: int = 16,
    format_tag: int = 1,
    declared_data_bytes: int | None = None,
) -> bytes:
    """A canonical RIFF/WAVE file; `declared_data_bytes` lets the header lie about the data size."""
    block_align = channels * bits // 8
    fmt_chunk = struct.pack(
        "<4sIHHIIHH", b"fmt ", 16, format_tag, channels, sample_rate, sample_rate * block_align, block_align, bits
    )
    data_size = len(pcm) if declared_data_bytes is None else declared_data_bytes
    data_chunk = struct.pack("<4sI", b"data", data_size) + pcm
    body = b"WAVE" + fmt_chunk + data_chunk
    return struct.pack("<4sI", b"RIFF", min(len(body), 0xFFFFFFFF)) + body


def pcm16(signal: npt.NDArray[Any]) -> bytes:
    return (np.round(np.clip(signal, -1, 1) * 32767).astype("<i2")).tobytes()


def float_wav(signal: npt.NDArray[Any], sample_rate: int) -> bytes:
    """IEEE float WAV, which can carry NaN, Inf and values beyond full scale."""
    return wav_bytes(
        np.asarray(signal, dtype="<f4").tobytes(),
        sample_rate=sample_rate,
        channels=_as_2d(np.asarray(signal)).shape[1],
        bits=32,
        format_tag=3,
    )


def silent_flac(seconds: float, sample_rate: int = 16000) -> bytes:
    """Hours of silence compress to a few hundred kilobytes: the shape of a decompression bomb."""
    buffer = io.BytesIO()
    zeros = np.zeros(sample_rate * 60, dtype=np.int16)
    total = round(seconds * sample_rate)
    with sf.SoundFile(buffer, "w", sample_rate, 1, subtype="PCM_16", format="FLAC") as out:
        for start in range(0, total, zeros.shape[0]):
            out.write(zeros[: min(zeros.shape[0], total - start)])
    return buffer.getvalue()


def flac_with_total_samples(data: bytes, total_samples: int) -> bytes:
    """Rewrite STREAMINFO's 36-bit sample count (0 means unknown, as streamed encoders leave it)."""
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must be the first metadata block"
    field = int.from_bytes(data[18:26], "big")  # rate(20) channels(3) bits(5) total(36)
    field = (field & ~((1 << 36) - 1)) | (total_samples & ((1 << 36) - 1))
    return data[:18] + field.to_bytes(8, "big") + data[26:]


def webm_without_duration(signal: npt.NDArray[Any], sample_rate: int) -> bytes:
    """Like a browser MediaRecorder upload: a live WebM with no duration in its header."""
    return encode(signal, sample_rate, "webm", live="1")


def mp3_without_xing(signal: npt.NDArray[Any], sample_rate: int, bit_rate: int) -> bytes:
    """A CBR MP3 stream without Xing/Info header: players must estimate its length."""
    return encode_pyav(
        signal,
        sample_rate,
        "mp3",
        "libmp3lame",
        container_options={"write_xing": "0", "id3v2_version": "0"},
        bit_rate=bit_rate,
    )
