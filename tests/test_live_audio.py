"""Live audio input: G.711 expansion, PCM split across appends, streaming resampling to 16 kHz, the VAD
and server-VAD turn detection on real speech."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import soxr

from qwenasr_appliance.audio.live_formats import ALAW_TO_PCM16, MULAW_TO_PCM16, LiveAudioDecoder, to_pcm16
from qwenasr_appliance.audio.samples import SAMPLE_RATE
from qwenasr_appliance.audio.vad import FRAME_SAMPLES, FrameVAD, aggressiveness, energy_floor_dbfs
from qwenasr_appliance.transcription.live.turns import SpeechEnd, SpeechStart, TurnDetector
from tests.realtime_support import pcm16, silence, speech


def encode_g711(samples: np.ndarray, audio_format: str) -> bytes:
    """The nearest G.711 code of each sample (an encoder for tests, independent of the decoder's rules)."""
    table = (MULAW_TO_PCM16 if audio_format == "audio/pcmu" else ALAW_TO_PCM16).astype(np.int32)
    linear = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int32)
    return np.abs(linear[:, None] - table[None, :]).argmin(axis=1).astype(np.uint8).tobytes()


def test_g711_tables_follow_the_standard() -> None:
    # ITU-T G.711 reference points: mu-law 0xFF/0x7F are zero, 0x80/0x00 the extremes (+-32124);
    # A-law codes are stored with even bits inverted: 0xD5/0x55 are +-8, 0xAA/0x2A the extremes (+-32256).
    assert MULAW_TO_PCM16[0xFF] == 0 and MULAW_TO_PCM16[0x7F] == 0
    assert MULAW_TO_PCM16[0x80] == 32124 and MULAW_TO_PCM16[0x00] == -32124
    assert ALAW_TO_PCM16[0xD5] == 8 and ALAW_TO_PCM16[0x55] == -8
    assert ALAW_TO_PCM16[0xAA] == 32256 and ALAW_TO_PCM16[0x2A] == -32256
    # Symmetric, monotonic within each sign: 255 distinct levels for mu-law (two zeros), 256 for A-law.
    assert len(set(MULAW_TO_PCM16.tolist())) == 255 and len(set(ALAW_TO_PCM16.tolist())) == 256
    assert sorted(MULAW_TO_PCM16.tolist()) == sorted((-MULAW_TO_PCM16).tolist())
    assert sorted(ALAW_TO_PCM16.tolist()) == sorted((-ALAW_TO_PCM16).tolist())


