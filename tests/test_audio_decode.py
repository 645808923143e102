from __future__ import annotations

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenasr_appliance.audio import decode as decode_module
from qwenasr_appliance.audio.decode import (
    SUPPORTED_FORMATS,
    AudioError,
    AudioTooLongError,
    DecodedAudio,
    decode_audio,
    probe_duration,
)
from qwenasr_appliance.audio.ogg import ogg_links
from qwenasr_appliance.audio.samples import SAMPLE_RATE
from tests.audio_fixtures import (
    ALL_FORMATS,
    SAMPLES_DIR,
    encode,
    flac_with_total_samples,
    float_wav,
    mp3_without_xing,
    pcm16,
    silent_flac,
    sine,
    speech_like,
    wav_bytes,
    webm_without_duration,
)

ERROR_CODES = {"empty_file", "unsupported_format", "invalid_audio", "empty_audio", "audio_too_long", "decode_failed"}
SOUNDFILE_DECODED = {"wav", "flac", "aiff"}  # MP3 and Ogg go to FFmpeg (see decode.py)


@functools.cache
def stereo_clip(fmt: str, seconds: float = 3.0, rate: int = 44100) -> bytes:
    return encode(speech_like(seconds, rate, channels=2), rate, fmt)


@functools.cache
def three_hours_of_silence() -> bytes:
    return silent_flac(3 * 3600)


def decode(data: bytes, filename: str | None = None, max_seconds: float = 600.0) -> DecodedAudio:
    return decode_audio(data, filename, max_seconds=max_seconds)


def error_of(data: bytes, filename: str | None = None, max_seconds: float = 600.0) -> AudioError:
    with pytest.raises(AudioError) as caught:
        decode_audio(data, filename, max_seconds=max_seconds)
    assert caught.value.code in ERROR_CODES
    assert str(caught.value) == caught.value.message and caught.value.message.endswith(".")
    return caught.value


