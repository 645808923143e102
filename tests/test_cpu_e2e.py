"""The product's real CPU path end to end: `qwenasr-appliance serve` with ENGINE=cpu loads the tiny
Qwen3-ASR checkpoint through qwen-asr, and the official OpenAI client transcribes real speech."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "qwen3-asr-tiny"


@pytest.fixture(scope="module")
def client(tiny_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)


def test_status_reports_the_cpu_plan(tiny_server: ServerProcess, tiny_model_dir: Path) -> None:
    status = httpx.get(tiny_server.url + "/status").json()
    assert status["ready"] is True
    engine = status["engine"]
    assert engine["state"] == "ready" and engine["plan"] == "cpu-float32"
    assert engine["engine"]["name"] == "cpu" and engine["engine"]["device"] == "cpu"
    assert engine["attempts"][-1]["outcome"] == "ok"
    assert status["model"] == str(tiny_model_dir) and status["served_model_name"] == MODEL
    assert status["queue"]["max_concurrent_requests"] == 1
    metrics = httpx.get(tiny_server.url + "/metrics").text
    assert 'qwenasr_engine_state{state="ready"} 1.0' in metrics
    assert (
        'qwenasr_engine_plan_info{dtype="float32",engine="cpu",plan="cpu-float32",quantization="none"} 1.0' in metrics
    )


@pytest.mark.parametrize("sample", ["wcpp_jfk.wav", "wcpp_jfk.mp3", "sr_chinese.flac", "libri_198-209-0000.ogg"])
def test_real_speech_through_the_real_model(client: openai.OpenAI, samples_dir: Path, sample: str) -> None:
    with (samples_dir / sample).open("rb") as audio:
        result = client.audio.transcriptions.create(model=MODEL, file=audio)
    # Random weights: the words are noise, but they come from the model (printable, bounded by MAX_NEW_TOKENS).
    assert isinstance(result.text, str) and result.text.strip()
    assert result.text.isprintable()


def test_text_format_language_and_prompt(client: openai.OpenAI, samples_dir: Path) -> None:
    with (samples_dir / "ds_LDC93S1.wav").open("rb") as audio:
        text = client.audio.transcriptions.create(
            model=MODEL, file=audio, response_format="text", language="en", prompt="dark suit, greasy wash water"
        )
    assert text.strip()
    with (samples_dir / "ds_LDC93S1.wav").open("rb") as audio:
        verbose = client.audio.transcriptions.create(
            model=MODEL, file=audio, response_format="verbose_json", language="English"
        )
    assert verbose.language == "english"
    assert verbose.duration == pytest.approx(2.92, abs=0.01)
    # The segment bounds the sound in the clip (2.92 s, speech nearly all through).
    assert verbose.segments and 0.0 <= verbose.segments[0].start < verbose.segments[0].end <= verbose.duration + 0.01
    assert verbose.segments[0].end - verbose.segments[0].start >= 2.0


def test_streaming_from_the_real_engine(client: openai.OpenAI, samples_dir: Path) -> None:
    with (samples_dir / "sb_spk1_snt1.wav").open("rb") as audio:
        events = list(client.audio.transcriptions.create(model=MODEL, file=audio, stream=True, language="en"))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2, "the CPU engine streams token by token"
    assert events[-1].type == "transcript.text.done" and "".join(deltas) == events[-1].text


def test_errors_with_the_real_engine(tiny_server: ServerProcess) -> None:
    response = httpx.post(
        tiny_server.url + "/v1/audio/transcriptions",
        files={"file": ("x.wav", b"RIFF\x00\x00\x00\x00WAVEfmt ", "audio/wav")},
        data={"model": MODEL},
        timeout=30,
    )
    assert response.status_code in (400, 415)
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(tiny_server.url + "/ready").status_code == 200


CONTROL = re.compile(r"<\|[^|<>\s]*\|>|</?asr_text>|<asr_|\blanguage (?:English|Chinese|None)\b")


@pytest.mark.parametrize("language", [None, "en"])
@pytest.mark.parametrize("sample", ["sb_spk1_snt1.wav", "ds_LDC93S1.wav", "wcpp_jfk.wav", "sr_chinese.flac"])
def test_streamed_text_is_the_transcript_and_no_control_token_gets_out(
    client: openai.OpenAI, samples_dir: Path, sample: str, language: str | None
) -> None:
    """Greedy decoding of the same audio: the joined deltas are `done.text`, which is the non-streamed
    transcript; no format ever shows a control token (random weights write them freely)."""
    audio = (samples_dir / sample).read_bytes()
    extra: dict[str, Any] = {"language": language} if language else {}
    events = list(client.audio.transcriptions.create(model=MODEL, file=(sample, audio), stream=True, **extra))
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    done = events[-1]
    assert done.type == "transcript.text.done" and deltas == done.text
    whole = client.audio.transcriptions.create(model=MODEL, file=(sample, audio), **extra)
    assert whole.text == done.text
    outputs = [whole.text, done.text]
    for response_format in ("text", "srt", "vtt", "verbose_json"):
        rendered = client.audio.transcriptions.create(
            model=MODEL, file=(sample, audio), response_format=response_format, **extra
        )
        outputs.append(rendered if isinstance(rendered, str) else rendered.model_dump_json())
    for output in outputs:
        assert CONTROL.search(output) is None, output
