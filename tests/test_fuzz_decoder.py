"""Property-based fuzzing of the audio decoder (hypothesis): whatever the bytes, `decode_audio` returns
well-formed audio or raises `AudioError`, never anything else, never hangs, never crashes the process.

Inputs: arbitrary bytes (alone and behind every container's magic), real recordings and generated
files with their headers' fields rewritten (WAV fmt fields, FLAC STREAMINFO, MPEG frame headers, Ogg
page headers), byte flips, splices, insertions and cuts. Bounded: a fixed number of derandomized
examples per property (FUZZ_EXAMPLES, FUZZ_RANDOM: see FUZZ). (test_audio_decode.py fuzzes random flips and cuts of eight formats as well.)
"""

from __future__ import annotations

import functools
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenasr_appliance.audio.decode import AudioError, decode_audio, probe_duration
from tests.audio_fixtures import SAMPLES_DIR, encode, pcm16, speech_like, wav_bytes

MAX_SECONDS = 30.0
# One decode of these small inputs takes milliseconds; this bound only catches hangs and quadratic blowups.
SLOW_DECODE_SECONDS = 10.0
# CI runs a fixed, derandomized budget; FUZZ_EXAMPLES=20000 FUZZ_RANDOM=1 runs a longer, fresh campaign.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    derandomize=not os.environ.get("FUZZ_RANDOM"),
    suppress_health_check=list(HealthCheck),
    database=None,
)

MAGICS = (
    b"RIFF\x24\x00\x00\x00WAVEfmt ", b"RIFX", b"RF64", b"FORM\x00\x00\x00\x00AIFF", b"fLaC", b".snd", b"caff",
    b"ID3\x04\x00\x00\x00\x00\x00\x00", b"\xff\xfb\x90\x00", b"\xff\xf1\x50\x80", b"OggS\x00\x02",
    b"\x1a\x45\xdf\xa3", b"\x00\x00\x01\xba", b"\x00\x00\x00\x20ftypM4A ", b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",
    b"#!AMR\n", b"\x47", b"wvpk", b"MAC ", b"#EXTM3U\n", b"ffconcat version 1.0\n",
)  # fmt: skip
FILENAMES = (None, "a.wav", "a.mp3", "a.flac", "a.ogg", "a.m4a", "a.webm", "a.mpeg", "a.txt", "a")


def check(data: bytes, filename: str | None) -> None:
    """The property: AudioError or well-formed audio, in bounded time."""
    started = time.monotonic()
    probe_duration(data, filename)
    try:
        decoded = decode_audio(data, filename, max_seconds=MAX_SECONDS)
    except AudioError as error:
        assert error.code in {"empty_file", "unsupported_format", "invalid_audio", "empty_audio", "audio_too_long"}
        assert error.message
    else:
        samples = decoded.samples
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.shape[0] > 0
        assert np.isfinite(samples).all() and float(np.abs(samples).max()) <= 1.0
        assert 0 < decoded.duration_seconds <= MAX_SECONDS + 1.0
    assert time.monotonic() - started < SLOW_DECODE_SECONDS


@functools.cache
def seeds() -> dict[str, bytes]:
    """Small valid files: generated in several formats, plus the real recordings' first 200 kB."""
    signal = speech_like(0.6, 16_000, seed=11)
    files = {fmt: encode(signal, 16_000, fmt) for fmt in ("wav", "flac", "mp3", "ogg", "m4a", "webm", "aiff")}
    files["wav-8bit-stereo"] = wav_bytes(
        (np.clip(np.stack([signal, signal], 1) * 127 + 128, 0, 255)).astype(np.uint8).tobytes(),
        sample_rate=16_000,
        channels=2,
        bits=8,
    )
    for path in sorted(Path(SAMPLES_DIR).glob("*")):
        if path.suffix in {".wav", ".flac", ".mp3", ".ogg", ".aiff"}:
            files[path.name] = path.read_bytes()[:200_000]
    return files


@given(data=st.binary(max_size=4096), filename=st.sampled_from(FILENAMES))
@FUZZ
def test_arbitrary_bytes(data: bytes, filename: str | None) -> None:
    check(data, filename)


@given(magic=st.sampled_from(MAGICS), rest=st.binary(max_size=4096), filename=st.sampled_from(FILENAMES))
@FUZZ
def test_arbitrary_bytes_behind_a_container_magic(magic: bytes, rest: bytes, filename: str | None) -> None:
    check(magic + rest, filename)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str]:
    name = draw(st.sampled_from(sorted(seeds())))
    data = bytearray(seeds()[name])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(("flip-head", "flip", "insert", "delete", "splice", "truncate")))
        size = len(data)
        if size == 0:
            break
        if kind == "flip-head":  # headers hold the fields that matter: hit the first bytes hardest
            data[draw(st.integers(0, min(size, 128) - 1))] = draw(st.integers(0, 255))
        elif kind == "flip":
            data[draw(st.integers(0, size - 1))] = draw(st.integers(0, 255))
        elif kind == "insert":
            at = draw(st.integers(0, size))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            at = draw(st.integers(0, size - 1))
            del data[at : at + draw(st.integers(1, 256))]
        elif kind == "splice":  # a block of another file in the middle of this one
            other = seeds()[draw(st.sampled_from(sorted(seeds())))]
            start = draw(st.integers(0, max(0, len(other) - 1)))
            at = draw(st.integers(0, size))
            data[at:at] = other[start : start + draw(st.integers(1, 4096))]
        else:
            del data[draw(st.integers(1, size)) :]
    suffix = name.rsplit(".", 1)[-1] if "." in name else name.split("-")[0]
    return bytes(data), f"x.{suffix}"