def test_g711_tables_equal_audioop_where_it_exists() -> None:
    audioop = pytest.importorskip("audioop", reason="audioop was removed in Python 3.13")
    codes = bytes(range(256))
    assert (np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2") == MULAW_TO_PCM16).all()
    assert (np.frombuffer(audioop.alaw2lin(codes, 2), "<i2") == ALAW_TO_PCM16).all()


@pytest.mark.parametrize("audio_format", ["audio/pcmu", "audio/pcma"])
def test_g711_round_trip_keeps_speech(audio_format: str) -> None:
    samples = speech(rate=8_000)
    decoded = to_pcm16(encode_g711(samples, audio_format), audio_format).astype(np.float32) / 32768.0  # type: ignore[arg-type]
    noise = decoded - samples
    snr = 10 * np.log10(np.mean(samples**2) / np.mean(noise**2))
    assert snr > 30  # G.711 gives about 38 dB on speech


def test_pcm_split_anywhere_decodes_like_one_piece() -> None:
    data = pcm16(speech()[: 24_000 * 2])
    whole = LiveAudioDecoder("audio/pcm")
    expected = np.concatenate([whole.decode(data), whole.flush()])
    pieces = LiveAudioDecoder("audio/pcm")
    cuts = [0, 1, 4_801, 9_000, 9_001, 33_333, len(data)]  # odd cuts split samples between appends
    parts = [pieces.decode(data[a:b]) for a, b in itertools.pairwise(cuts)]
    got = np.concatenate([*parts, pieces.flush()])
    assert pieces.input_samples == len(data) // 2
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # 24 kHz -> 16 kHz: two thirds of the samples, and the same signal soxr makes in one pass.
    assert len(got) == pytest.approx(len(data) // 2 * 2 / 3, abs=2)
    one_pass = soxr.resample(np.frombuffer(data, "<i2").astype(np.float32) / 32768.0, 24_000, SAMPLE_RATE, "HQ")
    np.testing.assert_allclose(got[: len(one_pass)], one_pass[: len(got)], atol=1e-4)


def test_vad_threshold_mapping() -> None:
    assert [aggressiveness(t) for t in (0.0, 0.24, 0.25, 0.5, 0.74, 0.75, 1.0)] == [0, 0, 1, 2, 2, 3, 3]
    assert energy_floor_dbfs(0.0) == -70 and energy_floor_dbfs(0.5) == -50 and energy_floor_dbfs(1.0) == -30


def test_vad_hears_speech_and_not_silence_or_quiet_noise() -> None:
    voice = speech(rate=SAMPLE_RATE)
    vad = FrameVAD(0.5)
    decisions = vad.frames(voice[:1000]) + vad.frames(voice[1000:])  # any piece sizes
    assert len(decisions) == len(voice) // FRAME_SAMPLES
    assert 0.4 < sum(decisions) / len(decisions) <= 1.0  # JFK's speech, with its pauses
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(SAMPLE_RATE * 2) * 10 ** (-60 / 20)).astype(np.float32)  # -60 dBFS hiss
    assert not any(FrameVAD(0.5).frames(quiet))
    assert not any(FrameVAD(0.0).frames(np.zeros(SAMPLE_RATE, dtype=np.float32)))
    # A higher threshold needs louder audio: speech at -45 dBFS passes 0.3 but not 0.9.
    soft = (voice / np.sqrt(np.mean(voice**2)) * 10 ** (-45 / 20)).astype(np.float32)
    assert sum(FrameVAD(0.3).frames(soft)) > sum(FrameVAD(0.9).frames(soft)) == 0


def test_turn_detector_finds_two_utterances() -> None:
    first, second = speech("sb_spk1_snt1.wav", SAMPLE_RATE), speech("ds_LDC93S1.wav", SAMPLE_RATE)
    gap = silence(1.5, SAMPLE_RATE)
    audio = np.concatenate([silence(0.5, SAMPLE_RATE), first, gap, second, gap])
    detector = TurnDetector(0.5, prefix_padding_ms=300, silence_duration_ms=500)
    events = [e for start in range(0, len(audio), 1600) for e in detector.push(audio[start : start + 1600])]
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechEnd, SpeechStart, SpeechEnd]
    starts = [e for e in events if isinstance(e, SpeechStart)]
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    second_at = 8_000 + len(first) + len(gap)
    assert 8_000 <= starts[0].speech_start < 8_000 + SAMPLE_RATE
    assert starts[0].turn_start == starts[0].speech_start - 4_800  # 300 ms of padding
    assert 8_000 + len(first) - SAMPLE_RATE < ends[0].turn_end <= 8_000 + len(first) + 8_000 + FRAME_SAMPLES
    assert (
        ends[0].turn_end <= starts[1].turn_start
        and second_at - 8_000 <= starts[1].speech_start < second_at + SAMPLE_RATE
    )
    assert ends[1].turn_end <= len(audio)


def test_turn_detector_silence_duration_and_reset() -> None:
    voice = speech(rate=SAMPLE_RATE)
    long_wait = TurnDetector(0.5, prefix_padding_ms=0, silence_duration_ms=3_000)
    short_wait = TurnDetector(0.5, prefix_padding_ms=0, silence_duration_ms=200)
    ends_long = [e for e in long_wait.push(voice) if isinstance(e, SpeechEnd)]
    ends_short = [e for e in short_wait.push(voice) if isinstance(e, SpeechEnd)]
    assert len(ends_short) > len(ends_long)  # JFK's pauses end turns only under the short rule
    detector = TurnDetector(0.5, prefix_padding_ms=300, silence_duration_ms=500)
    assert detector.push(voice[:SAMPLE_RATE]) and detector.speaking
    detector.reset(SAMPLE_RATE)
    assert not detector.speaking
