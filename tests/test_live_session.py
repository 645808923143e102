"""One live session in process, with a scripted decoder: the rules that need no socket and no engine
(turn length bound, pending-turn bound, failures, closing, format switches, buffer bounds)."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
import pytest

from qwenasr_appliance.audio.samples import SAMPLE_RATE
from qwenasr_appliance.config import Settings, replace
from qwenasr_appliance.engines.base import EngineRequestError
from qwenasr_appliance.supervisor.supervisor import EngineUnavailable
from qwenasr_appliance.transcription.admission import Overloaded
from qwenasr_appliance.transcription.live.events import ServerEvent, encode_server_event
from qwenasr_appliance.transcription.live.session import MAX_PENDING_TURNS, LiveSession
from qwenasr_appliance.transcription.live.session_config import LiveSessionConfig
from qwenasr_appliance.transcription.types import Transcript
from tests.realtime_support import pcm16, silence, speech


class ScriptedDecoder:
    """Stands in for LiveDecoder: finals say how long the turn was, or fail as told; partials echo."""

    def __init__(self) -> None:
        self.engine_ready = True
        self.final_error: BaseException | None = None
        self.final_gate: asyncio.Event | None = None
        self.finals: list[int] = []  # samples per final decode
        self.partials: list[str] = []  # prefixes given

    async def partial(self, samples: np.ndarray, config: LiveSessionConfig, prefix: str, request_id: str) -> str | None:
        self.partials.append(prefix)
        return f"language English<asr_text>{' '.join('x' * (len(samples) // SAMPLE_RATE + 1))}"[len(prefix) :]

    async def final(self, samples: np.ndarray, config: LiveSessionConfig, request_id: str) -> tuple[Transcript, int]:
        if self.final_gate is not None:
            await self.final_gate.wait()
        if self.final_error is not None:
            raise self.final_error
        self.finals.append(len(samples))
        return Transcript(text=f"{len(samples)} samples", language="English", duration=len(samples) / SAMPLE_RATE), 3


def make(**settings: Any) -> tuple[LiveSession, ScriptedDecoder, list[dict[str, Any]]]:
    decoder = ScriptedDecoder()
    events: list[dict[str, Any]] = []

    def emit(event: ServerEvent) -> None:
        events.append(json.loads(encode_server_event(event)))

    config = replace(Settings(model_id="m"), **settings)
    session = LiveSession(decoder=decoder, settings=config, emit=emit)  # type: ignore[arg-type]
    return session, decoder, events


def append(audio: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()})


MANUAL = json.dumps(
    {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}}}
)
COMMIT = json.dumps({"type": "input_audio_buffer.commit"})


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_a_turn_longer_than_the_limit_is_committed_where_it_stands() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], ScriptedDecoder]:
        session, decoder, events = make(live_max_turn_seconds=2.0, live_partial_interval_seconds=0.0)
        session.start()
        await session.receive(MANUAL)
        await session.receive(append(pcm16(speech()[: 24_000 * 5])))  # 5 s in one append
        await session.receive(COMMIT)
        await session.drain(5)
        await session.close()
        return events, decoder

    events, decoder = asyncio.run(scenario())
    assert types(events).count("input_audio_buffer.committed") == 3  # 2 s + 2 s (forced) + the rest at commit
    assert decoder.finals[:2] == [2 * SAMPLE_RATE, 2 * SAMPLE_RATE]
    assert 0.9 * SAMPLE_RATE < decoder.finals[2] <= 1.01 * SAMPLE_RATE  # the resampler's tail released at commit
    assert types(events).count("conversation.item.input_audio_transcription.completed") == 3


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (Overloaded("queue_full", 3), "rate_limit_exceeded"),
        (EngineUnavailable("the engine is restarting", 5), "engine_unavailable"),
        (EngineRequestError("boom"), "engine_error"),
        (RuntimeError("a bug"), "server_error"),
    ],
)
def test_a_failed_final_is_reported_and_the_session_goes_on(error: BaseException, code: str) -> None:
    async def scenario() -> list[dict[str, Any]]:
        session, decoder, events = make(live_partial_interval_seconds=0.0)
        session.start()
        await session.receive(MANUAL)
        decoder.final_error = error
        await session.receive(append(pcm16(speech()[:24_000])))
        await session.receive(COMMIT)
        await session.drain(5)
        decoder.final_error = None
        await session.receive(append(pcm16(speech()[:24_000])))
        await session.receive(COMMIT)
        await session.drain(5)
        await session.close()
        return events

    events = asyncio.run(scenario())
    failed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed"]
    assert len(failed) == 1 and failed[0]["error"]["code"] == code
    assert "boom" not in json.dumps(failed) and "a bug" not in json.dumps(failed)
    assert types(events)[-1] == "conversation.item.input_audio_transcription.completed"


def test_committed_turns_waiting_are_bounded() -> None:
    async def scenario() -> list[dict[str, Any]]:
        session, decoder, events = make(live_partial_interval_seconds=0.0)
        decoder.final_gate = asyncio.Event()  # finals hang until released
        session.start()
        await session.receive(MANUAL)
        for _ in range(MAX_PENDING_TURNS + 3):
            await session.receive(append(pcm16(speech()[:4_800])))
            await session.receive(COMMIT)
            await asyncio.sleep(0)
        assert session.awaiting_finals  # the idle timeout does not apply meanwhile
        decoder.final_gate.set()
        await session.drain(5)
        assert not session.awaiting_finals
        await session.close()
        return events

    events = asyncio.run(scenario())
    failed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed"]
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    # One decode in the worker plus MAX_PENDING_TURNS queued; the rest fail at once.
    assert len(completed) == MAX_PENDING_TURNS + 1 and len(failed) == 2
    assert {e["error"]["code"] for e in failed} == {"too_many_pending_turns"}


def test_a_closing_session_refuses_events_but_finishes_committed_turns() -> None:
    async def scenario() -> list[dict[str, Any]]:
        session, _decoder, events = make(live_partial_interval_seconds=0.0)
        session.start()
        await session.receive(MANUAL)
        await session.receive(append(pcm16(speech()[:24_000])))
        await session.receive(COMMIT)
        session.stop_accepting("session_expired")
        await session.receive(append(pcm16(speech()[:24_000])))
        assert await session.drain(5)
        await session.close()
        return events

    events = asyncio.run(scenario())
    assert types(events).count("conversation.item.input_audio_transcription.completed") == 1
    errors = [e for e in events if e["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["session_closed"]


def test_server_vad_keeps_only_the_look_back_while_nobody_speaks() -> None:
    async def scenario() -> tuple[LiveSession, list[dict[str, Any]]]:
        session, _decoder, events = make()
        session.start()
        for _ in range(30):  # 30 s of silence
            await session.receive(append(pcm16(silence(1.0))))
        return session, events

    session, events = asyncio.run(scenario())
    kept = session._buffer.end - session._buffer.start
    assert kept <= 0.3 * SAMPLE_RATE + 5 * 480  # prefix padding plus the detector's look-back
    assert types(events) == ["session.created"]


def test_partials_use_the_stable_prefix_from_the_third_decode() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], ScriptedDecoder]:
        session, decoder, events = make(live_partial_interval_seconds=0.5)
        session.start()
        await session.receive(MANUAL)
        voice = pcm16(speech()[: 24_000 * 6])
        for start in range(0, len(voice), 24_000):  # 0.5 s per append, decodes settle in between
            await session.receive(append(voice[start : start + 24_000]))
            for _ in range(5):
                await asyncio.sleep(0)
        await session.close()
        return events, decoder

    events, decoder = asyncio.run(scenario())
    assert decoder.partials[:2] == ["", ""]
    assert all(prefix.startswith("language English<asr_text>") for prefix in decoder.partials[2:])
    deltas = "".join(e["delta"] for e in events if e["type"] == "conversation.item.input_audio_transcription.delta")
    assert deltas and set(deltas.replace(" ", "")) == {"x"}


def test_switching_the_format_mid_session() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], ScriptedDecoder]:
        session, decoder, events = make(live_partial_interval_seconds=0.0)
        session.start()
        await session.receive(MANUAL)
        await session.receive(append(pcm16(speech()[:24_000])))  # 1 s of 24 kHz PCM
        await session.receive(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcma"}}}},
                }
            )
        )
        await session.receive(append(bytes([0xD5]) * 8_000))  # 1 s of A-law near-silence at 8 kHz
        await session.receive(COMMIT)
        await session.drain(5)
        await session.close()
        return events, decoder

    events, decoder = asyncio.run(scenario())
    assert decoder.finals == [pytest.approx(2 * SAMPLE_RATE, abs=SAMPLE_RATE // 50)]
    assert types(events).count("session.updated") == 2


def test_ending_commits_the_audio_held_as_a_last_turn_whatever_its_length() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], ScriptedDecoder]:
        session, decoder, events = make(live_partial_interval_seconds=0.0)
        session.start()
        await session.receive(MANUAL)
        await session.receive(append(pcm16(speech()[:1_200])))  # 50 ms: too little for a client's commit
        session.stop_accepting("shutdown")
        session.stop_accepting("shutdown")  # once
        assert await session.drain(5)
        await session.close()
        return events, decoder

    events, decoder = asyncio.run(scenario())
    assert types(events)[1:] == [
        "session.updated",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert decoder.finals == [800]  # 50 ms at 16 kHz, nothing the resampler held is lost


def test_ending_mid_speech_stops_and_commits_the_open_turn() -> None:
    async def scenario() -> list[dict[str, Any]]:
        session, _decoder, events = make(live_partial_interval_seconds=0.0)
        session.start()
        await session.receive(append(pcm16(speech()[: 24_000 * 2])))  # server VAD: a turn opens
        assert "input_audio_buffer.speech_started" in types(events)
        session.stop_accepting("session_expired")
        assert await session.drain(5)
        await session.close()
        return events

    events = asyncio.run(scenario())
    assert types(events)[-4:] == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert events[-4]["audio_end_ms"] == 2000
    assert len({e["item_id"] for e in events[-4:]} | {events[1]["item_id"]}) == 1


def test_turns_not_transcribed_in_time_fail_once_each() -> None:
    async def scenario() -> tuple[list[dict[str, Any]], LiveSession]:
        session, decoder, events = make(live_partial_interval_seconds=0.0)
        decoder.final_gate = asyncio.Event()  # finals hang until released
        session.start()
        await session.receive(MANUAL)
        for _ in range(2):  # one turn in the final decode, one waiting behind it
            await session.receive(append(pcm16(speech()[:24_000])))
            await session.receive(COMMIT)
        session.stop_accepting("shutdown")
        assert not await session.drain(0.2)
        await session.fail_outstanding("gone", code="server_shutting_down")
        decoder.final_gate.set()  # a decode that ends now must not report as well
        await asyncio.sleep(0.05)
        await session.close()
        return events, session

    events, session = asyncio.run(scenario())
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    failed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed"]
    assert [e["item_id"] for e in failed] == committed and len(committed) == 2
    assert {(e["error"]["code"], e["error"]["type"]) for e in failed} == {("server_shutting_down", "server_error")}
    assert "conversation.item.input_audio_transcription.completed" not in types(events)
    assert not session.awaiting_finals
