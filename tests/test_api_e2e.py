"""The HTTP surface end to end: the official OpenAI client against a real granian process on
127.0.0.1 serving the real app around the test double engine."""

from __future__ import annotations

import concurrent.futures
import io
import itertools
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "Qwen/Qwen3-ASR-1.7B"


def wav_bytes(
    seconds: float, rate: int = 16_000, channels: int = 1, silent_gaps: bool = False, fmt: str = "WAV"
) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    if silent_gaps:
        signal[(t % 20) > 19] = 0.0  # a second of silence every 20 s
    data = np.stack([signal] * channels, axis=1) if channels > 1 else signal
    out = io.BytesIO()
    subtype = "PCM_16" if fmt == "WAV" else None
    sf.write(out, data.astype(np.float32), rate, format=fmt, subtype=subtype)
    return out.getvalue()


@pytest.fixture(scope="module")
def client(double_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=double_server.url + "/v1", api_key="unused", max_retries=0)


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return dict(body["error"])


def post_form(url: str, files: dict[str, tuple[str, bytes, str]] | None, data: dict[str, object]) -> httpx.Response:
    return httpx.post(url + "/v1/audio/transcriptions", files=files, data=data, timeout=60)  # type: ignore[arg-type]


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("whisper-1")
    assert missing.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_transcription_json_with_real_speech(client: openai.OpenAI, samples_dir: Path) -> None:
    with (samples_dir / "ds_LDC93S1.wav").open("rb") as audio:
        result = client.audio.transcriptions.create(model=MODEL, file=audio)
    assert result.text == "chunk of 2.9 seconds"


def test_transcription_text_from_mp3(client: openai.OpenAI, samples_dir: Path) -> None:
    with (samples_dir / "wcpp_jfk.mp3").open("rb") as audio:
        text = client.audio.transcriptions.create(model=MODEL, file=audio, response_format="text")
    assert text.strip() == "chunk of 11.0 seconds"


def test_prompt_and_language_reach_the_engine(client: openai.OpenAI) -> None:
    result = client.audio.transcriptions.create(
        model=MODEL,
        file=("clip.wav", wav_bytes(2.0)),
        prompt="Kubernetes operators",
        language="de",
        response_format="verbose_json",
    )
    assert result.text == "chunk of 2.0 seconds context Kubernetes"
    assert result.language == "german"
    assert result.duration == pytest.approx(2.0)


def test_long_audio_is_split_and_merged_in_order(client: openai.OpenAI) -> None:
    result = client.audio.transcriptions.create(
        model=MODEL,
        file=("long.wav", wav_bytes(75.0, silent_gaps=True)),
        response_format="verbose_json",
        timestamp_granularities=["segment"],
    )
    segments = result.segments or []
    assert len(segments) == 4  # cut in the silent second before 20, 40 and 60 s (the search reaches 10 s back)
    # Segments bound the sound of their chunks: in order, apart, within the recording.
    assert segments[0].start >= 0.0
    for before, after in itertools.pairwise(segments):
        assert before.end <= after.start + 1e-3
    assert segments[-1].end <= 75.0 + 0.01
    assert all(0 < s.end - s.start <= 30.0 + 1e-6 for s in segments)
    assert result.text.count("chunk of") == 4


def test_subtitle_formats(double_server: ServerProcess) -> None:
    files = {"file": ("clip.wav", wav_bytes(3.0), "audio/wav")}
    srt = post_form(double_server.url, files, {"model": MODEL, "response_format": "srt"})
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("application/x-subrip")
    assert srt.text.startswith("1\n00:00:00,000 --> 00:00:03,000\nchunk of 3.0 seconds")
    vtt = post_form(double_server.url, files, {"model": MODEL, "response_format": "vtt"})
    assert vtt.status_code == 200 and vtt.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:03.000")


def test_streaming_with_the_sdk(client: openai.OpenAI) -> None:
    stream = client.audio.transcriptions.create(
        model=MODEL, file=("clip.wav", wav_bytes(4.0)), stream=True, response_format="json"
    )
    events = list(stream)
    types = [e.type for e in events]
    assert types[-1] == "transcript.text.done" and types.count("transcript.text.delta") >= 2
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas == events[-1].text == "chunk of 4.0 seconds"


