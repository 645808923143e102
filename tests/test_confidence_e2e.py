"""Confidence over HTTP with the official `openai` SDK: `include[]=logprobs` (json and streamed),
verbose_json's avg_logprob / compression_ratio / no_speech_prob, and `X-Transcript-Truncated`.

The server is granian around the real app and the test double engine, scripted to write a transcript
whose last token hits the token limit (`finish_reason="length"`) and to give every token the
log-probability -0.25 (the end token, absent here, would be -0.05) and `no_speech_prob` 0.125.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.hardening import MODEL, metric_value, tone_wav
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

TOKENS = ["language English<asr_text>", "Hello", " world", " again", " and", " again."]
TEXT = "Hello world again and again."


@pytest.fixture(scope="module")
def truncating_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("confidence-server") / "server.log"
    env = {"DOUBLE_SCRIPT": json.dumps(TOKENS), "DOUBLE_FINISH_REASON": "length", "DECODE_WORKERS": "1"}
    server = ServerProcess.with_test_double(env, log)
    try:
        server.wait_until("/ready", timeout=60)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(truncating_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=truncating_server.url + "/v1", api_key="unused", max_retries=0)


def _check_logprobs(logprobs: list[openai.types.audio.transcription.Logprob] | None) -> None:
    assert logprobs is not None
    assert [item.token for item in logprobs] == TOKENS[1:]  # the header is not part of the transcript
    assert "".join(item.token or "" for item in logprobs) == TEXT
    for item in logprobs:
        assert item.logprob == pytest.approx(-0.25)
        assert item.bytes == list((item.token or "").encode("utf-8"))


def test_include_logprobs_with_json(client: openai.OpenAI) -> None:
    result = client.audio.transcriptions.create(
        model=MODEL, file=("a.wav", tone_wav(2.0)), response_format="json", include=["logprobs"]
    )
    assert result.text == TEXT
    _check_logprobs(result.logprobs)


def test_json_without_include_has_no_logprobs(client: openai.OpenAI) -> None:
    result = client.audio.transcriptions.create(model=MODEL, file=("a.wav", tone_wav(2.0)), response_format="json")
    assert result.text == TEXT and result.logprobs is None
    assert "logprobs" not in (result.model_extra or {})


def test_include_logprobs_with_stream(client: openai.OpenAI) -> None:
    stream = client.audio.transcriptions.create(
        model=MODEL, file=("a.wav", tone_wav(2.0)), response_format="json", include=["logprobs"], stream=True
    )
    deltas: list[str] = []
    done = None
    for event in stream:
        if event.type == "transcript.text.delta":
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event
    assert done is not None
    assert "".join(deltas) == done.text == TEXT
    _check_logprobs(done.logprobs)  # type: ignore[arg-type]


def test_include_logprobs_needs_json(truncating_server: ServerProcess) -> None:
    response = httpx.post(
        truncating_server.url + "/v1/audio/transcriptions",
        files={"file": ("a.wav", tone_wav(1.0), "audio/wav")},
        data={"model": MODEL, "response_format": "verbose_json", "include[]": "logprobs"},
        timeout=30,
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "include[]"


def test_verbose_json_carries_real_confidence_and_the_truncation(client: openai.OpenAI) -> None:
    verbose = client.audio.transcriptions.create(
        model=MODEL, file=("a.wav", tone_wav(2.0)), response_format="verbose_json", timestamp_granularities=["segment"]
    )
    [segment] = verbose.segments or []
    assert segment.text == TEXT
    assert segment.avg_logprob == pytest.approx(-0.25)  # no end token: generation hit the limit
    assert segment.no_speech_prob == pytest.approx(0.125)
    data = TEXT.encode()
    assert segment.compression_ratio == pytest.approx(len(data) / len(zlib.compress(data)), abs=1e-6)
    assert (segment.model_extra or {}).get("truncated") is True
    assert math.exp(segment.avg_logprob) < 1  # Pipecat's confidence is no longer 100%


def test_truncated_transcripts_are_flagged_and_counted(client: openai.OpenAI, truncating_server: ServerProcess) -> None:
    before = metric_value(httpx.get(truncating_server.url + "/metrics").text, "qwenasr_truncated_chunks_total")
    raw = client.audio.transcriptions.with_raw_response.create(model=MODEL, file=("a.wav", tone_wav(2.0)))
    assert raw.headers["X-Transcript-Truncated"] == "true"
    assert raw.parse().text == TEXT
    after = metric_value(httpx.get(truncating_server.url + "/metrics").text, "qwenasr_truncated_chunks_total")
    assert after == before + 1
    assert "transcription.chunk_truncated" in truncating_server.logs()


def test_a_transcript_that_ends_normally_is_not_flagged(double_server: ServerProcess) -> None:
    plain = openai.OpenAI(base_url=double_server.url + "/v1", api_key="unused", max_retries=0)
    raw = plain.audio.transcriptions.with_raw_response.create(model=MODEL, file=("a.wav", tone_wav(2.0)))
    assert "X-Transcript-Truncated" not in raw.headers
    verbose = plain.audio.transcriptions.create(
        model=MODEL, file=("a.wav", tone_wav(2.0)), response_format="verbose_json"
    )
    [segment] = verbose.segments or []
    assert "truncated" not in (segment.model_extra or {})
    # Four words at -0.25 and the end token at -0.05, averaged as Whisper does.
    assert segment.avg_logprob == pytest.approx((4 * -0.25 - 0.05) / 5)