def rms(x: npt.NDArray[np.float32]) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def peak_frequency(x: npt.NDArray[np.float32], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
    return float(np.fft.rfftfreq(x.shape[0], 1 / rate)[int(np.argmax(spectrum))])


def assert_well_formed(decoded: DecodedAudio) -> None:
    samples = decoded.samples
    assert samples.dtype == np.float32 and samples.ndim == 1 and samples.flags.c_contiguous
    assert samples.shape[0] > 0 and np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    assert abs(samples.shape[0] - decoded.duration_seconds * SAMPLE_RATE) <= 2


# --------------------------------------------------------------------------- formats


def test_fixtures_cover_every_openai_format() -> None:
    assert SUPPORTED_FORMATS == ("flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm")
    assert set(SUPPORTED_FORMATS) <= set(ALL_FORMATS)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_every_format_decodes_to_16k_mono(fmt: str) -> None:
    decoded = decode(stereo_clip(fmt), f"upload.{fmt}")
    assert_well_formed(decoded)
    # AAC adds up to one frame of padding (1024 samples), MPEG-PS rounds to its packets.
    assert decoded.duration_seconds == pytest.approx(3.0, abs=0.05)
    assert decoded.source_channels == 2
    assert decoded.source_sample_rate == (48000 if fmt in ("opus", "webm") else 44100)
    assert decoded.decoder == ("soundfile" if fmt in SOUNDFILE_DECODED else "pyav")
    assert not decoded.truncated
    reference = speech_like(3.0, 44100, channels=2).mean(axis=1)
    assert rms(decoded.samples) == pytest.approx(rms(reference), rel=0.1)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_probe_duration_reads_headers(fmt: str) -> None:
    probed = probe_duration(stereo_clip(fmt), None)
    assert probed is not None
    # A bare ADTS stream has no length: FFmpeg estimates one from the bit rate.
    assert probed == pytest.approx(3.0, rel=0.2 if fmt == "aac" else 0.02)


def test_probe_duration_says_none_when_it_cannot_tell() -> None:
    assert probe_duration(b"", "a.wav") is None
    assert probe_duration(os.urandom(4000), "a.mp3") is None
    assert probe_duration(flac_with_total_samples(encode(sine(440, 1, 16000), 16000, "flac"), 0), None) is None
    assert probe_duration(webm_without_duration(sine(440, 1, 48000), 48000), "rec.webm") is None


@pytest.mark.parametrize(
    ("fmt", "filename"),
    [("m4a", "voice.wav"), ("wav", "voice.m4a"), ("mp3", "voice.wav"), ("flac", None), ("webm", "x")],
)
def test_filename_is_only_a_hint(fmt: str, filename: str | None) -> None:
    assert np.array_equal(decode(stereo_clip(fmt), filename).samples, decode(stereo_clip(fmt), f"a.{fmt}").samples)


def test_real_recordings_decode(samples_root: Path) -> None:
    expected = {
        "wcpp_jfk.wav": 11.0,
        "wcpp_jfk.mp3": 11.0,
        "ds_LDC93S1.wav": 2.92,
        "ds_ru.wav": 5.67,
        "sr_english.wav": 2.74,
        "sr_chinese.flac": 0.96,
        "sr_french.aiff": 2.53,
        "sb_spk1_snt1.wav": 2.87,
        "libri_198-209-0000.ogg": 13.91,
    }
    for name, seconds in expected.items():
        decoded = decode((samples_root / name).read_bytes(), name)
        assert_well_formed(decoded)
        assert decoded.duration_seconds == pytest.approx(seconds, abs=0.02), name
        assert rms(decoded.samples) > 0.003, name
        if name.endswith(".wav") and decoded.source_sample_rate == 16000:  # no resampling: bit-exact
            assert np.array_equal(decoded.samples, sf.read(samples_root / name, dtype="float32")[0])
    wav = decode((samples_root / "wcpp_jfk.wav").read_bytes()).samples
    mp3 = decode((samples_root / "wcpp_jfk.mp3").read_bytes()).samples
    assert wav.shape == mp3.shape == (176000,)  # gapless MP3: the same samples, not shifted
    assert np.corrcoef(wav, mp3)[0, 1] > 0.999


@pytest.fixture(scope="module")
def samples_root() -> Path:
    assert SAMPLES_DIR.is_dir(), f"the speech samples are missing at {SAMPLES_DIR}"
    return SAMPLES_DIR


# --------------------------------------------------------------------------- channels and resampling


def test_stereo_is_averaged_exactly() -> None:
    left, right = sine(440, 1.0, 16000, amplitude=0.6), sine(660, 1.0, 16000, amplitude=0.2)
    decoded = decode(float_wav(np.stack([left, right], axis=1), 16000))
    np.testing.assert_allclose(decoded.samples, (left + right) / 2, atol=1e-6)
    opposite = decode(float_wav(np.stack([left, -left], axis=1), 16000))
    assert np.abs(opposite.samples).max() < 1e-6


@pytest.mark.parametrize(
    ("bits", "format_tag", "dtype", "scale", "offset"),
    [
        (8, 1, np.uint8, 127, 128),
        (16, 1, np.int16, 32767, 0),
        (32, 1, np.int32, 2**31 - 1, 0),
        (64, 3, np.float64, 1, 0),
    ],
)
def test_both_decoders_read_pcm_identically(bits: int, format_tag: int, dtype: type, scale: int, offset: int) -> None:
    tone = sine(440, 1.0, 16000)
    stereo = np.stack([tone, tone * 0.5], axis=1)
    pcm = (np.round(stereo * scale) + offset).astype(dtype).tobytes()
    data = wav_bytes(pcm, sample_rate=16000, channels=2, bits=bits, format_tag=format_tag)
    by_ffmpeg = decode_module._decode_pyav(data, 60).samples
    by_libsndfile = decode_module._decode_soundfile(data, 60).samples
    assert np.array_equal(by_ffmpeg, by_libsndfile)
    np.testing.assert_allclose(by_libsndfile, tone * 0.75, atol=1.5 / scale)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mka"])
def test_eight_channels_are_averaged(fmt: str) -> None:
    gains = np.linspace(0.1, 0.8, 8, dtype=np.float32)
    tone = sine(1000, 1.0, 48000, amplitude=1.0)
    decoded = decode(encode(tone[:, None] * gains, 48000, fmt))
    assert decoded.source_channels == 8
    expected = tone * gains.mean()
    assert rms(decoded.samples) == pytest.approx(rms(expected), rel=0.01)


@pytest.mark.parametrize("fmt", ["m4a", "webm", "ogg"])
def test_lossy_multichannel_decodes(fmt: str) -> None:
    # 7.1 planar frames crash PyAV 18's to_ndarray(); decode.py must route around it.
    decoded = decode(encode(speech_like(1.0, 48000, channels=8), 48000, fmt))
    assert_well_formed(decoded)
    assert decoded.source_channels == 8
    assert decoded.duration_seconds == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000, 384000])
def test_resampling_keeps_frequency_and_level(rate: int) -> None:
    decoded = decode(float_wav(sine(1000, 2.0, rate), rate))
    assert decoded.samples.shape[0] == 32000
    assert peak_frequency(decoded.samples, SAMPLE_RATE) == pytest.approx(1000, abs=0.5)
    assert rms(decoded.samples[1000:-1000]) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)