@pytest.mark.parametrize(
    ("data", "status", "param", "code"),
    [
        ({"model": "whisper-1"}, 404, "model", "model_not_found"),
        ({"model": MODEL, "response_format": "xml"}, 400, "response_format", "invalid_value"),
        ({"model": MODEL, "temperature": "7"}, 400, "temperature", "invalid_value"),
        ({"model": MODEL, "temperature": "hot"}, 400, "temperature", "invalid_value"),
        ({"model": MODEL, "language": "klingon"}, 400, "language", "unsupported_language"),
        ({"model": MODEL, "timestamp_granularities[]": "word", "response_format": "verbose_json"}, 400,
         "timestamp_granularities[]", "word_timestamps_unavailable"),
        ({"model": MODEL, "timestamp_granularities[]": "segment"}, 400, "timestamp_granularities[]", "invalid_value"),
        ({"model": MODEL, "timestamp_granularities[]": "phoneme", "response_format": "verbose_json"}, 400,
         "timestamp_granularities[]", "invalid_value"),
        ({"model": MODEL, "stream": "perhaps"}, 400, "stream", "invalid_value"),
        ({"model": MODEL, "prompt": "x" * 5000}, 400, "prompt", "invalid_value"),
    ],
)  # fmt: skip
def test_bad_fields_get_openai_errors(
    double_server: ServerProcess, data: dict[str, object], status: int, param: str, code: str
) -> None:
    response = post_form(double_server.url, {"file": ("a.wav", wav_bytes(1.0), "audio/wav")}, data)
    assert response.status_code == status
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code)


@pytest.mark.parametrize(
    ("name", "payload", "status", "code"),
    [
        ("empty.wav", b"", 400, "empty_file"),
        ("noise.mp3", b"this is not audio at all" * 50, 400, "unsupported_format"),
    ],
)
def test_bad_audio_gets_openai_errors(
    double_server: ServerProcess, name: str, payload: bytes, status: int, code: str
) -> None:
    response = post_form(double_server.url, {"file": (name, payload, "audio/mpeg")}, {"model": MODEL})
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


def test_missing_file_and_wrong_content_type(double_server: ServerProcess) -> None:
    missing = httpx.post(double_server.url + "/v1/audio/transcriptions", files={"model": (None, MODEL)}, timeout=30)
    assert missing.status_code == 400
    assert error_of(missing)["param"] == "file"
    as_json = httpx.post(double_server.url + "/v1/audio/transcriptions", json={"model": MODEL}, timeout=30)
    assert as_json.status_code == 415
    error_of(as_json)


def test_upload_over_the_limit_is_413(double_server: ServerProcess) -> None:
    big = b"\0" * (26 * 1024 * 1024)
    response = post_form(double_server.url, {"file": ("big.wav", big, "audio/wav")}, {"model": MODEL})
    assert response.status_code == 413
    assert error_of(response)["code"] == "file_too_large"


