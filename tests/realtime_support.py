"""Helpers for the live transcription tests: audio in the Realtime API's formats, and a client loop on
the official OpenAI SDK that checks every server event against the SDK's own event types."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pydantic
import soundfile as sf
import soxr
from openai.types.realtime import RealtimeServerEvent

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "samples"
_SERVER_EVENT = pydantic.TypeAdapter(RealtimeServerEvent)
# Ours that the GA union does not list (the beta interface's answer).
_BETA_EVENTS = {"transcription_session.updated"}


def speech(name: str = "wcpp_jfk.wav", rate: int = 24_000) -> np.ndarray:
    """A speech sample as float32 mono at `rate`."""
    data, source_rate = sf.read(SAMPLES / name, dtype="float32", always_2d=True)
    return soxr.resample(data.mean(axis=1), source_rate, rate).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 24_000) -> np.ndarray:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected_words(seconds: float, words_per_second: float) -> str:
    """The test double's transcript of `seconds` of audio in its words-per-second mode."""
    return " ".join(f"w{i}" for i in range(1, int(seconds * words_per_second) + 1))


def client(url: str, key: str = "test-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def recv(connection: Any, timeout: float = 20.0) -> dict[str, Any]:  # noqa: ASYNC109
    """The next server event as a dict, after checking it against the SDK's `RealtimeServerEvent` union."""
    raw = await asyncio.wait_for(connection.recv_bytes(), timeout)
    event: dict[str, Any] = json.loads(raw)
    if event["type"] not in _BETA_EVENTS:
        _SERVER_EVENT.validate_python(event)  # raises on a missing or mistyped field
    return event


async def recv_until(
    connection: Any,
    last_type: str,
    *,
    count: int = 1,
    timeout: float = 30.0,  # noqa: ASYNC109
) -> list[dict[str, Any]]:
    """Events up to and including the `count`-th of type `last_type`."""
    events: list[dict[str, Any]] = []
    seen = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while seen < count:
        event = await recv(connection, max(0.1, deadline - loop.time()))
        events.append(event)
        seen += event["type"] == last_type
    return events


async def send_audio(connection: Any, audio: bytes, *, piece: int = 4800, pause: float = 0.0) -> None:
    """Append `audio` in pieces of `piece` bytes (4800: 100 ms of 24 kHz PCM)."""
    for start in range(0, len(audio), piece):
        await connection.input_audio_buffer.append(audio=b64(audio[start : start + piece]))
        if pause:
            await asyncio.sleep(pause)


def of_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]
