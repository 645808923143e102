"""Real clients against a real server process (granian, the real app, the test double engine): the
official Node SDK (`openai` from npm, on the Node Debian ships), LiteLLM's `transcription()` and
LangChain's `OpenAIWhisperParser`, each in json, text, srt, vtt, verbose_json with segments, streaming
where the client can, and an error. (The official Python SDK is driven by test_api_e2e.py.)

Versions are pinned: the Python clients in pyproject's `test` extra, the npm package here. Nothing but
127.0.0.1 is reached: the Python clients run with every other connection refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.servers import REPO, ServerProcess

pytestmark = pytest.mark.slow

# The newest `openai` on npm that runs on Debian's Node 20 (7.x needs Node 22).
NODE_OPENAI_VERSION = "6.30.1"
NODE_MODULES = REPO / ".tools" / "node-clients"  # git-ignored; installed on first use
NODE_SCRIPT = REPO / "tests" / "clients" / "openai_node.cjs"
WAV = REPO / "tests" / "fixtures" / "samples" / "ds_LDC93S1.wav"
SERVED = "qwen3-asr,whisper-1"  # clients that hard-code whisper-1 (LangChain's default) work as configured
TEXT = "chunk of 2.9 seconds"  # what the test double answers for this clip
UNREACHABLE = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ECONNRESET|ENETUNREACH|network", re.I)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("client-matrix")
    env = {"MODEL_ID": "/models/Qwen3-ASR-1.7B", "SERVED_MODEL_NAME": SERVED, "DECODE_WORKERS": "1"}
    process = ServerProcess.with_test_double(env, folder / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def loopback_only() -> Iterator[None]:
    with servers.loopback_only():
        yield


# -- the official Node SDK ------------------------------------------------------------------------


def _node_sdk() -> Path:
    """`openai` from npm installed into the git-ignored .tools/ (once per version)."""
    installed = NODE_MODULES / "node_modules" / "openai" / "package.json"
    if installed.is_file() and json.loads(installed.read_text())["version"] == NODE_OPENAI_VERSION:
        return NODE_MODULES
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.fail("node and npm are needed for the Node SDK tests (Debian: apt-get install nodejs npm)")
    NODE_MODULES.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "install", "--prefix", str(NODE_MODULES), "--no-audit", "--no-fund", f"openai@{NODE_OPENAI_VERSION}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        if UNREACHABLE.search(result.stderr):
            pytest.skip(f"the npm registry is unreachable, so the Node SDK cannot be installed: {result.stderr[-300:]}")
        pytest.fail(f"npm install openai@{NODE_OPENAI_VERSION} failed:\n{result.stderr[-2000:]}")
    return NODE_MODULES


@pytest.fixture(scope="module")
def node_results(server: ServerProcess) -> dict[str, Any]:
    modules = _node_sdk()
    result = subprocess.run(
        ["node", str(NODE_SCRIPT), server.url + "/v1", "whisper-1", str(WAV)],
        env={"PATH": os.environ["PATH"], "CLIENT_MODULES": str(modules)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results: dict[str, Any] = json.loads(result.stdout)
    assert results["sdk_version"] == NODE_OPENAI_VERSION
    return results


def test_node_sdk_json_text_srt_vtt(node_results: dict[str, Any]) -> None:
    assert node_results["json"]["text"] == TEXT
    assert node_results["text"] == TEXT + "\n"
    assert node_results["srt"] == f"1\n00:00:00,200 --> 00:00:02,800\n{TEXT}\n"
    assert node_results["vtt"].startswith("WEBVTT\n\n00:00:00.200 --> 00:00:02.800\n")


def test_node_sdk_verbose_json_with_segments(node_results: dict[str, Any]) -> None:
    verbose = node_results["verbose_json"]
    assert (verbose["text"], verbose["language"], verbose["duration"]) == (TEXT, "english", 2.925)
    assert [(s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [(0.2, 2.8, TEXT)]


def test_node_sdk_streams(node_results: dict[str, Any]) -> None:
    events = node_results["stream"]
    assert {event["type"] for event in events[:-1]} == {"transcript.text.delta"}
    assert "".join(event["delta"] for event in events[:-1]) == TEXT
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["text"] == TEXT


def test_node_sdk_models_and_error(node_results: dict[str, Any]) -> None:
    assert node_results["models"] == ["qwen3-asr"] and node_results["retrieved"] == "qwen3-asr"
    error = node_results["error"]
    assert (error["status"], error["code"], error["type"]) == (404, "model_not_found", "invalid_request_error")
    assert "'whisper-1'" in error["message"]


# -- LiteLLM -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm(loopback_only: None) -> Iterator[types.ModuleType]:
    """LiteLLM with its bundled model cost map (it would fetch one from the internet on import)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        patch.setenv("LITELLM_TELEMETRY", "False")
        import litellm as module

        yield module


