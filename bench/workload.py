"""Deterministic speech-like audio for the benchmark, encoded the way clients send it (mp3, wav).

The dummy model does not listen, but the servers do real work on the audio: container parsing, mp3
decoding, resampling to 16 kHz, Whisper features, chunking of long files at quiet moments. So the
signal has the structure of speech: phrases of voiced syllables (a harmonic series on a gliding pitch,
shaped by vowel formants and a syllable envelope), consonant-like noise bursts, pauses between words and
longer ones between phrases, and a faint noise floor. Everything follows from a seed: the same index
gives the same bytes on every machine, and different indices never repeat (so neither server can answer
from vLLM's prefix or multimodal caches).

Usage (pre-generate into the cache; `run_all.py` does this itself):
    python -m bench.workload --root /tmp/qwenasr-bench/audio --clips 64 --formats mp3,wav
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile as sf

FloatArray = npt.NDArray[np.float32]

SYNTH_RATE = 16_000  # the signal is built at 16 kHz (speech content below 4 kHz), then resampled
BLOCK_SECONDS = 60.0  # long files are built block by block: bounded memory, parallel-friendly
MAX_HARMONIC_HZ = 3_800.0
FORMATS = ("mp3", "wav")
CONTENT_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav"}
DEFAULT_RATES = {"mp3": 44_100, "wav": 16_000}  # a phone or browser mp3; a 16 kHz PCM wav from an ASR client
CLIP_SECONDS = 29.5  # "30 s clips": a little under the 30 s chunk limit, so mp3 padding never adds a chunk

# (F1, F2, F3) in Hz of a few vowels, roughly an adult speaker's.
_VOWELS = np.array(
    [
        (730, 1090, 2440),  # a
        (530, 1840, 2480),  # e
        (270, 2290, 3010),  # i
        (570, 840, 2410),  # o
        (300, 870, 2240),  # u
        (660, 1720, 2410),  # ae
        (500, 1500, 2500),  # schwa
        (440, 1020, 2240),  # open o
    ],
    dtype=np.float64,
)
_BANDWIDTHS = np.array([90.0, 110.0, 170.0])
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])


@dataclass(frozen=True)
class Speaker:
    f0: float  # mean pitch, Hz
    rate: float  # syllables per second while speaking
    vibrato_hz: float
    formant_scale: float  # vocal tract length: shifts all formants


def speaker_for(seed: int) -> Speaker:
    rng = np.random.default_rng([seed, 0x5EED])
    return Speaker(
        f0=float(rng.uniform(95.0, 230.0)),
        rate=float(rng.uniform(3.5, 5.5)),
        vibrato_hz=float(rng.uniform(4.5, 6.5)),
        formant_scale=float(rng.uniform(0.9, 1.15)),
    )


def _harmonic_weights(f0: float, formants: npt.NDArray[np.float64], count: int) -> npt.NDArray[np.float64]:
    """Amplitude of harmonics 1..count of `f0` under a three-formant envelope with a -6 dB/octave tilt."""
    freqs = f0 * np.arange(1, count + 1, dtype=np.float64)
    envelope = np.zeros_like(freqs)
    for formant, bandwidth, gain in zip(formants, _BANDWIDTHS, _FORMANT_GAINS, strict=True):
        envelope += gain / (1.0 + ((freqs - formant) / bandwidth) ** 2)
    weights: npt.NDArray[np.float64] = (envelope + 0.02) / np.sqrt(np.arange(1, count + 1))
    weights[freqs > MAX_HARMONIC_HZ] = 0.0
    return weights


def _voiced(phase: npt.NDArray[np.float64], weights: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """sum_k weights[k-1] * sin(k * phase), by the Chebyshev recurrence (one sin and one cos in all)."""
    two_cos = 2.0 * np.cos(phase)
    previous = np.zeros_like(phase)
    current = np.sin(phase)
    out: npt.NDArray[np.float64] = weights[0] * current
    for weight in weights[1:]:
        previous, current = current, two_cos * current - previous
        if weight:
            out += weight * current
    return out


def _block(seconds: float, rng: np.random.Generator, speaker: Speaker) -> npt.NDArray[np.float64]:
    """`seconds` of speech-like signal at SYNTH_RATE; starts and ends in a pause."""
    n = max(1, round(seconds * SYNTH_RATE))
    out = np.zeros(n, dtype=np.float64)
    t = float(rng.uniform(0.05, 0.4))
    while True:
        # One phrase: a few words of one to three syllables, with a falling pitch (declination).
        syllables = int(rng.integers(4, 14))
        phrase_gain = float(rng.uniform(0.55, 1.0))
        decline = float(rng.uniform(0.08, 0.25))
        for index in range(syllables):
            duration = float(rng.uniform(0.6, 1.4)) / speaker.rate
            if t + duration + 0.05 > seconds:
                break
            start = round(t * SYNTH_RATE)
            length = round(duration * SYNTH_RATE)
            if rng.random() < 0.45:  # a consonant: a short burst of high-passed noise before the vowel
                burst = round(float(rng.uniform(0.03, 0.08)) * SYNTH_RATE)
                noise = np.diff(rng.standard_normal(burst + 1))
                shape = np.sin(np.linspace(0.0, math.pi, burst)) ** 2
                end = min(n, start + burst)
                out[start:end] += (0.12 * phrase_gain * noise * shape)[: end - start]
                start = end
                length = max(1, length - burst)
            end = min(n, start + length)
            length = end - start
            if length <= 8:
                break
            progress = index / max(1, syllables - 1)
            pitch = speaker.f0 * (1.0 + 0.12 * rng.standard_normal()) * (1.0 - decline * progress)
            glide = float(rng.uniform(-0.15, 0.1))
            local = np.arange(length, dtype=np.float64) / SYNTH_RATE
            f0 = pitch * (1.0 + glide * local / duration)
            f0 *= 1.0 + 0.012 * np.sin(2.0 * math.pi * speaker.vibrato_hz * local + rng.uniform(0, 2 * math.pi))
            phase = 2.0 * math.pi * np.cumsum(f0) / SYNTH_RATE + rng.uniform(0, 2 * math.pi)
            formants = _VOWELS[int(rng.integers(len(_VOWELS)))] * speaker.formant_scale
            formants = formants * (1.0 + 0.06 * rng.standard_normal(3))
            count = int(MAX_HARMONIC_HZ // max(40.0, pitch * 0.8))
            weights = _harmonic_weights(pitch, formants, max(1, count))
            envelope = np.sin(np.linspace(0.0, math.pi, length)) ** 0.7  # attack, hold, decay
            stress = float(rng.uniform(0.5, 1.0))
            out[start:end] += phrase_gain * stress * envelope * _voiced(phase, weights)
            t = end / SYNTH_RATE + (
                float(rng.uniform(0.01, 0.05)) if rng.random() < 0.6 else float(rng.uniform(0.08, 0.2))
            )  # within a word, or between words
        t += float(rng.uniform(0.25, 0.9))  # pause between phrases
        if t + 0.5 > seconds:
            break
    return out


def synthesize_speech(seconds: float, seed: int, sample_rate: int = SYNTH_RATE) -> FloatArray:
    """`seconds` of mono speech-like audio at `sample_rate` (float32, peak about 0.6), from `seed`."""
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    speaker = speaker_for(seed)
    blocks: list[npt.NDArray[np.float64]] = []
    remaining = seconds
    index = 0
    while remaining > 1e-9:
        part = min(BLOCK_SECONDS, remaining)
        rng = np.random.default_rng([seed, index])
        block = _block(part, rng, speaker)
        peak = float(np.max(np.abs(block))) or 1.0
        blocks.append(block * (0.6 / peak))
        remaining -= part
        index += 1
    signal = np.concatenate(blocks)
    total = round(seconds * sample_rate)
    if sample_rate != SYNTH_RATE:
        # Linear interpolation is enough here: nothing above 4 kHz needs preserving.
        positions = np.arange(total, dtype=np.float64) * (SYNTH_RATE / sample_rate)
        signal = np.interp(positions, np.arange(signal.size, dtype=np.float64), signal)
    signal = signal[:total]
    if signal.size < total:
        signal = np.pad(signal, (0, total - signal.size))
    floor_rng = np.random.default_rng([seed, 0xF1008])
    signal = signal + 0.002 * floor_rng.standard_normal(total)  # room noise, over the whole band
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def encode(samples: FloatArray, sample_rate: int, fmt: str) -> bytes:
    """The audio as a file: `mp3` (MPEG layer III, libsndfile's LAME) or `wav` (16-bit PCM)."""
    buffer = io.BytesIO()
    if fmt == "mp3":
        sf.write(buffer, samples, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    elif fmt == "wav":
        sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    else:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return buffer.getvalue()


def decode(data: bytes) -> tuple[FloatArray, int]:
    """Decode with soundfile (what the tests use to check a file): (mono float32 samples, rate)."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    return np.asarray(samples, dtype=np.float32), int(rate)


# -- the on-disk cache ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioSpec:
    """One file of the workload: what to synthesize and how to encode it."""

    kind: str  # "clip" or "long"
    index: int
    seconds: float
    fmt: str
    sample_rate: int

    @property
    def seed(self) -> int:
        # Clips and long files draw from disjoint seed ranges.
        return (1_000_000 if self.kind == "long" else 0) + self.index

    @property
    def relative_path(self) -> Path:
        folder = f"{self.kind}-{self.fmt}-{self.sample_rate}-{self.seconds:g}s"
        return Path(folder) / f"{self.index:05d}.{self.fmt}"


@dataclass(frozen=True)
class AudioItem:
    """A workload file ready to send."""

    name: str
    fmt: str
    seconds: float
    path: Path

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]

    @property
    def filename(self) -> str:
        return self.path.name

    def read(self) -> bytes:
        return self.path.read_bytes()


def _build(root: str, spec: AudioSpec) -> str:
    path = Path(root) / spec.relative_path
    if path.exists():
        return str(path)
    data = encode(synthesize_speech(spec.seconds, spec.seed, spec.sample_rate), spec.sample_rate, spec.fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return str(path)


def ensure(root: Path, specs: Sequence[AudioSpec], workers: int | None = None) -> list[AudioItem]:
    """The files of `specs` under `root`, synthesizing the missing ones in parallel (longest first)."""
    missing = [spec for spec in specs if not (root / spec.relative_path).exists()]
    if missing:
        started = time.perf_counter()
        order = sorted(missing, key=lambda spec: -spec.seconds)
        count = max(1, min(workers or (os.cpu_count() or 1), len(order)))
        if count == 1:
            for spec in order:
                _build(str(root), spec)
        else:
            with ProcessPoolExecutor(max_workers=count) as pool:
                list(pool.map(_build, [str(root)] * len(order), order, chunksize=1))
        total = sum(spec.seconds for spec in missing)
        print(
            f"[workload] synthesized {len(missing)} files ({total:,.0f} audio s) in "
            f"{time.perf_counter() - started:.1f} s with {count} processes",
            file=sys.stderr,
            flush=True,
        )
    return [
        AudioItem(
            name=f"{spec.kind}{spec.index:05d}.{spec.fmt}",
            fmt=spec.fmt,
            seconds=spec.seconds,
            path=root / spec.relative_path,
        )
        for spec in specs
    ]


def clip_specs(
    fmt: str, indices: Iterable[int], seconds: float = CLIP_SECONDS, sample_rate: int | None = None
) -> list[AudioSpec]:
    rate = sample_rate or DEFAULT_RATES[fmt]
    return [AudioSpec("clip", index, seconds, fmt, rate) for index in indices]


def long_spec(fmt: str, seconds: float, index: int = 0, sample_rate: int | None = None) -> AudioSpec:
    return AudioSpec("long", index, seconds, fmt, sample_rate or DEFAULT_RATES[fmt])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/qwenasr-bench/audio"))
    parser.add_argument("--clips", type=int, default=32, help="clips per format (indices 0..N-1)")
    parser.add_argument("--clip-seconds", type=float, default=CLIP_SECONDS)
    parser.add_argument("--long", default="", help="comma-separated long-file durations in seconds, e.g. 488,3600")
    parser.add_argument("--formats", default="mp3,wav")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)
    specs: list[AudioSpec] = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        specs += clip_specs(fmt, range(args.clips), args.clip_seconds)
        specs += [long_spec(fmt, float(s)) for s in args.long.split(",") if s.strip()]
    items = ensure(args.root, specs, args.workers or None)
    size = sum(item.path.stat().st_size for item in items)
    print(f"{len(items)} files, {size / 2**20:.1f} MiB under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