def test_translations_are_refused_clearly(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.translations.create(model=MODEL, file=("a.wav", wav_bytes(1.0)))
    assert refused.value.body["code"] == "unsupported_operation"  # type: ignore[index]


def test_unknown_route_is_an_openai_error(double_server: ServerProcess) -> None:
    response = httpx.get(double_server.url + "/v1/nothing", timeout=10)
    assert response.status_code == 404
    error_of(response)


def test_ops_endpoints_tell_the_truth(double_server: ServerProcess) -> None:
    assert httpx.get(double_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(double_server.url + "/ready").json()["ready"] is True
    status = httpx.get(double_server.url + "/status").json()
    assert status["ready"] is True
    assert status["engine"]["state"] in {"ready", "degraded"}
    assert status["engine"]["attempts"][-1]["outcome"] == "ok"
    assert status["queue"]["max_concurrent_requests"] == 8
    assert status["version"]
    response = httpx.get(double_server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "qwenasr_http_requests_total",
        "qwenasr_real_time_factor_bucket",
        "qwenasr_audio_processed_seconds_total",
        'qwenasr_engine_state{state="',
    ):
        assert name in response.text
    schema = httpx.get(double_server.url + "/docs/openapi.json").json()
    assert "/v1/audio/transcriptions" in schema["paths"]


def test_request_ids_are_returned_and_kept(double_server: ServerProcess) -> None:
    generated = httpx.get(double_server.url + "/health")
    assert len(generated.headers["x-request-id"]) == 32
    kept = httpx.get(double_server.url + "/health", headers={"X-Request-ID": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    unsafe = httpx.get(double_server.url + "/health", headers={"X-Request-ID": "bad id\twith tabs"})
    assert unsafe.headers["x-request-id"] != "bad id\twith tabs"


def access_log_line(server: ServerProcess, request_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for raw in server.logs().splitlines():
            if request_id in raw and '"event": "request"' in raw:
                return dict(json.loads(raw))
        time.sleep(0.05)
    pytest.fail("no access log line for the request")


def test_access_log_is_json_with_audio_numbers(double_server: ServerProcess) -> None:
    response = post_form(double_server.url, {"file": ("a.wav", wav_bytes(2.5), "audio/wav")}, {"model": MODEL})
    line = access_log_line(double_server, response.headers["x-request-id"])
    assert line["status"] == 200 and line["audio_seconds"] == 2.5 and line["decode_pieces"] == 1
    assert float(line["rtf"]) > 0  # type: ignore[arg-type]


def test_a_long_mp3_is_decoded_in_pieces_and_transcribed_whole(double_server: ServerProcess) -> None:
    data = wav_bytes(75.0, rate=44_100, channels=2, silent_gaps=True, fmt="MP3")
    response = post_form(
        double_server.url,
        {"file": ("long.mp3", data, "audio/mpeg")},
        {"model": MODEL, "response_format": "verbose_json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["duration"] == pytest.approx(75.0, abs=0.05)
    segments = body["segments"]
    assert len(segments) == 3 and segments[-1]["end"] <= 75.0 + 0.05
    assert all(later["start"] >= earlier["end"] - 1e-3 for earlier, later in itertools.pairwise(segments))
    line = access_log_line(double_server, response.headers["x-request-id"])
    assert line["decode_pieces"] == 2  # DECODE_WORKERS=2


def test_client_disconnect_cancels_the_work(tmp_path: Path) -> None:
    server = ServerProcess.with_test_double({"DOUBLE_TOKEN_DELAY": "0.5"}, tmp_path / "server.log")
    try:
        server.wait_until("/ready")
        files = {"file": ("a.wav", wav_bytes(1.0), "audio/wav")}
        with pytest.raises(httpx.ReadTimeout):
            post_with_timeout = httpx.Client(timeout=httpx.Timeout(10, read=0.6))
            post_with_timeout.post(server.url + "/v1/audio/transcriptions", files=files, data={"model": MODEL})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = httpx.get(server.url + "/metrics").text
            if 'qwenasr_transcriptions_total{outcome="cancelled"} 1.0' in metrics:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server did not notice the client leaving")
        assert "transcription.client_disconnected" in server.logs()
    finally:
        server.stop()


def test_loading_answers_503_with_retry_after(tmp_path: Path) -> None:
    server = ServerProcess.with_test_double({"DOUBLE_LOAD_DELAY": "30"}, tmp_path / "server.log")
    try:
        server.wait_until_answering()
        ready = httpx.get(server.url + "/ready")
        assert ready.status_code == 503 and ready.json()["state"] in {"starting", "probing", "loading"}
        response = post_form(server.url, {"file": ("a.wav", wav_bytes(1.0), "audio/wav")}, {"model": MODEL})
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
        assert error_of(response)["code"] == "engine_unavailable"
    finally:
        assert server.stop() == 0


def test_burst_over_the_queue_gets_429_and_accepted_requests_finish(tmp_path: Path) -> None:
    env = {"DOUBLE_TOKEN_DELAY": "0.2", "MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "1"}
    server = ServerProcess.with_test_double(env, tmp_path / "server.log")
    try:
        server.wait_until("/ready")
        barrier = threading.Barrier(6)

        def send(_: int) -> httpx.Response:
            barrier.wait()
            return post_form(server.url, {"file": ("a.wav", wav_bytes(1.0), "audio/wav")}, {"model": MODEL})

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(send, range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1
        assert set(statuses) <= {200, 429}
        for rejected in (r for r in responses if r.status_code == 429):
            assert int(rejected.headers["retry-after"]) >= 1
            assert error_of(rejected)["type"] == "rate_limit_error"
    finally:
        server.stop()
