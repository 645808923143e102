"""A long upload decoded in pieces across the decode workers equals the one-pass decode."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from qwenasr_appliance.audio import segmented
from qwenasr_appliance.audio import transfer as transfer_module
from qwenasr_appliance.audio.decode import AudioTooLongError, DecodedAudio, decode_audio
from qwenasr_appliance.audio.decoder_pool import AudioDecoder
from qwenasr_appliance.audio.samples import SAMPLE_RATE
from qwenasr_appliance.audio.segmented import DecodedSegment, NotSplittable, SegmentPlan, decode_segment, plan_segments
from qwenasr_appliance.audio.transfer import PieceResult, SegmentJob, SharedFiles, assemble, decode_piece

from .audio_fixtures import encode, encode_pyav, mp3_without_xing, speech_like

SECONDS = 95.0
MAX_SECONDS = 3600.0
PIECE_SECONDS = 20.0


def _pieces(data: bytes, name: str, segments: int = 4) -> tuple[SegmentPlan, list[DecodedSegment]]:
    plan = plan_segments(data, name, max_seconds=MAX_SECONDS, max_segments=segments, min_segment_seconds=PIECE_SECONDS)
    assert plan is not None, f"{name} should split"
    return plan, [decode_segment(data, plan, i) for i in range(plan.segments)]


def _joined(plan: SegmentPlan, pieces: list[DecodedSegment]) -> tuple[np.ndarray, float]:
    for piece in pieces:
        assert piece.samples.dtype == np.float32
    last = next(i for i, piece in enumerate(pieces) if piece.reached_end)
    assert all(piece.samples.size == 0 for piece in pieces[last + 1 :])
    for i, piece in enumerate(pieces[:last]):
        assert piece.samples.size == plan.output_offset(i + 1) - plan.output_offset(i)
    return np.concatenate([p.samples for p in pieces]), (pieces[last].source_end - plan.origin) / plan.rate


@pytest.fixture(scope="module")
def stereo_speech() -> np.ndarray:
    return speech_like(SECONDS, 44_100, channels=2, seed=11)


# Formats whose pieces are the one-pass decode to float rounding; the rate is the file's.
EXACT = [("wav", 44_100), ("flac", 22_050), ("aiff", 44_100), ("opus", 48_000), ("mp3", 44_100)]
EXACT += [("mpga", 44_100), ("flac", 16_000), ("mp3", 16_000), ("opus", 16_000)]


@pytest.mark.parametrize(("fmt", "rate"), EXACT)
def test_pieces_equal_the_one_pass_decode(stereo_speech: np.ndarray, fmt: str, rate: int) -> None:
    signal = stereo_speech if rate == 44_100 else speech_like(SECONDS, rate, channels=2, seed=12)
    data = encode(signal, rate, fmt)
    reference = decode_audio(data, f"x.{fmt}", max_seconds=MAX_SECONDS)
    plan, pieces = _pieces(data, f"x.{fmt}")
    joined, duration = _joined(plan, pieces)
    assert plan.segments == 4 and plan.channels == reference.source_channels == 2
    assert plan.rate == reference.source_sample_rate
    assert joined.shape == reference.samples.shape
    assert duration == pytest.approx(reference.duration_seconds, abs=1e-9)
    np.testing.assert_allclose(joined, reference.samples, rtol=0, atol=2e-6)


@pytest.mark.parametrize("fmt", ["m4a", "aac"])
def test_aac_pieces_differ_only_in_substituted_noise(stereo_speech: np.ndarray, fmt: str) -> None:
    # AAC's perceptual noise substitution fills bands from a running random generator, which no
    # decoder that starts mid-stream can reproduce; everything else converges during the pre-roll.
    data = encode(stereo_speech, 44_100, fmt)
    reference = decode_audio(data, f"x.{fmt}", max_seconds=MAX_SECONDS).samples
    plan, pieces = _pieces(data, f"x.{fmt}")
    joined, _ = _joined(plan, pieces)
    assert joined.shape == reference.shape
    difference = joined - reference
    assert np.abs(difference).max() < 5e-3
    assert np.sqrt(np.mean(difference**2)) < 1e-3 * np.sqrt(np.mean(reference**2))


@pytest.mark.parametrize("fmt", ["webm", "mka", "mpeg", "ogg"])
def test_files_without_sample_exact_timestamps_are_left_to_one_pass(stereo_speech: np.ndarray, fmt: str) -> None:
    # WebM and Matroska count milliseconds, MPEG-PS 1/90000 s: neither is a whole number of samples.
    # FFmpeg's Ogg Vorbis timestamps overlap and leave gaps where the block size changes.
    data = encode(stereo_speech, 48_000 if fmt == "webm" else 44_100, fmt)
    assert plan_segments(data, f"x.{fmt}", max_seconds=MAX_SECONDS, max_segments=4, min_segment_seconds=20) is None


def test_short_files_plain_16k_wav_and_a_single_worker_are_not_split(stereo_speech: np.ndarray) -> None:
    def plan(data: bytes, segments: int = 4) -> SegmentPlan | None:
        return plan_segments(data, None, max_seconds=MAX_SECONDS, max_segments=segments, min_segment_seconds=20)

    assert plan(encode(stereo_speech[: 44_100 * 39], 44_100, "mp3")) is None  # under two pieces
    assert plan(encode(stereo_speech, 44_100, "mp3"), segments=1) is None
    assert plan(encode(speech_like(SECONDS, 16_000), 16_000, "wav")) is None  # a copy: nothing to share
    assert plan(b"not audio at all" * 10_000) is None
    long_plan = plan(encode(stereo_speech, 44_100, "mp3"), segments=64)
    assert long_plan is not None and long_plan.segments == 4  # at least 20 s each: 95 // 20


def test_piece_starts_sit_on_the_resampling_grid(stereo_speech: np.ndarray) -> None:
    plan, _ = _pieces(encode(stereo_speech, 44_100, "mp3"), "x.mp3")
    assert plan.origin == 1105  # LAME's encoder delay plus the decoder's, skipped by FFmpeg
    for i, start in enumerate(plan.starts):
        assert (start - plan.origin) % 441 == 0  # 441 samples at 44.1 kHz = 160 at 16 kHz
        assert plan.output_offset(i) == (start - plan.origin) * 160 // 441


def test_a_header_over_the_limit_is_refused_before_any_decoding(stereo_speech: np.ndarray) -> None:
    data = encode(stereo_speech, 44_100, "flac")
    with pytest.raises(AudioTooLongError) as caught:
        plan_segments(data, "x.flac", max_seconds=60, max_segments=4, min_segment_seconds=20)
    assert not caught.value.at_least


def _mp3_stream(seconds: float, bit_rate: int, seed: int) -> bytes:
    return mp3_without_xing(speech_like(seconds, 44_100, seed=seed), 44_100, bit_rate)


def test_an_underestimated_length_still_decodes_all_of_it_and_the_last_piece_keeps_the_limit() -> None:
    # Two CBR streams back to back: the length is estimated from the first one's bit rate.
    data = _mp3_stream(40, 128_000, 1) + _mp3_stream(80, 32_000, 2)
    reference = decode_audio(data, "x.mp3", max_seconds=MAX_SECONDS)
    plan, pieces = _pieces(data, "x.mp3")
    estimated = (plan.starts[-1] - plan.origin) / plan.rate
    assert estimated < 0.75 * reference.duration_seconds  # the last piece does most of the work
    joined, duration = _joined(plan, pieces)
    np.testing.assert_allclose(joined, reference.samples, rtol=0, atol=2e-6)
    assert duration == pytest.approx(reference.duration_seconds)

    tight = plan_segments(data, "x.mp3", max_seconds=90, max_segments=4, min_segment_seconds=PIECE_SECONDS)
    assert tight is not None  # the estimate is under the limit...
    with pytest.raises(AudioTooLongError) as caught:  # ...the decoded audio is not
        decode_segment(data, tight, tight.segments - 1)
    assert caught.value.at_least


def test_an_overestimated_length_leaves_the_pieces_past_the_end_empty() -> None:
    data = _mp3_stream(45, 32_000, 3) + _mp3_stream(20, 128_000, 4)
    reference = decode_audio(data, "x.mp3", max_seconds=MAX_SECONDS)
    plan, pieces = _pieces(data, "x.mp3", segments=8)
    assert (plan.starts[-1] - plan.origin) / plan.rate > reference.duration_seconds
    assert pieces[-1].samples.size == 0 and pieces[-1].reached_end
    joined, duration = _joined(plan, pieces)
    np.testing.assert_allclose(joined, reference.samples, rtol=0, atol=2e-6)
    assert duration == pytest.approx(reference.duration_seconds)


def test_a_sample_rate_change_midway_is_left_to_one_pass() -> None:
    data = _mp3_stream(50, 64_000, 5) + mp3_without_xing(speech_like(50, 22_050, seed=6), 22_050, 64_000)
    plan = plan_segments(data, "x.mp3", max_seconds=MAX_SECONDS, max_segments=4, min_segment_seconds=PIECE_SECONDS)
    assert plan is not None
    with pytest.raises(NotSplittable):
        for index in range(plan.segments):
            decode_segment(data, plan, index)


def _damaged_mp3(stereo_speech: np.ndarray) -> bytes:
    data = bytearray(encode(stereo_speech, 44_100, "mp3"))
    middle = len(data) * 5 // 8
    data[middle : middle + 3000] = bytes(range(256)) * 11 + bytes(184)  # garbage over a few frames
    return bytes(data)


# --------------------------------------------------------------------------- across processes


def _shared_files() -> list[str]:
    return sorted(p.name for p in Path(transfer_module._spill_directory()).glob("qwenasr-*"))


def _decode(data: bytes, name: str, processes: int = 3) -> tuple[DecodedAudio, int]:
    async def run() -> tuple[DecodedAudio, int]:
        decoder = AudioDecoder(processes, max_seconds=MAX_SECONDS)
        try:
            result = await decoder.decode(data, name)
            return result.audio, result.pieces
        finally:
            decoder.close()

    return asyncio.run(run())


def test_the_decoder_splits_a_long_upload_across_its_workers(stereo_speech: np.ndarray) -> None:
    before = _shared_files()
    data = encode(stereo_speech, 44_100, "mp3")
    decoded, pieces = _decode(data, "x.mp3")
    reference = decode_audio(data, "x.mp3", max_seconds=MAX_SECONDS)
    assert pieces == 3
    assert isinstance(decoded.samples, np.memmap) and not decoded.samples.flags.writeable
    np.testing.assert_allclose(decoded.samples, reference.samples, rtol=0, atol=2e-6)
    assert (decoded.duration_seconds, decoded.container, decoded.codec, decoded.decoder) == (
        reference.duration_seconds,
        reference.container,
        reference.codec,
        reference.decoder,
    )
    assert _shared_files() == before  # the upload and output files are gone


def test_a_file_that_will_not_split_is_decoded_in_one_pass(stereo_speech: np.ndarray) -> None:
    data = _damaged_mp3(stereo_speech)
    reference = decode_audio(data, "x.mp3", max_seconds=MAX_SECONDS)
    decoded, pieces = _decode(data, "x.mp3")
    assert pieces == 1
    np.testing.assert_array_equal(decoded.samples, reference.samples)
    short, pieces = _decode(encode(stereo_speech[: 44_100 * 10], 44_100, "mp3"), "x.mp3")
    assert pieces == 1 and short.duration_seconds == pytest.approx(10, abs=0.05)


def test_too_long_audio_fails_the_same_way_in_pieces() -> None:
    data = _mp3_stream(40, 128_000, 1) + _mp3_stream(80, 32_000, 2)

    async def run() -> None:
        decoder = AudioDecoder(3, max_seconds=90)
        try:
            with pytest.raises(AudioTooLongError):
                await decoder.decode(data, "x.mp3")
        finally:
            decoder.close()

    asyncio.run(run())


def test_a_cancelled_request_leaves_no_shared_files(stereo_speech: np.ndarray) -> None:
    before = _shared_files()
    data = encode(stereo_speech, 44_100, "flac")

    async def run() -> None:
        decoder = AudioDecoder(2, max_seconds=MAX_SECONDS)
        await decoder.warm_up()
        try:
            for delay in (0.0, 0.05, 0.15, 0.3):
                task = asyncio.create_task(decoder.decode(data, "x.flac"))
                await asyncio.sleep(delay)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            result = await decoder.decode(data, "x.flac")  # and the workers still serve
            assert result.pieces == 2
        finally:
            decoder.close()

    asyncio.run(run())
    assert _shared_files() == before


@contextlib.contextmanager
def _job(data: bytes, name: str) -> Iterator[SegmentJob]:
    """A job of three pieces with its shared files, as the server sets it up."""
    plan = plan_segments(data, name, max_seconds=MAX_SECONDS, max_segments=3, min_segment_seconds=20)
    files = SharedFiles.create()
    assert plan is not None and files is not None
    try:
        Path(files.upload_path).write_bytes(data)
        yield SegmentJob(plan, files)
    finally:
        files.discard()


def test_pieces_that_could_not_be_written_to_shared_memory_travel_pickled(
    stereo_speech: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encode(stereo_speech, 44_100, "opus")
    with _job(data, "x.opus") as job:
        written = decode_piece(job, 0)

        def no_room(*_: object) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(transfer_module.os, "pwrite", no_room)
        pickled = [decode_piece(job, i) for i in range(1, job.plan.segments)]
        assert written.written and not any(piece.written for piece in pickled)
        decoded = assemble(job, [*pickled, written])
    reference = decode_audio(data, "x.opus", max_seconds=MAX_SECONDS)
    np.testing.assert_allclose(decoded.samples, reference.samples, rtol=0, atol=2e-6)


def test_pieces_that_do_not_fit_together_are_refused(stereo_speech: np.ndarray) -> None:
    data = encode(stereo_speech, 44_100, "flac")
    with _job(data, "x.flac") as job:
        pieces = [decode_piece(job, i) for i in range(job.plan.segments)]
        with pytest.raises(NotSplittable):
            assemble(job, pieces[:-1])
        short = PieceResult(pieces[0].segment, pieces[0].length - 1, pieces[0].written)
        with pytest.raises(NotSplittable):
            assemble(job, [short, *pieces[1:]])
        ended = PieceResult(
            DecodedSegment(0, pieces[0].segment.samples, pieces[0].segment.source_end, reached_end=True),
            pieces[0].length,
            pieces[0].written,
        )
        with pytest.raises(NotSplittable):
            assemble(job, [ended, *pieces[1:]])  # audio after the end of the stream


def test_a_16k_piece_needs_no_resampling() -> None:
    signal = speech_like(SECONDS, SAMPLE_RATE, seed=9)
    buffer = io.BytesIO()
    sf.write(buffer, signal, SAMPLE_RATE, format="FLAC")
    data = buffer.getvalue()
    plan, pieces = _pieces(data, "x.flac")
    joined, _ = _joined(plan, pieces)
    np.testing.assert_array_equal(joined, decode_audio(data, "x.flac", max_seconds=MAX_SECONDS).samples)
    assert segmented.rate_period(SAMPLE_RATE) == 1


def test_an_eight_channel_aac_file_splits_without_the_planar_crash() -> None:
    signal = speech_like(45, 48_000, channels=8, seed=10)
    data = encode_pyav(signal, 48_000, "ipod", "aac")
    reference = decode_audio(data, "x.m4a", max_seconds=MAX_SECONDS).samples
    plan, pieces = _pieces(data, "x.m4a")
    joined, _ = _joined(plan, pieces)
    assert plan.channels == 8 and joined.shape == reference.shape
    assert np.abs(joined - reference).max() < 5e-3


@pytest.mark.parametrize(("fmt", "rate"), [("wav", 44_100), ("aiff", 44_100), ("flac", 22_050), ("flac", 44_100)])
@pytest.mark.parametrize("share", [0.5, 0.97])
def test_a_cut_long_file_is_decoded_and_flagged_as_in_one_pass(
    stereo_speech: np.ndarray, fmt: str, rate: int, share: float
) -> None:
    """A long upload cut short (its header states more than is there) gets what one pass gives: the audio
    up to the cut, flagged truncated (X-Audio-Truncated). Found: a cut FLAC failed the request ('flac
    decoder lost sync' in a piece), and a cut WAV or AIFF decoded in pieces was not flagged."""
    signal = stereo_speech if rate == 44_100 else speech_like(SECONDS, rate, channels=2, seed=12)
    whole = encode(signal, rate, fmt)
    data = whole[: int(len(whole) * share)]
    reference = decode_audio(data, f"x.{fmt}", max_seconds=MAX_SECONDS)
    decoded, _ = _decode(data, f"x.{fmt}")
    assert reference.truncated and decoded.truncated
    assert decoded.duration_seconds == pytest.approx(reference.duration_seconds, abs=1e-9)
    np.testing.assert_array_equal(decoded.samples, reference.samples)
    assert not _decode(whole, f"x.{fmt}")[0].truncated


def test_pieces_that_end_before_the_stated_length_are_flagged_truncated(stereo_speech: np.ndarray) -> None:
    """A stream that reads to its end without an error but short of the frame count its header states
    (a FLAC cut at a frame boundary): the pieces are kept and the result flagged."""
    data = encode(stereo_speech, 44_100, "flac")
    with _job(data, "x.flac") as job:
        pieces = [decode_piece(job, i) for i in range(job.plan.segments)]
        assert job.plan.declared_end is not None and not assemble(job, pieces).truncated
        longer = SegmentJob(dataclasses.replace(job.plan, declared_end=job.plan.declared_end + 1), job.files)
        assert assemble(longer, pieces).truncated
