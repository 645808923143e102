"""SRT and VTT from a real server (granian around the test double engine) parse with real subtitle
parsers, pysrt and webvtt-py, through the official OpenAI client; also for a recording over one hour,
whose cue times must carry the hour (01:00:05,000) correctly.

The hour-long file is 8 kHz FLAC of digital silence with a few tone bursts: a few hundred kB, well
under MAX_UPLOAD_BYTES. The server cuts it into chunks at quiet points, drops the silent ones, and the
double transcribes each burst's chunk ("chunk of N seconds"), so each burst becomes one cue.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import openai
import pysrt
import pytest
import soundfile as sf
import webvtt

from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "Qwen/Qwen3-ASR-1.7B"
RATE = 8000
HOUR_SECONDS = 3720.0
BURSTS = ((5.0, 3.0), (1800.0, 4.0), (3605.0, 3.5), (3700.0, 2.0))  # (start, length) in seconds


def tone_bursts(total: float, bursts: tuple[tuple[float, float], ...], rate: int = RATE) -> np.ndarray:
    signal = np.zeros(int(total * rate), dtype=np.int16)
    for start, length in bursts:
        t = np.arange(int(length * rate)) / rate
        tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        begin = int(start * rate)
        signal[begin : begin + t.size] = (tone * 32767).astype(np.int16)
    return signal


def flac(signal: np.ndarray, rate: int = RATE) -> bytes:
    out = io.BytesIO()
    sf.write(out, signal, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture(scope="module")
def client(double_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=double_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hour_long() -> bytes:
    data = flac(tone_bursts(HOUR_SECONDS, BURSTS))
    assert len(data) < 2 * 1024 * 1024, len(data)  # far below the default MAX_UPLOAD_BYTES
    return data


def srt_cues(text: str) -> pysrt.SubRipFile:
    return pysrt.from_string(text, error_handling=pysrt.ERROR_RAISE)


def vtt_cues(text: str) -> list[webvtt.Caption]:
    return list(webvtt.from_string(text).captions)


def check_cues(starts: list[float], ends: list[float], duration: float) -> None:
    assert starts, "no cues"
    assert all(0.0 <= s < e <= duration + 1e-3 for s, e in zip(starts, ends, strict=True))
    assert all(e1 <= s2 for e1, s2 in zip(ends, starts[1:], strict=False)), "cues overlap or go backwards"


def test_srt_and_vtt_parse_and_agree_with_verbose_json(client: openai.OpenAI) -> None:
    audio = flac(tone_bursts(70.0, ((1.0, 20.0), (25.0, 40.0))), rate=16_000)
    srt = client.audio.transcriptions.create(model=MODEL, file=("a.flac", audio), response_format="srt")
    vtt = client.audio.transcriptions.create(model=MODEL, file=("a.flac", audio), response_format="vtt")
    verbose = client.audio.transcriptions.create(
        model=MODEL, file=("a.flac", audio), response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert isinstance(srt, str) and isinstance(vtt, str)
    subs, captions = srt_cues(srt), vtt_cues(vtt)
    segments = verbose.segments or []
    assert len(subs) == len(captions) > len(segments) >= 2  # cues are finer than chunks
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    texts: dict[int, list[str]] = {}
    for sub, caption in zip(subs, captions, strict=True):
        start, end = sub.start.ordinal / 1000, sub.end.ordinal / 1000
        assert (caption.start_in_seconds, caption.end_in_seconds) == (int(start), int(end))
        assert sub.text == caption.text
        # Every cue lies inside one segment (cues break at chunk boundaries) and shows its words in order.
        owner = next(i for i, seg in enumerate(segments) if seg.start - 1e-3 <= start and end <= seg.end + 1e-3)
        texts.setdefault(owner, []).append(" ".join(sub.text.split()))
        assert end - start <= 7.0 + 1e-3 and all(len(line) <= 42 for line in sub.text.splitlines())
    assert {i: " ".join(parts) for i, parts in texts.items()} == {i: s.text.strip() for i, s in enumerate(segments)}
    check_cues([s.start.ordinal / 1000 for s in subs], [s.end.ordinal / 1000 for s in subs], verbose.duration)


def test_cues_past_one_hour(client: openai.OpenAI, hour_long: bytes) -> None:
    srt = client.audio.transcriptions.create(model=MODEL, file=("hour.flac", hour_long), response_format="srt")
    vtt = client.audio.transcriptions.create(model=MODEL, file=("hour.flac", hour_long), response_format="vtt")
    subs, captions = srt_cues(str(srt)), vtt_cues(str(vtt))
    assert len(subs) == len(captions) == len(BURSTS), srt
    starts = [s.start.ordinal / 1000 for s in subs]
    check_cues(starts, [s.end.ordinal / 1000 for s in subs], HOUR_SECONDS)
    for (burst_start, burst_length), start, sub, caption in zip(BURSTS, starts, subs, captions, strict=True):
        # Each burst is one short chunk text, so one cue, timed by the sound in its chunk: the burst.
        assert start == pytest.approx(burst_start, abs=0.05)
        assert sub.end.ordinal / 1000 == pytest.approx(burst_start + burst_length, abs=0.05)
        assert caption.start == str(sub.start).replace(",", ".")
        assert caption.end == str(sub.end).replace(",", ".")
    late = [s for s in subs if s.start.hours >= 1]
    assert len(late) == 2 and str(late[0].start).startswith("01:0")
    assert captions[-1].start.startswith("01:0") and captions[-1].end_in_seconds <= HOUR_SECONDS


def test_word_timestamps_without_an_aligner_say_how_to_enable_them(double_server: ServerProcess) -> None:
    response = httpx.post(
        double_server.url + "/v1/audio/transcriptions",
        files={"file": ("a.flac", flac(tone_bursts(2.0, ((0.0, 2.0),))), "audio/flac")},
        data={"model": MODEL, "response_format": "verbose_json", "timestamp_granularities[]": "word"},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "word_timestamps_unavailable" and "ALIGNER_MODEL_ID" in error["message"]
    assert httpx.get(double_server.url + "/status").json()["aligner"]["state"] == "disabled"
