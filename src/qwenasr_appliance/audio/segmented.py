"""Decode one long upload in pieces, one per decode worker, with the result of a one-pass decode.

A long file is the one request whose decoding a single core does alone: a 488 s mp3 takes about
0.6 s to decode and resample, as long as the model takes to transcribe it on a GPU. So the file is
cut on its own time line (positions in source samples) into contiguous ranges; each worker decodes
one range and resamples it, and the pieces are laid end to end.

What makes the pieces equal the one-pass decode (to float rounding; tested per format):
* Decoder state: a worker starts decoding `PREROLL_SECONDS` before its range and throws that output
  away, so bit reservoirs, overlap-add windows and predictors have converged when its range begins.
* Resampler state: a worker resamples `RESAMPLE_MARGIN_SECONDS` more on both sides of its range
  (soxr's filter reaches a few milliseconds) and keeps exactly its range.
* Resampler phase: range starts lie a whole number of "rate periods" after the first sample
  (441 source samples = 160 output samples at 44.1 kHz), so every piece's output grid is the
  one-pass grid.
* Time line: positions come from packet and frame timestamps, which must be whole samples and
  gapless. Anything the one-pass decoder treats specially (a sample-rate change, a damaged packet,
  a gap, a time base coarser than a sample) raises `NotSplittable`, and the caller decodes in one
  pass instead.

Every function here is synchronous CPU work for a decode worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final

import numpy as np
import soxr

from qwenasr_appliance.audio.decode import (
    DURATION_TOLERANCE_SECONDS,
    RESAMPLE_QUALITY,
    SF_ESTIMATED_LENGTH_FORMATS,
    SF_READ_ERRORS,
    AudioTooLongError,
    DecoderName,
    FrameBatcher,
    Interleaver,
    MonoBlock,
    average_channels,
    check_header_duration,
    check_sample_rate,
    clean_in_place,
    data_chunk_cut,
    known_frames,
    open_pyav,
    open_soundfile,
    peak,
    prefers_ffmpeg,
    pyav_duration,
)
from qwenasr_appliance.audio.ogg import ogg_links
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray

__all__ = ["DecodedSegment", "NotSplittable", "SegmentPlan", "decode_segment", "plan_segments"]

PREROLL_SECONDS: Final = 0.5
RESAMPLE_MARGIN_SECONDS: Final = 0.1
# The first decoded frame must come within this many packets, or the file is left to one pass.
_FIRST_FRAME_PACKETS: Final = 64
_SF_BLOCK_FRAMES: Final = 1 << 16
# Demuxing a second of audio costs about this fraction of decoding it (mp3: 36 ms vs 0.38 s for 488 s;
# measured on one core, the slowest of 16 pieces: 53-55 ms at 0.06, 50-52 ms at 0.09, 56 ms at 0.12).
_DEMUX_COST: Final = 0.09
# libsndfile subtypes read by copying (FLAC calls its samples PCM too): at 16 kHz there is nothing to
# share out, pieces only add work.
_SF_PLAIN_SUBTYPES: Final = ("PCM_", "FLOAT", "DOUBLE", "ULAW", "ALAW")


class NotSplittable(Exception):
    """This file must be decoded in one pass (`decode.decode_audio`)."""


@dataclass(frozen=True)
class SegmentPlan:
    """Where the pieces of one file start, on its time line in source samples.

    `starts[0]` is `origin`, the position of the first decoded sample; piece i covers
    [starts[i], starts[i + 1]) and the last piece runs to the end of the stream.
    """

    decoder: DecoderName
    container: str
    codec: str
    rate: int
    channels: int
    origin: int
    starts: tuple[int, ...]
    max_seconds: float
    # Where the header says the stream ends (libsndfile's exact frame count; None for FFmpeg's estimates):
    # a stream that ends before it was cut, as the one-pass decode flags it.
    declared_end: int | None = None

    @property
    def segments(self) -> int:
        return len(self.starts)

    def output_offset(self, index: int) -> int:
        """Where piece `index` begins in the 16 kHz output (exact: starts are on the rate period)."""
        return (self.starts[index] - self.origin) * SAMPLE_RATE // self.rate

    def limit_position(self) -> float:
        """The stream position past which the audio is too long (as `decode_audio` counts)."""
        return self.origin + (self.max_seconds + DURATION_TOLERANCE_SECONDS) * self.rate


@dataclass(frozen=True)
class DecodedSegment:
    """One decoded piece: 16 kHz samples of [start, min(next start, end of stream))."""

    index: int
    samples: AudioArray
    source_end: int  # where this piece's audio ends on the time line
    reached_end: bool  # the stream ends inside (or before) this piece: later pieces are empty
    peak: float = 0.0  # largest absolute sample value of `samples`: the whole signal is scaled by the largest


def rate_period(rate: int) -> int:
    """Source samples per whole number of output samples."""
    return rate // math.gcd(rate, SAMPLE_RATE)


def plan_segments(
    data: bytes, filename: str | None, *, max_seconds: float, max_segments: int, min_segment_seconds: float
) -> SegmentPlan | None:
    """A plan for up to `max_segments` pieces of at least `min_segment_seconds`, or None when the file
    is short, unknown in length, or not of a kind that splits exactly (the one-pass decoder then also
    reports any problem with it). Raises `AudioTooLongError` when the header says the file is too long.
    """
    if max_segments < 2 or not data:
        return None
    try:
        if prefers_ffmpeg(data, filename):
            return _plan_pyav(data, max_seconds, max_segments, min_segment_seconds)
        return _plan_soundfile(data, max_seconds, max_segments, min_segment_seconds)
    except AudioTooLongError:
        raise
    except Exception:  # anything unusual is the one-pass decoder's to report
        return None


def _starts(
    origin: int, rate: int, seconds: float, max_segments: int, min_segment_seconds: float, *, demux_cost: float = 0.0
) -> tuple[int, ...] | None:
    """Piece starts on the rate period. A PyAV piece also demuxes everything before it (at `demux_cost`
    of its decoding cost per second of audio), so later pieces get less audio, making every piece's
    work `demux_cost * end + length` the same: start_i = L * (1 - a**i) / (1 - a**n), a = 1/(1 + cost).
    """
    count = min(max_segments, int(seconds // min_segment_seconds))
    if count < 2:
        return None
    period = rate_period(rate)
    shrink = 1.0 / (1.0 + demux_cost)
    fractions = [(1 - shrink**i) / (1 - shrink**count) if demux_cost else i / count for i in range(1, count)]
    inner = (origin + math.ceil(fraction * seconds * rate / period) * period for fraction in fractions)
    return (origin, *inner)


def _plan_soundfile(data: bytes, max_seconds: float, max_segments: int, min_seconds: float) -> SegmentPlan | None:
    with open_soundfile(data) as sound_file:
        container = str(sound_file.format)
        frames = known_frames(sound_file)
        if container in SF_ESTIMATED_LENGTH_FORMATS or frames is None or sound_file.channels < 1:
            return None
        if data_chunk_cut(data):  # a cut WAV or AIFF: one pass decodes what is there and flags it
            return None
        rate = int(sound_file.samplerate)
        check_sample_rate(rate)
        check_header_duration(frames / rate, max_seconds, exact=True)
        plain = container != "FLAC" and str(sound_file.subtype).startswith(_SF_PLAIN_SUBTYPES)
        if plain and rate == SAMPLE_RATE:
            return None
        starts = _starts(0, rate, frames / rate, max_segments, min_seconds)
        if starts is None:
            return None
        return SegmentPlan(
            decoder="soundfile",
            container=container.lower(),
            codec=str(sound_file.subtype).lower(),
            rate=rate,
            channels=int(sound_file.channels),
            origin=0,
            starts=starts,
            max_seconds=max_seconds,
            declared_end=frames,
        )


class _TimeLine:
    """Stream timestamps -> whole source samples; anything else is NotSplittable."""

    def __init__(self, time_base: Fraction, rate: int) -> None:
        self._numerator = time_base.numerator * rate
        self._denominator = time_base.denominator

    def position(self, pts: int | None) -> int:
        if pts is None:
            raise NotSplittable("a packet or frame without a timestamp")
        whole, rest = divmod(pts * self._numerator, self._denominator)
        if rest:
            raise NotSplittable("timestamps finer than a sample")
        return whole


def _audio_stream(container: Any) -> tuple[Any, int, _TimeLine]:
    if not container.streams.audio:
        raise NotSplittable("no audio stream")
    stream = container.streams.audio[0]
    rate = int(stream.codec_context.sample_rate or 0) if stream.codec_context is not None else 0
    if rate <= 0 or stream.time_base is None:
        raise NotSplittable("no sample rate or time base before decoding")
    time_base = Fraction(stream.time_base)
    if time_base.numerator != 1 or time_base.denominator % rate:
        raise NotSplittable(f"time base {time_base} is not a whole fraction of a sample")  # e.g. WebM's 1/1000
    return stream, rate, _TimeLine(time_base, rate)


# FFmpeg's Vorbis timestamps are guesses at page boundaries (they overlap and leave gaps where the block
# size changes), though the samples themselves are gapless.
_UNTIMED_CODECS: Final = frozenset({"vorbis"})


def _plan_pyav(data: bytes, max_seconds: float, max_segments: int, min_seconds: float) -> SegmentPlan | None:
    if len(ogg_links(data)) > 1:  # a chained Ogg: its time line restarts at each link
        return None
    with open_pyav(data) as container:
        stream, rate, time_line = _audio_stream(container)
        if stream.codec_context.name in _UNTIMED_CODECS:
            return None
        check_sample_rate(rate)
        seconds = pyav_duration(container, stream)
        if seconds is None:
            return None
        check_header_duration(seconds, max_seconds, exact=False)
        if seconds < 2 * min_seconds:
            return None
        origin: int | None = None
        for count, packet in enumerate(container.demux(stream)):
            frame = next((f for f in packet.decode() if f.samples), None)
            if frame is not None:
                if int(frame.sample_rate) != rate:
                    return None
                origin = time_line.position(frame.pts)
                break
            if count >= _FIRST_FRAME_PACKETS:
                return None
        if origin is None:
            return None
        starts = _starts(origin, rate, seconds, max_segments, min_seconds, demux_cost=_DEMUX_COST)
        if starts is None:
            return None
        return SegmentPlan(
            decoder="pyav",
            container=str(container.format.name),
            codec=str(stream.codec_context.name),
            rate=rate,
            channels=int(stream.codec_context.layout.nb_channels),
            origin=origin,
            starts=starts,
            max_seconds=max_seconds,
        )


# --------------------------------------------------------------------------- one piece


def decode_segment(data: bytes, plan: SegmentPlan, index: int) -> DecodedSegment:
    """Decode piece `index` of `plan`. Raises NotSplittable, or AudioTooLongError (last piece only)."""
    start = plan.starts[index]
    last = index == plan.segments - 1
    stop = None if last else plan.starts[index + 1]
    margin = math.ceil(RESAMPLE_MARGIN_SECONDS * plan.rate / rate_period(plan.rate)) * rate_period(plan.rate)
    first = max(plan.origin, start - margin)  # first source sample resampled; on the rate period
    until = None if stop is None else stop + margin
    reader = _read_pyav if plan.decoder == "pyav" else _read_soundfile
    blocks: list[AudioArray] = []
    position = first
    for block in reader(data, plan, first, until):
        position += block.shape[0]
        if last and position > plan.limit_position():
            raise AudioTooLongError((position - plan.origin) / plan.rate, plan.max_seconds, at_least=True)
        clean_in_place(block)
        blocks.append(block)
    end = position  # the stream's end when it came before `until`
    reached_end = stop is None or end < stop  # else the stream goes on into the next piece
    source_end = end if stop is None or end < stop else stop
    if source_end <= start:
        return DecodedSegment(index, np.zeros(0, dtype=np.float32), max(source_end, plan.origin), True)
    signal = np.concatenate(blocks) if len(blocks) != 1 else blocks[0]
    if plan.rate != SAMPLE_RATE:
        signal = soxr.resample(signal, plan.rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    ratio = Fraction(SAMPLE_RATE, plan.rate)
    begin = int((start - first) * ratio)
    finish = signal.shape[0] if source_end == end else int((source_end - first) * ratio)
    samples = np.ascontiguousarray(signal[begin:finish], dtype=np.float32)
    return DecodedSegment(index, samples, source_end, reached_end, peak(samples))


def _read_soundfile(data: bytes, plan: SegmentPlan, first: int, until: int | None) -> Iterator[AudioArray]:
    with open_soundfile(data) as sound_file:
        if int(sound_file.samplerate) != plan.rate:
            raise NotSplittable("the file changed")
        remaining = math.inf if until is None else until - first
        try:
            sound_file.seek(first)
        except SF_READ_ERRORS as exc:
            raise NotSplittable(f"cannot seek to a piece: {exc}") from None
        while remaining > 0:
            count = int(min(_SF_BLOCK_FRAMES, remaining))
            try:
                block = sound_file.read(count, dtype="float32", always_2d=True)
            except SF_READ_ERRORS as exc:
                # Damaged or cut data (e.g. a cut FLAC: "decoder lost sync"): one pass keeps what decodes
                # before it and flags the result truncated.
                raise NotSplittable(f"the audio data broke off: {exc}") from None
            if block.shape[0] == 0:
                return
            remaining -= block.shape[0]
            yield average_channels(block.T)


def _read_pyav(data: bytes, plan: SegmentPlan, first: int, until: int | None) -> Iterator[AudioArray]:
    """Mono blocks covering [first, until) (or to the end), contiguous, decoded with pre-roll."""
    preroll_from = first - math.ceil(PREROLL_SECONDS * plan.rate)
    with open_pyav(data) as container:
        stream, rate, time_line = _audio_stream(container)
        if rate != plan.rate:
            raise NotSplittable("the file changed")
        interleaver = Interleaver()
        batcher = FrameBatcher()
        expected_packet: int | None = None
        batched_from: int | None = None  # stream position of the first sample handed to the batcher
        batched_to = first  # ... and of the sample after its last one

        def trimmed(blocks: list[MonoBlock]) -> Iterator[AudioArray]:
            nonlocal batched_from
            for block in blocks:
                assert batched_from is not None
                begin, batched_from = batched_from, batched_from + block.samples.shape[0]
                if block.rate != rate:
                    raise NotSplittable("the sample rate changes")
                low = max(0, first - begin)
                high = block.samples.shape[0] if until is None else min(block.samples.shape[0], until - begin)
                if high > low:
                    yield block.samples[low:high]

        for packet in container.demux(stream):
            flush = packet.size == 0 and packet.pts is None
            if not flush:
                at = time_line.position(packet.pts)
                if expected_packet is not None and at != expected_packet:
                    raise NotSplittable("packet timestamps have a gap or overlap")
                expected_packet = time_line.position(packet.pts + int(packet.duration or 0))
                if expected_packet <= preroll_from:
                    continue  # wholly before the pre-roll: not even decoded
            try:
                frames = packet.decode()
            except Exception as exc:
                if expected_packet is not None and expected_packet <= first:
                    continue  # a fresh decoder may reject a packet that leans on earlier ones
                raise NotSplittable("a damaged packet") from exc
            for frame in frames:
                if not frame.samples:
                    continue
                begin = time_line.position(frame.pts)
                end = begin + int(frame.samples)
                if end <= first:
                    continue  # pre-roll output
                if batched_from is None:
                    if begin > first:
                        raise NotSplittable("decoded audio starts late")
                    batched_from = begin
                elif begin != batched_to:
                    raise NotSplittable("decoded audio has a gap or overlap")
                batched_to = end
                for safe in interleaver.make_safe(frame):
                    yield from trimmed(batcher.add(safe))
                if until is not None and batched_to >= until:
                    yield from trimmed(batcher.flush())
                    return
        yield from trimmed(batcher.flush())
