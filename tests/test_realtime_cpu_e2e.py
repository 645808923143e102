"""Live transcription on the real CPU engine: the product's `qwenasr-appliance serve` with the tiny
Qwen3-ASR checkpoint (real architecture, random weights; `tests/tiny_model.py`), driven by the official
OpenAI SDK's realtime client.

The tiny model writes no real words, but it is deterministic (greedy), so the live path can be held to
the file path exactly: a committed turn's transcript must equal what `POST /v1/audio/transcriptions`
returns for the same audio, and the partial re-decodes must run through the engine's assistant prefix.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

from tests.hardening import metric_value
from tests.realtime_support import b64, client, of_type, pcm16, recv, recv_until, send_audio, silence, speech
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "qwen3-asr-tiny"  # the tiny server's SERVED_MODEL_NAME (tests/conftest.py)


def file_transcript(server: ServerProcess, samples: np.ndarray) -> str:
    """The file path's transcript of the same 24 kHz PCM the live session received."""
    wav = io.BytesIO()
    sf.write(wav, samples, 24_000, format="WAV", subtype="PCM_16")
    answer = httpx.post(
        server.url + "/v1/audio/transcriptions",
        data={"model": MODEL, "response_format": "json"},
        files={"file": ("turn.wav", wav.getvalue(), "audio/wav")},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["text"])


def test_a_committed_turn_is_transcribed_exactly_as_the_file_path_does(tiny_server: ServerProcess) -> None:
    samples = speech()[: 24_000 * 3]
    # What the client sends is 16-bit: the file gets the same quantised samples.
    quantised = np.frombuffer(pcm16(samples), "<i2").astype(np.float32) / 32768.0

    async def scenario() -> list[dict[str, Any]]:
        async with client(tiny_server.url, key="unused").realtime.connect(
            extra_query={"intent": "transcription"}
        ) as conn:
            await recv(conn)
            await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})  # type: ignore[typeddict-item]
            await recv(conn)
            await send_audio(conn, pcm16(samples), pause=0.05)
            await conn.input_audio_buffer.commit()
            return await recv_until(conn, "conversation.item.input_audio_transcription.completed", timeout=120)

    events = asyncio.run(scenario())
    (completed,) = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed["usage"]["seconds"] == pytest.approx(3.0, abs=0.01)
    assert completed["transcript"]  # the tiny model always writes something
    assert completed["transcript"] == file_transcript(tiny_server, quantised)
    deltas = "".join(e["delta"] for e in of_type(events, "conversation.item.input_audio_transcription.delta"))
    assert completed["transcript"].startswith(deltas) or not deltas  # deltas only ever append


def test_server_vad_partials_go_through_the_engine(tiny_server: ServerProcess) -> None:
    """Speech streamed in real time: turns are found, partial re-decodes run on the CPU engine (with the
    assistant prefix from the third on), and every turn completes."""
    audio = pcm16(np.concatenate([speech("sb_spk1_snt1.wav"), silence(1.2)]))

    async def scenario() -> list[dict[str, Any]]:
        async with client(tiny_server.url, key="unused").realtime.connect(model=MODEL) as conn:
            await recv(conn)
            sender = asyncio.create_task(send_audio(conn, audio, pause=0.1))
            events = await recv_until(conn, "conversation.item.input_audio_transcription.completed", timeout=120)
            await sender
            return events

    events = asyncio.run(scenario())
    assert [e["type"] for e in events if e["type"].startswith("input_audio_buffer.")] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    (completed,) = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"]
    text = httpx.get(tiny_server.url + "/metrics", timeout=10).text
    assert metric_value(text, 'qwenasr_live_turns_total{outcome="completed"}') >= 1


def test_a_client_gone_mid_decode_leaves_no_engine_work(tiny_server: ServerProcess) -> None:
    async def scenario() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{tiny_server.port}/v1/realtime?intent=transcription") as ws:
            await ws.recv()
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
                    }
                )
            )
            await ws.recv()
            await ws.send(
                json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm16(speech()[: 24_000 * 6]))})
            )
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await asyncio.sleep(0.3)  # the final decode is running

    asyncio.run(scenario())
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(tiny_server.url + "/metrics", timeout=10).text
        busy = metric_value(text, "qwenasr_requests_in_flight") + metric_value(text, "qwenasr_live_sessions_active")
        if busy == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert busy == 0