def _litellm_transcribe(litellm: types.ModuleType, server: ServerProcess, model: str, **params: Any) -> Any:
    with WAV.open("rb") as audio:
        return litellm.transcription(
            model=f"openai/{model}", file=audio, api_base=server.url + "/v1", api_key="unused", **params
        )


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ("json", TEXT),
        ("text", TEXT + "\n"),
        ("srt", f"1\n00:00:00,200 --> 00:00:02,800\n{TEXT}\n"),
        ("vtt", f"WEBVTT\n\n00:00:00.200 --> 00:00:02.800\n{TEXT}\n"),
    ],
)
def test_litellm_formats(litellm: types.ModuleType, server: ServerProcess, response_format: str, expected: str) -> None:
    assert _litellm_transcribe(litellm, server, "whisper-1", response_format=response_format).text == expected


def test_litellm_verbose_json_with_segments(litellm: types.ModuleType, server: ServerProcess) -> None:
    result = _litellm_transcribe(
        litellm, server, "qwen3-asr", response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert (result.text, result.language, result.duration) == (TEXT, "english", 2.925)
    assert [(s["start"], s["end"], s["text"]) for s in result.segments] == [(0.2, 2.8, TEXT)]


def test_litellm_stream_request_gets_the_transcript(litellm: types.ModuleType, server: ServerProcess) -> None:
    # LiteLLM sends response_format=verbose_json with stream=true: the server ignores stream there, as OpenAI does.
    assert _litellm_transcribe(litellm, server, "whisper-1", stream=True).text == TEXT


def test_litellm_unknown_model_is_a_not_found_error(litellm: types.ModuleType, server: ServerProcess) -> None:
    import openai

    # LiteLLM passes the OpenAI SDK's error through for transcriptions instead of mapping it to its own.
    with pytest.raises((litellm.NotFoundError, openai.NotFoundError)) as missing:
        _litellm_transcribe(litellm, server, "gpt-4o-transcribe")
    assert missing.value.status_code == 404 and "'qwen3-asr'" in str(missing.value)


# -- LangChain ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def whisper_parser(loopback_only: None) -> Iterator[Any]:
    """LangChain's OpenAIWhisperParser; pydub converts each piece to mp3 with the ffmpeg that the
    `imageio-ffmpeg` wheel ships (none is needed on the machine)."""
    import imageio_ffmpeg
    from pydub import AudioSegment

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AudioSegment, "converter", imageio_ffmpeg.get_ffmpeg_exe())
        from langchain_community.document_loaders.parsers import audio

        yield audio


def _parse(parser_module: Any, server: ServerProcess, **params: Any) -> list[Any]:
    from langchain_core.documents.base import Blob

    parser = parser_module.OpenAIWhisperParser(api_key="unused", base_url=server.url + "/v1", **params)
    return list(parser.lazy_parse(Blob.from_path(WAV)))


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, TEXT),
        ("json", TEXT),
        ("text", TEXT + "\n"),
        ("srt", f"1\n00:00:00,200 --> 00:00:02,800\n{TEXT}\n"),
        ("vtt", f"WEBVTT\n\n00:00:00.200 --> 00:00:02.800\n{TEXT}\n"),
        ("verbose_json", TEXT),  # the parser keeps the text of verbose_json (segments are dropped by it)
    ],
)
def test_langchain_whisper_parser(
    whisper_parser: Any, server: ServerProcess, response_format: str | None, expected: str
) -> None:
    # Its default model is "whisper-1": served here because SERVED_MODEL_NAME lists it.
    documents = _parse(whisper_parser, server, response_format=response_format)
    assert [document.page_content for document in documents] == [expected]
    assert documents[0].metadata == {"source": str(WAV), "chunk": 0}


def test_langchain_whisper_parser_error(
    whisper_parser: Any, server: ServerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The parser retries three times (5 s apart, skipped here), prints the error and yields nothing."""
    monkeypatch.setattr(whisper_parser, "time", types.SimpleNamespace(sleep=lambda _seconds: None))
    assert _parse(whisper_parser, server, model="gpt-4o-transcribe") == []
    printed = capsys.readouterr().out
    assert printed.count("Error code: 404") == 3 and "'qwen3-asr'" in printed
    assert "Failed to transcribe after 3 attempts." in printed
