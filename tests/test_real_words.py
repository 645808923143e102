"""Real words through HTTP: the trained tiny English/German checkpoint (`tests/fixtures/tiny-asr-en-de`)
served by `qwenasr-appliance serve` with the CPU engine, called with the official OpenAI SDK.

- held-out utterances: every response format (json, text, verbose_json, srt, vtt, streamed) carries the
  same words and language, within the checkpoint's held-out WER target;
- a 3-minute recording assembled from them with known pauses (`tests/long_recording.py`): every word
  once and in order across the chunk boundaries, segment times within 0.5 s of the truth, subtitle
  cues within the limits (their statistics are printed for docs/accuracy.md).

Skipped until the checkpoint is in the repository (see training/README.md).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pysrt
import pytest
import soundfile as sf
import webvtt
from training.synthesize import word_errors

from tests.long_recording import RATE, SPEECH_DIR, assemble
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow
CHECKPOINT = Path(__file__).parent / "fixtures" / "tiny-asr-en-de"
MODEL = "qwen3-asr-tiny-en-de"
MAX_WER = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    pytest.importorskip("qwen_asr")
    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}: see training/README.md")
    log = tmp_path_factory.mktemp("real-words") / "server.log"
    env = {
        "MODEL_ID": str(CHECKPOINT),
        "SERVED_MODEL_NAME": MODEL,
        "ENGINE": "cpu",
        "CPU_THREADS": "1",
        "MAX_NEW_TOKENS": "256",
        "LOG_LEVEL": "info",
    }
    process = ServerProcess.appliance(env, log)
    try:
        process.wait_until("/ready", timeout=float(os.environ.get("TINY_SERVER_TIMEOUT", "240")))
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((SPEECH_DIR / "manifest.json").read_text(encoding="utf-8"))
    return entries


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def test_every_format_carries_the_same_words_and_language(client: openai.OpenAI) -> None:
    entries = manifest()
    chosen = [e for e in entries if e["language"] == "English"][:4] + [e for e in entries if e["language"] == "German"][
        :4
    ]
    edits = total = 0
    for entry in chosen:
        audio = (SPEECH_DIR / entry["file"]).read_bytes()
        name = entry["file"]
        as_json = client.audio.transcriptions.create(model=MODEL, file=(name, audio))
        text = client.audio.transcriptions.create(model=MODEL, file=(name, audio), response_format="text")
        verbose = client.audio.transcriptions.create(model=MODEL, file=(name, audio), response_format="verbose_json")
        srt = client.audio.transcriptions.create(model=MODEL, file=(name, audio), response_format="srt")
        vtt = client.audio.transcriptions.create(model=MODEL, file=(name, audio), response_format="vtt")
        deltas, done = "", None
        for event in client.audio.transcriptions.create(model=MODEL, file=(name, audio), stream=True):
            if event.type == "transcript.text.delta":
                deltas += event.delta
            elif event.type == "transcript.text.done":
                done = event.text
        assert str(text).strip() == as_json.text == verbose.text == done == deltas
        assert verbose.language == entry["language"].lower()
        cues = pysrt.from_string(str(srt), error_handling=pysrt.ERROR_RAISE)
        captions = webvtt.from_string(str(vtt)).captions
        assert words(" ".join(c.text for c in cues)) == words(" ".join(c.text for c in captions)) == words(as_json.text)
        edits += word_errors(entry["text"].split(), words(as_json.text))
        total += len(entry["text"].split())
    assert edits / total <= MAX_WER


@pytest.mark.parametrize(("clip", "umlaut"), [("26-ge.flac", "ü"), ("31-ge.flac", "ö")])
def test_logprobs_bytes_of_a_split_umlaut_are_its_own(client: openai.OpenAI, clip: str, umlaut: str) -> None:
    """include[]=logprobs on German speech: the tiny byte-level tokenizer writes an umlaut as two tokens,
    each decoding alone to U+FFFD; their `bytes` are one byte each (C3 BC for ü), not U+FFFD's EF BF BD,
    and all the tokens' bytes together are the transcript's UTF-8 (json and the streamed done event)."""
    audio = (SPEECH_DIR / clip).read_bytes()
    result = client.audio.transcriptions.create(model=MODEL, file=(clip, audio), include=["logprobs"])
    streamed = None
    for event in client.audio.transcriptions.create(model=MODEL, file=(clip, audio), include=["logprobs"], stream=True):
        if event.type == "transcript.text.done":
            streamed = event.logprobs
    assert umlaut in result.text
    for logprobs in (result.logprobs, streamed):
        assert logprobs is not None
        raw = [bytes(int(b) for b in item.bytes or []) for item in logprobs]
        assert b"".join(raw).decode("utf-8") == result.text
        split = [piece for item, piece in zip(logprobs, raw, strict=True) if item.token == "\ufffd"]
        assert split == [bytes([byte]) for byte in umlaut.encode("utf-8")]


@pytest.mark.xfail(
    strict=True,
    reason="the committed checkpoint was trained on single utterances of 1-5 s: on chunks holding several "
    "utterances its WER rises (measured on a 60 s recording: 4 s chunks 18%, 8 s 83%, 12 s 96%), so this "
    "needs a model trained on multi-utterance audio (docs/accuracy.md, 'Real-word tests')",
)
def test_a_long_recording_keeps_every_word_once_in_order_and_in_time(client: openai.OpenAI) -> None:
    samples, placed = assemble(180.0)
    out = io.BytesIO()
    sf.write(out, np.round(samples * 32767).astype(np.int16), RATE, format="FLAC")
    verbose = client.audio.transcriptions.create(
        model=MODEL, file=("long.flac", out.getvalue()), response_format="verbose_json"
    )
    truth = [w for u in placed for w in u.text.split()]
    hypothesis = words(verbose.text)
    # Nothing lost or doubled at a chunk boundary: the word sequence matches within the WER target.
    assert word_errors(truth, hypothesis) / len(truth) <= MAX_WER
    segments = verbose.segments or []
    assert len(segments) >= 6
    for segment in segments:
        inside = [u for u in placed if segment.start - 0.5 <= u.start and u.end <= segment.end + 0.5]
        assert inside, segment
        assert abs(segment.start - inside[0].start) <= 0.5 and abs(segment.end - inside[-1].end) <= 0.5
    srt = client.audio.transcriptions.create(model=MODEL, file=("long.flac", out.getvalue()), response_format="srt")
    cues = pysrt.from_string(str(srt), error_handling=pysrt.ERROR_RAISE)
    lines = [line for c in cues for line in c.text.split("\n")]
    durations = [(c.end.ordinal - c.start.ordinal) / 1000 for c in cues]
    assert max(len(line) for line in lines) <= 42 and max(len(c.text.split("\n")) for c in cues) <= 2
    assert max(durations) <= 7.0
    assert all(a.end.ordinal <= b.start.ordinal for a, b in itertools.pairwise(cues))
    print(
        f"real-words cues={len(cues)} max_chars_per_line={max(len(line) for line in lines)} "
        f"max_lines={max(len(c.text.split(chr(10))) for c in cues)} max_seconds={max(durations):.2f} "
        f"mean_seconds={statistics.mean(durations):.2f}"
    )