def test_resampling_filters_what_16k_cannot_hold() -> None:
    kept = decode(float_wav(sine(7000, 1.0, 44100), 44100)).samples
    assert peak_frequency(kept, SAMPLE_RATE) == pytest.approx(7000, abs=1)
    # 9 kHz is above the new Nyquist frequency: it must vanish, not fold back to 7 kHz.
    removed = decode(float_wav(sine(9000, 1.0, 44100), 44100)).samples
    assert rms(removed[1000:-1000]) < 1e-3


def test_sample_rate_change_midstream() -> None:
    data = mp3_without_xing(speech_like(2.0, 44100), 44100, 128000) + mp3_without_xing(
        speech_like(2.0, 22050), 22050, 64000
    )
    decoded = decode(data, "joined.mp3")
    assert decoded.source_sample_rate == 44100
    assert decoded.duration_seconds == pytest.approx(4.0, abs=0.15)
    assert_well_formed(decoded)


# --------------------------------------------------------------------------- complete decoding


def test_mp3_with_underestimated_length_is_decoded_to_the_end() -> None:
    # No Xing header and a high bit rate first: the header suggests 15 s, the stream holds 60 s.
    # libsndfile stops at its estimate; the decoder must not.
    data = mp3_without_xing(speech_like(10.0, 44100), 44100, 320000) + mp3_without_xing(
        speech_like(50.0, 44100, seed=1), 44100, 32000
    )
    assert probe_duration(data, None) == pytest.approx(15.0, abs=1.0)
    for name in ("talk.mp3", "talk.wav", None):
        assert decode(data, name).duration_seconds == pytest.approx(60.0, abs=0.2)


def test_chained_ogg_is_decoded_to_the_end() -> None:
    data = encode(speech_like(4.0, 44100), 44100, "ogg") + encode(speech_like(2.0, 44100, seed=3), 44100, "ogg")
    assert decode(data).duration_seconds == pytest.approx(6.0, abs=0.05)


# --------------------------------------------------------------------------- limits


def test_long_header_is_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = three_hours_of_silence()
    assert len(bomb) < 1_000_000
    assert probe_duration(bomb, "bomb.flac") == pytest.approx(10800)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the header is over the limit")

    monkeypatch.setattr(decode_module._Pipeline, "push", no_decoding)
    with pytest.raises(AudioTooLongError) as caught:
        decode(bomb, max_seconds=7200)
    assert caught.value.code == "audio_too_long" and not caught.value.at_least
    assert caught.value.duration_seconds == pytest.approx(10800)
    assert "10800.0 seconds" in str(caught.value) and "7200" in str(caught.value)


def test_decompression_bomb_without_length_stops_at_the_limit() -> None:
    bomb = flac_with_total_samples(three_hours_of_silence(), 0)  # 3 hours, no length in the header
    assert probe_duration(bomb, None) is None
    with pytest.raises(AudioTooLongError) as caught:
        decode(bomb, max_seconds=60)
    assert caught.value.at_least
    assert 60 < caught.value.duration_seconds < 62  # stopped right after the limit


def test_live_webm_without_duration_stops_at_the_limit() -> None:
    data = webm_without_duration(np.zeros(48000 * 60, dtype=np.float32), 48000)
    with pytest.raises(AudioTooLongError) as caught:
        decode(data, "recording.webm", max_seconds=5)
    assert 5 < caught.value.duration_seconds < 6
    assert decode(data, "recording.webm", max_seconds=60).duration_seconds == pytest.approx(60, abs=0.05)


def test_wav_header_lying_about_its_size() -> None:
    pcm = pcm16(speech_like(3.0, 16000))
    claims_hours = wav_bytes(pcm, sample_rate=16000, declared_data_bytes=16000 * 2 * 3 * 3600)
    assert decode(claims_hours, max_seconds=60).duration_seconds == pytest.approx(3.0)
    claims_one_second = wav_bytes(pcm, sample_rate=16000, declared_data_bytes=16000 * 2)
    assert decode(claims_one_second, max_seconds=60).duration_seconds == pytest.approx(1.0)


