"""Live transcription with real words: the trained tiny English/German checkpoint
(`tests/fixtures/tiny-asr-en-de`, see training/README.md) behind `qwenasr-appliance serve` on the CPU
engine, fed held-out espeak-ng utterances (`tests/fixtures/speech-en-de`) through server VAD by the
official OpenAI SDK. Skips until the checkpoint is committed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from training.synthesize import word_errors

from tests.realtime_support import client, of_type, pcm16, recv, recv_until, send_audio, silence
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "tiny-asr-en-de"
SPEECH = FIXTURES / "speech-en-de"
MAX_WER = 0.10  # the file path's bar is 5%; turns found by the VAD carry padding and silence


@pytest.fixture(scope="module")
def words_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}: see training/README.md")
    env = {"MODEL_ID": str(CHECKPOINT), "ENGINE": "cpu", "CPU_THREADS": "1", "MAX_NEW_TOKENS": "96"}
    server = ServerProcess.appliance(env, tmp_path_factory.mktemp("words") / "server.log")
    try:
        server.wait_until("/ready", timeout=240)
        yield server
    finally:
        server.stop()


def utterances() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((SPEECH / "manifest.json").read_text(encoding="utf-8"))
    english = [e for e in entries if e["language"] == "English"][:2]
    german = [e for e in entries if e["language"] == "German"][:2]
    return [english[0], german[0], english[1], german[1]]


def test_held_out_speech_is_transcribed_live_turn_by_turn(words_server: ServerProcess) -> None:
    chosen = utterances()
    pieces = [silence(0.5)]
    for entry in chosen:
        audio, rate = sf.read(SPEECH / entry["file"], dtype="float32")
        pieces += [soxr.resample(audio, rate, 24_000).astype(np.float32), silence(1.2)]
    stream = pcm16(np.concatenate(pieces))

    async def scenario() -> list[dict[str, Any]]:
        async with client(words_server.url, key="unused").realtime.connect(
            extra_query={"intent": "transcription"}
        ) as conn:
            await recv(conn)
            sender = asyncio.create_task(send_audio(conn, stream, pause=0.02))
            events = await recv_until(
                conn, "conversation.item.input_audio_transcription.completed", count=len(chosen), timeout=300
            )
            await sender
            return events

    events = asyncio.run(scenario())
    transcripts = [e["transcript"] for e in of_type(events, "conversation.item.input_audio_transcription.completed")]
    assert len(transcripts) == len(chosen), transcripts
    edits = sum(word_errors(e["text"].split(), t.lower().split()) for e, t in zip(chosen, transcripts, strict=True))
    words = sum(len(e["text"].split()) for e in chosen)
    assert edits / words <= MAX_WER, list(zip([e["text"] for e in chosen], transcripts, strict=True))