@given(case=mutated())
@FUZZ
def test_mutated_files(case: tuple[bytes, str]) -> None:
    check(*case)


# --------------------------------------------------------------------------- header fields


@given(
    channels=st.integers(0, 70_000),
    rate=st.integers(0, 2**32 - 1),
    bits=st.sampled_from((0, 1, 4, 8, 12, 16, 20, 24, 32, 64, 65_535)),
    format_tag=st.sampled_from((0, 1, 2, 3, 6, 7, 0x11, 0x55, 0xFFFE, 0xFFFF)),
    declared=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    pcm=st.binary(max_size=2048),
)
@FUZZ
def test_wav_fmt_fields(channels: int, rate: int, bits: int, format_tag: int, declared: int | None, pcm: bytes) -> None:
    channels_field = channels & 0xFFFF
    block_align = (channels_field * bits // 8) & 0xFFFF
    fmt_chunk = struct.pack(
        "<4sIHHIIHH",
        b"fmt ",
        16,
        format_tag,
        channels_field,
        rate,
        (rate * block_align) & 0xFFFFFFFF,
        block_align,
        bits,
    )
    data_chunk = struct.pack("<4sI", b"data", len(pcm) if declared is None else declared) + pcm
    body = b"WAVE" + fmt_chunk + data_chunk
    check(struct.pack("<4sI", b"RIFF", len(body)) + body, "x.wav")


@functools.cache
def flac_seed() -> bytes:
    return encode(speech_like(0.5, 16_000, seed=5), 16_000, "flac")


@given(
    min_block=st.integers(0, 2**16 - 1),
    max_block=st.integers(0, 2**16 - 1),
    rate=st.integers(0, 2**20 - 1),
    channels=st.integers(0, 7),
    bits=st.integers(0, 31),
    total=st.integers(0, 2**36 - 1),
)
@FUZZ
def test_flac_streaminfo_fields(
    min_block: int, max_block: int, rate: int, channels: int, bits: int, total: int
) -> None:
    data = bytearray(flac_seed())
    assert data[:4] == b"fLaC"
    data[8:10] = min_block.to_bytes(2, "big")
    data[10:12] = max_block.to_bytes(2, "big")
    packed = (rate << 44) | (channels << 41) | (bits << 36) | total
    data[18:26] = packed.to_bytes(8, "big")
    check(bytes(data), "x.flac")


@functools.cache
def mp3_seed() -> bytes:
    return encode(speech_like(0.5, 16_000, seed=9), 16_000, "mp3")


def _frame_offsets(data: bytes) -> list[int]:
    return [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0][:64]


@given(choice=st.integers(0, 63), header=st.integers(0, 2**32 - 1), repeat=st.integers(1, 8))
@FUZZ
def test_mpeg_frame_headers(choice: int, header: int, repeat: int) -> None:
    data = bytearray(mp3_seed())
    offsets = _frame_offsets(bytes(data))
    assert offsets
    for index in range(repeat):
        at = offsets[(choice + index * 7) % len(offsets)]
        data[at : at + 4] = ((header | 0xFFE00000) & 0xFFFFFFFF).to_bytes(4, "big")
    check(bytes(data), "x.mp3")


@functools.cache
def ogg_seed() -> bytes:
    return encode(speech_like(0.5, 16_000, seed=13), 16_000, "ogg")


@given(page=st.integers(0, 7), field=st.sampled_from(("flags", "granule", "serial", "segments")), value=st.integers())
@FUZZ
def test_ogg_page_headers(page: int, field: str, value: int) -> None:
    data = bytearray(ogg_seed())
    pages = [i for i in range(len(data) - 4) if data[i : i + 4] == b"OggS"]
    at = pages[page % len(pages)]
    offset, width = {"flags": (5, 1), "granule": (6, 8), "serial": (14, 4), "segments": (26, 1)}[field]
    data[at + offset : at + offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    check(bytes(data), "x.ogg")


@pytest.mark.parametrize("rate", [1, 999, 1000, 768_000, 768_001, 2**31 - 1])
def test_sample_rate_edges(rate: int) -> None:
    check(wav_bytes(pcm16(speech_like(0.05, 16_000)), sample_rate=rate), "x.wav")