def test_limit_boundaries() -> None:
    clip = stereo_clip("flac")
    assert decode(clip, max_seconds=3.0).duration_seconds == pytest.approx(3.0)
    assert decode(clip, max_seconds=math.inf).duration_seconds == pytest.approx(3.0)
    assert error_of(clip, max_seconds=2.0).code == "audio_too_long"
    assert error_of(stereo_clip("m4a"), max_seconds=1.0).code == "audio_too_long"
    with pytest.raises(ValueError, match="max_seconds"):
        decode(clip, max_seconds=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("filename", ["a.wav", "a.mp3", "a.m4a", "a.webm", "a.ogg", "a.flac", None])
def test_non_audio_is_unsupported(filename: str | None) -> None:
    for junk in (os.urandom(5000), b"<html><body>not audio</body></html>" * 50, b"\x00" * 4096):
        error = error_of(junk, filename)
        assert error.code == "unsupported_format"
        assert "flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm" in error.message


def test_empty_upload() -> None:
    assert error_of(b"", "a.wav").code == "empty_file"


def test_zero_length_audio() -> None:
    assert error_of(wav_bytes(b"", sample_rate=16000)).code == "empty_audio"
    for fmt in ("aiff", "ogg"):
        assert error_of(encode(np.zeros(0, dtype=np.float32), 16000, fmt)).code == "empty_audio"


@pytest.mark.parametrize("rate", [1, 999])
def test_absurdly_low_sample_rate(rate: int) -> None:
    error = error_of(wav_bytes(pcm16(sine(0.1, 1.0, 1000)), sample_rate=rate))
    assert error.code == "invalid_audio"
    assert f"sample rate of {rate} Hz" in error.message


def test_broken_headers_are_invalid_not_unsupported() -> None:
    assert error_of(wav_bytes(pcm16(sine(440, 0.1, 16000)), sample_rate=0)).code == "invalid_audio"
    flac = encode(speech_like(1.0, 16000), 16000, "flac")
    assert error_of(flac[:100]).code == "invalid_audio"
    m4a = stereo_clip("m4a")  # the index (moov) is at the end: half a file has none
    assert error_of(m4a[: len(m4a) // 2], "a.m4a").code == "invalid_audio"


@pytest.mark.parametrize(
    ("fmt", "seconds"), [("wav", 3), ("mp3", 3), ("webm", 3), ("mpeg", 3), ("flac", 20), ("ogg", 20)]
)
def test_truncated_files_decode_what_is_there(fmt: str, seconds: int) -> None:
    data = encode(speech_like(seconds, 16000), 16000, fmt)
    decoded = decode(data[: len(data) // 2])
    assert_well_formed(decoded)
    assert 0.3 * seconds < decoded.duration_seconds < 0.7 * seconds


@pytest.mark.parametrize("fmt", ["wav", "aiff", "flac"])
def test_a_cut_file_whose_header_states_its_length_is_flagged_truncated(fmt: str) -> None:
    """WAV and AIFF declare their sample data's size, FLAC its sample count: a cut file decodes as far as
    it goes (libsndfile and FFmpeg read it without an error) and is flagged, so the answer can say so
    (`X-Audio-Truncated`); the whole file is not."""
    data = encode(speech_like(4, 16000), 16000, fmt)
    assert not decode(data, f"a.{fmt}").truncated
    for share in (0.3, 0.6, 0.95):
        cut = decode(data[: int(len(data) * share)], f"a.{fmt}")
        assert cut.truncated, (fmt, share)
        assert cut.duration_seconds < 4 * share + 0.2


def test_nan_inf_and_overrange_samples_are_cleaned() -> None:
    signal = sine(440, 1.0, 16000)
    signal[1000:2000] = np.nan
    signal[3000] = np.inf
    signal[3001] = -np.inf
    signal[5000:6000] = 7.5
    decoded = decode(float_wav(signal, 16000))
    assert np.isfinite(decoded.samples).all()
    assert not decoded.samples[1000:2000].any() and decoded.samples[3000] == 0
    # Over-range samples scale the whole signal by their peak (qwen-asr's normalisation), not clipped.
    assert decoded.samples[5000:6000].min() == 1.0
    np.testing.assert_allclose(decoded.samples[:1000], signal[:1000] / 7.5, atol=1e-6)
    resampled = decode(float_wav(np.repeat(signal, 3), 48000)).samples  # NaN must not spread
    assert np.isfinite(resampled).all() and np.abs(resampled).max() <= 1.0
    assert rms(resampled[7000:9000]) > 0.3 / 7.5


def test_very_short_and_silent_audio_decode() -> None:
    assert decode(wav_bytes(pcm16(sine(440, 0.01, 16000)), sample_rate=16000)).samples.shape == (160,)
    short = decode(wav_bytes(pcm16(sine(440, 0.01, 44100)), sample_rate=44100)).samples
    assert abs(short.shape[0] - 160) <= 1
    silence = decode(encode(np.zeros(44100 * 2, dtype=np.float32), 44100, "flac"))
    assert silence.samples.shape == (32000,) and not silence.samples.any()


def test_upload_cannot_make_ffmpeg_open_other_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secret.wav").write_bytes(stereo_clip("wav"))
    monkeypatch.chdir(tmp_path)
    for playlist in (
        b"ffconcat version 1.0\nfile secret.wav\n",
        f"ffconcat version 1.0\nfile {tmp_path / 'secret.wav'}\n".encode(),
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\nsecret.wav\n#EXT-X-ENDLIST\n",
    ):
        assert error_of(playlist, "x.m3u8").code == "unsupported_format"


def test_decoded_audio_is_immutable() -> None:
    decoded = decode(stereo_clip("wav"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.duration_seconds = 1.0  # type: ignore[misc]


def test_out_of_memory_is_reported_as_audio_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(decode_module._Pipeline, "push", exhausted)
    assert error_of(stereo_clip("wav")).code == "decode_failed"


def test_unexpected_decoder_failure_is_an_audio_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(sf.SoundFile, "read", broken)
    monkeypatch.setattr(decode_module, "average_channels", broken)
    assert error_of(stereo_clip("wav")).code == "invalid_audio"


# --------------------------------------------------------------------------- threads and fuzzing


def test_concurrent_decoding_matches_sequential() -> None:
    jobs = [stereo_clip(fmt) for fmt in ALL_FORMATS] * 2
    sequential = [decode(job).samples for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda job: decode(job).samples, jobs))
    for one, other in zip(sequential, concurrent, strict=True):
        assert np.array_equal(one, other)


FUZZ_SEEDS = ("wav", "flac", "mp3", "ogg", "m4a", "webm", "mpeg", "aac")


@functools.cache
def fuzz_seed(fmt: str) -> bytes:
    return encode(speech_like(1.0, 16000, seed=7), 16000, fmt)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(FUZZ_SEEDS),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    cut=st.floats(0.05, 1.0),
)
def test_damaged_files_never_raise_anything_but_audio_error(
    fmt: str, flips: list[tuple[float, int]], cut: float
) -> None:
    data = bytearray(fuzz_seed(fmt))
    for position, value in flips:
        data[int(position * len(data))] = value
    damaged = bytes(data[: max(1, int(cut * len(data)))])
    probe_duration(damaged, f"x.{fmt}")
    try:
        decoded = decode(damaged, f"x.{fmt}", max_seconds=30)
    except AudioError as error:
        assert error.code in ERROR_CODES
    else:
        assert decoded.samples.dtype == np.float32 and np.isfinite(decoded.samples).all()
        assert np.abs(decoded.samples).max() <= 1.0


# --------------------------------------------------------------------------- chained Ogg (issue 12, K7)


def _ogg(rate: int, channels: int = 1, fmt: str = "ogg", seed: int = 1) -> bytes:
    signal = speech_like(1.0, rate, seed=seed)
    return encode(np.stack([signal] * channels, axis=1) if channels > 1 else signal, rate, fmt)


@pytest.mark.parametrize(
    "links",
    [
        [(16_000, 1, "ogg"), (16_000, 2, "ogg")],
        [(48_000, 1, "ogg"), (8_000, 1, "ogg")],
        [(16_000, 1, "ogg"), (16_000, 1, "opus"), (44_100, 2, "ogg")],
    ],
    ids=["mono-then-stereo", "48k-then-8k", "vorbis-opus-vorbis"],
)
def test_every_link_of_a_chained_ogg_is_decoded(links: list[tuple[int, int, str]]) -> None:
    data = b"".join(_ogg(rate, channels, fmt, seed=i) for i, (rate, channels, fmt) in enumerate(links))
    assert len(ogg_links(data)) == len(links)
    decoded = decode_audio(data, "chain.ogg", max_seconds=60)
    assert not decoded.truncated
    assert decoded.duration_seconds == pytest.approx(len(links), abs=0.05 * len(links))
    assert decoded.samples.shape[0] == pytest.approx(len(links) * SAMPLE_RATE, rel=0.05)


def test_a_chained_ogg_whose_next_link_breaks_off_says_so() -> None:
    data = _ogg(16_000) + b"OggS\x00\x02" + bytes(100)
    decoded = decode_audio(data, "chain.ogg", max_seconds=60)
    assert decoded.truncated
    assert decoded.duration_seconds == pytest.approx(1.0, abs=0.05)


def test_ogg_links_of_non_ogg_and_damaged_framing_are_the_whole_file() -> None:
    assert ogg_links(b"RIFF....") == [b"RIFF...."]
    one = _ogg(16_000)
    assert ogg_links(one) == [one]
    assert ogg_links(one + b"OggS\x01garbage") == [one + b"OggS\x01garbage"]
