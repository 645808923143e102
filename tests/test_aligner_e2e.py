"""Word timestamps end to end: `qwenasr-appliance serve` with the CPU engine on the tiny Qwen3-ASR
checkpoint and the forced aligner on the tiny Qwen3-ForcedAligner checkpoint (both loaded through the
real qwen-asr code), driven by the official OpenAI client in every response format.

Random weights: the words are noise and their times come from an untrained classifier (they jump
around and past the audio's end), so the test checks what the appliance guarantees: every word lies
inside the audio, starts and ends never go backwards, and each chunk's words fall in that chunk.
A second server whose aligner cannot load shows that transcription goes on and only word timestamps
answer 503 with the reason.
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pysrt
import pytest
import soundfile as sf
import webvtt

from tests.audio_fixtures import float_wav, sine
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "qwen3-asr-tiny"
TIMEOUT = float(os.environ.get("TINY_SERVER_TIMEOUT", "240"))


def tiny_env(model_dir: Path, aligner: str) -> dict[str, str]:
    return {
        "MODEL_ID": str(model_dir),
        "SERVED_MODEL_NAME": MODEL,
        "ENGINE": "cpu",
        "CPU_THREADS": "1",
        "MAX_NEW_TOKENS": "12",
        "ALIGNER_MODEL_ID": aligner,
        "LOG_LEVEL": "info",
    }


def wait_for_aligner(server: ServerProcess, state: str) -> dict[str, object]:
    server.wait_until("/ready", timeout=TIMEOUT)
    for _ in range(int(TIMEOUT * 5)):
        aligner: dict[str, object] = httpx.get(server.url + "/status", timeout=5).json()["aligner"]
        if aligner["state"] == state:
            return aligner
        if aligner["state"] in ("failed", "ready"):
            raise AssertionError(f"aligner {aligner} instead of {state}:\n{server.logs()[-3000:]}")
        server.wait_until_answering(timeout=1)
    raise AssertionError(f"the aligner never became {state}")


@pytest.fixture(scope="module")
def aligner_server(
    tiny_model_dir: Path, tiny_aligner_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("aligner-server") / "server.log"
    server = ServerProcess.appliance(tiny_env(tiny_model_dir, str(tiny_aligner_dir)), log)
    try:
        wait_for_aligner(server, "ready")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(aligner_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=aligner_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def long_recording(samples_dir: Path, seconds: float = 70.0) -> bytes:
    """Real speech repeated with short pauses to `seconds`: the server cuts it into three chunks."""
    speech, rate = sf.read(samples_dir / "wcpp_jfk.wav", dtype="float32", always_2d=False)
    pause = np.zeros(int(0.6 * rate), dtype=np.float32)
    pieces, total = [], 0
    while total < seconds * rate:
        pieces += [speech, pause]
        total += speech.size + pause.size
    out = io.BytesIO()
    sf.write(out, np.concatenate(pieces)[: int(seconds * rate)], rate, format="FLAC")
    return out.getvalue()


def test_status_shows_the_aligner(aligner_server: ServerProcess, tiny_aligner_dir: Path) -> None:
    status = httpx.get(aligner_server.url + "/status").json()
    assert status["ready"] is True and status["engine"]["plan"] == "cpu-float32"
    aligner = status["aligner"]
    assert aligner["state"] == "ready" and aligner["ready"] is True and aligner["error"] is None
    assert aligner["model"] == str(tiny_aligner_dir) and aligner["plan"] == "aligner-cpu-float32"
    assert aligner["device"] == "cpu" and aligner["details"]["timestamp_segment_ms"] == 80.0


def test_word_and_segment_timestamps(client: openai.OpenAI, samples_dir: Path) -> None:
    with (samples_dir / "wcpp_jfk.wav").open("rb") as audio:
        verbose = client.audio.transcriptions.create(
            model=MODEL,
            file=audio,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",  # random weights detect any language, and the aligner supports only 11
        )
    assert verbose.duration == pytest.approx(11.0, abs=0.1)
    words = verbose.words or []
    assert words, f"no words for {verbose.text!r}"
    assert all(0.0 <= w.start <= w.end <= verbose.duration for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(words))
    # The words are the transcript's letters and digits, in order (the aligner drops punctuation).
    letters = "".join(ch for ch in verbose.text if ch.isalnum() or ch == "'")
    assert "".join(w.word for w in words) == letters
    assert verbose.segments and 0.0 <= verbose.segments[0].start <= 1.0  # the sound starts at once


def test_words_of_a_long_recording_stay_in_their_chunks(client: openai.OpenAI, samples_dir: Path) -> None:
    verbose = client.audio.transcriptions.create(
        model=MODEL,
        file=("long.flac", long_recording(samples_dir)),
        response_format="verbose_json",
        timestamp_granularities=["word"],
        language="en",
    )
    segments, words = verbose.segments or [], verbose.words or []
    assert len(segments) >= 3 and words
    assert all(0.0 <= w.start <= w.end <= verbose.duration for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(words))
    assert max(w.start for w in words) >= segments[1].start  # later chunks are aligned and offset too
    # The chunk cuts lie in the pauses between the segments (which bound each chunk's sound).
    cuts = [0.0, *((a.end + b.start) / 2 for a, b in itertools.pairwise(segments)), verbose.duration + 1]
    for segment, low, high in zip(segments, cuts, cuts[1:], strict=False):
        inside = [w for w in words if low <= w.start < high]
        units = "".join(ch for ch in segment.text if ch.isalnum() or ch == "'")
        assert "".join(w.word for w in inside).startswith(units) or not units


def test_every_format_with_the_aligner_loaded(client: openai.OpenAI, samples_dir: Path) -> None:
    audio = (samples_dir / "sr_english.wav").read_bytes()
    text = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format="text")
    assert isinstance(text, str) and text.strip()
    as_json = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format="json")
    assert as_json.text.strip()
    srt = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format="srt", language="en")
    subs = pysrt.from_string(str(srt), error_handling=pysrt.ERROR_RAISE)
    vtt = client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio), response_format="vtt", language="en")
    captions = webvtt.from_string(str(vtt)).captions
    assert len(subs) == len(captions) >= 1
    assert captions[0].start == str(subs[0].start).replace(",", ".")
    words = client.audio.transcriptions.create(
        model=MODEL,
        file=("a.wav", audio),
        response_format="verbose_json",
        timestamp_granularities=["word"],
        language="en",
    ).words
    # With the aligner loaded, cue times are word times.
    assert words and subs[0].start.ordinal == pytest.approx(words[0].start * 1000, abs=2)
    segments_only = client.audio.transcriptions.create(
        model=MODEL, file=("a.wav", audio), response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert segments_only.words is None and segments_only.segments
    with pytest.raises(openai.BadRequestError, match="verbose_json"):
        client.audio.transcriptions.create(
            model=MODEL, file=("a.wav", audio), response_format="json", timestamp_granularities=["word"]
        )


def test_a_failed_aligner_leaves_transcription_serving(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, samples_dir: Path
) -> None:
    log = tmp_path_factory.mktemp("broken-aligner") / "server.log"
    server = ServerProcess.appliance(tiny_env(tiny_model_dir, "/nonexistent/Qwen3-ForcedAligner"), log)
    try:
        aligner = wait_for_aligner(server, "failed")
        assert "does not exist" in str(aligner["error"]) and aligner["ready"] is False
        assert httpx.get(server.url + "/ready").status_code == 200
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        audio = (samples_dir / "ds_LDC93S1.wav").read_bytes()
        assert client.audio.transcriptions.create(model=MODEL, file=("a.wav", audio)).text.strip()
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.audio.transcriptions.create(
                model=MODEL, file=("a.wav", audio), response_format="verbose_json", timestamp_granularities=["word"]
            )
        response = unavailable.value.response
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
        error = response.json()["error"]
        assert error["code"] == "aligner_unavailable" and "/nonexistent/Qwen3-ForcedAligner" in error["message"]
    finally:
        server.stop()


def test_word_timestamps_for_a_forced_language_the_aligner_lacks_are_refused(aligner_server: ServerProcess) -> None:
    for language in ("th", "Vietnamese", "ar"):
        response = httpx.post(
            aligner_server.url + "/v1/audio/transcriptions",
            files={"file": ("a.wav", float_wav(sine(440, 1.0, 16_000), 16_000), "audio/wav")},
            data={
                "model": MODEL,
                "response_format": "verbose_json",
                "timestamp_granularities[]": "word",
                "language": language,
            },
            timeout=30,
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "word_timestamps_unsupported_language" and error["param"] == "language"
        assert "English" in error["message"] and "segment" in error["message"]
