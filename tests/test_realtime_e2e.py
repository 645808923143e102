"""Live transcription end to end: the official OpenAI SDK's realtime client (`client.realtime.connect`)
against a real granian process serving the app around the test double engine, whose transcript of S
seconds of audio is "w1 ... wK" with K = floor(2 S) (DOUBLE_WORDS_PER_SECOND), so every transcript can be
checked against the turn's own duration. Every server event is validated against the SDK's types."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.hardening import metric_value
from tests.realtime_support import (
    b64,
    client,
    expected_words,
    of_type,
    pcm16,
    recv,
    recv_until,
    send_audio,
    silence,
    speech,
)
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

WPS = 2.0
KEY = "test-key"
TRANSCRIPTION = {"intent": "transcription"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {
        "DOUBLE_WORDS_PER_SECOND": str(WPS),
        "API_KEYS": KEY,
        "DECODE_WORKERS": "1",
        "LIVE_MAX_SESSIONS": "3",
        "LIVE_IDLE_TIMEOUT_SECONDS": "3",
        "LIVE_MAX_APPEND_BYTES": "1048576",
        "LIVE_SEND_QUEUE_EVENTS": "16",
        "LIVE_SEND_TIMEOUT_SECONDS": "2",
        "SERVED_MODEL_NAME": "qwen3-asr",
    }
    process = ServerProcess.with_test_double(env, tmp_path_factory.mktemp("realtime") / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        process.stop()


def ws_url(server: ServerProcess, query: str = "intent=transcription") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime?{query}"


def metrics(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def wait_idle(server: ServerProcess, timeout: float = 10.0) -> str:
    """/metrics once no live session is open and no engine request runs (nothing leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        text = metrics(server)
        busy = metric_value(text, "qwenasr_live_sessions_active") + metric_value(text, "qwenasr_requests_in_flight")
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def assert_turn_consistent(events: list[dict[str, Any]], item_id: str) -> str:
    """Deltas of the item append up to its completed transcript, which matches the turn's duration."""
    completed = [
        e for e in of_type(events, "conversation.item.input_audio_transcription.completed") if e["item_id"] == item_id
    ]
    assert len(completed) == 1, events
    transcript = completed[0]["transcript"]
    assert completed[0]["usage"]["type"] == "duration"
    assert transcript == expected_words(completed[0]["usage"]["seconds"], WPS)
    deltas = "".join(
        e["delta"]
        for e in of_type(events, "conversation.item.input_audio_transcription.delta")
        if e["item_id"] == item_id
    )
    assert deltas == transcript
    return str(transcript)


def test_server_vad_turns_with_partials_and_finals(server: ServerProcess) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            created = await recv(conn)
            assert created["type"] == "session.created"
            session = created["session"]
            assert session["type"] == "transcription"
            assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"transcription": {"language": "en"}}}}
            )
            updated = await recv(conn)
            assert updated["type"] == "session.updated"
            assert updated["session"]["audio"]["input"]["transcription"]["language"] == "en"
            # Two utterances 1.5 s apart, sent in real time (partials are due every 0.8 s of audio).
            first = speech("sb_spk1_snt1.wav")
            audio = pcm16(np.concatenate([first, silence(1.5), speech("ds_LDC93S1.wav"), silence(1.5)]))
            sender = asyncio.create_task(send_audio(conn, audio, pause=0.1))
            events = await recv_until(
                conn, "conversation.item.input_audio_transcription.completed", count=2, timeout=40
            )
            await sender
            return events

    events = asyncio.run(scenario())
    started = of_type(events, "input_audio_buffer.speech_started")
    stopped = of_type(events, "input_audio_buffer.speech_stopped")
    committed = of_type(events, "input_audio_buffer.committed")
    assert len(started) == len(stopped) == len(committed) == 2, [e["type"] for e in events]
    items = [e["item_id"] for e in started]
    assert [e["item_id"] for e in stopped] == [e["item_id"] for e in committed] == items
    assert committed[0]["previous_item_id"] is None and committed[1]["previous_item_id"] == items[0]
    # The first turn starts within the first utterance's first second and ends after it, plus the silence rule.
    assert 0 <= started[0]["audio_start_ms"] < 1000
    assert 2000 < stopped[0]["audio_end_ms"] < 2870 + 1500
    assert stopped[0]["audio_end_ms"] <= started[1]["audio_start_ms"]
    for item in items:
        types = [e["type"] for e in events if e.get("item_id") == item]
        assert types.index("input_audio_buffer.speech_started") < types.index("input_audio_buffer.committed")
        assert types[-1] == "conversation.item.input_audio_transcription.completed"
        assert assert_turn_consistent(events, item)
    # At least one partial arrived while the person was still speaking (before the turn was committed).
    first_types = [e["type"] for e in events if e.get("item_id") == items[0]]
    assert first_types.index("conversation.item.input_audio_transcription.delta") < first_types.index(
        "input_audio_buffer.speech_stopped"
    )
    text = wait_idle(server)
    assert metric_value(text, "qwenasr_live_sessions_active") == 0
    assert metric_value(text, "qwenasr_requests_in_flight") == 0
    assert metric_value(text, "qwenasr_live_first_delta_seconds_count") >= 1
    assert metric_value(text, "qwenasr_live_final_latency_seconds_count") >= 2
    assert metric_value(text, "qwenasr_live_audio_seconds_total") >= len(events) * 0 + 8.0


@pytest.mark.parametrize("audio_format", ["audio/pcm", "audio/pcmu", "audio/pcma"])
def test_manual_commits_in_every_format(server: ServerProcess, audio_format: str) -> None:
    """turn_detection null: the client commits; the turn holds exactly the audio sent (G.711 at 8 kHz)."""
    from tests.test_live_audio import encode_g711

    rate = 24_000 if audio_format == "audio/pcm" else 8_000
    samples = speech(rate=rate)[: rate * 4]  # 4 s
    data = pcm16(samples) if audio_format == "audio/pcm" else encode_g711(samples, audio_format)

    async def scenario() -> list[dict[str, Any]]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            await recv(conn)
            fmt: dict[str, Any] = {"type": audio_format}
            await conn.session.update(
                session={"type": "transcription", "audio": {"input": {"format": fmt, "turn_detection": None}}}  # type: ignore[typeddict-item]
            )
            updated = await recv(conn)
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            assert updated["session"]["audio"]["input"]["format"]["type"] == audio_format
            await send_audio(conn, data, piece=len(data) // 7 + 1)  # odd piece sizes split PCM samples
            await conn.input_audio_buffer.commit()
            return await recv_until(conn, "conversation.item.input_audio_transcription.completed")

    events = asyncio.run(scenario())
    assert not of_type(events, "input_audio_buffer.speech_started")
    (committed,) = of_type(events, "input_audio_buffer.committed")
    (completed,) = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed["usage"]["seconds"] == pytest.approx(4.0, abs=0.01)
    assert completed["transcript"] == expected_words(4.0, WPS)
    assert_turn_consistent(events, committed["item_id"])


def test_bad_events_get_errors_and_the_session_goes_on(server: ServerProcess) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            await recv(conn)
            await conn.send(
                {
                    "type": "session.update",
                    "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
                }
            )  # type: ignore[typeddict-item]
            await recv(conn)
            bad: list[Any] = [
                {"type": "response.create", "event_id": "e1"},
                {"type": "input_audio_buffer.append", "audio": "%%% not base64", "event_id": "e2"},
                {"type": "input_audio_buffer.append", "event_id": "e3"},
                {
                    "type": "session.update",
                    "session": {"type": "transcription", "audio": {"input": {"format": {"type": "audio/opus"}}}},
                    "event_id": "e4",
                },
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                    },
                    "event_id": "e5",
                },
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 3}}},
                    },
                    "event_id": "e6",
                },
                {
                    "type": "session.update",
                    "session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}},
                    "event_id": "e7",
                },
                {
                    "type": "session.update",
                    "session": {
                        "type": "transcription",
                        "audio": {"input": {"transcription": {"language": "xx-klingon"}}},
                    },
                    "event_id": "e8",
                },
                {"type": "session.update", "session": {"type": "realtime"}, "event_id": "e9"},
                {"type": "input_audio_buffer.commit", "event_id": "e10"},  # nothing appended yet
                {
                    "type": "input_audio_buffer.append",
                    "audio": b64(bytes(1_200_000)),
                    "event_id": "e11",
                },  # over the limit
            ]
            for event in bad:
                await conn.send(event)
            ws = conn._connection  # the SDK's websocket: raw frames the SDK would not send
            await ws.send("{not json")
            await ws.send(b"\x00\x01binary")
            errors = [await recv(conn) for _ in range(len(bad) + 2)]
            # Still alive and unchanged: manual mode, audio/pcm; a valid turn completes.
            await send_audio(conn, pcm16(speech("ds_LDC93S1.wav")))
            await conn.input_audio_buffer.commit()
            return errors + await recv_until(conn, "conversation.item.input_audio_transcription.completed")

    events = asyncio.run(scenario())
    errors = of_type(events, "error")
    assert len(errors) == 13
    codes = {e["error"]["event_id"]: (e["error"]["code"], e["error"]["param"]) for e in errors}
    assert codes["e1"] == ("invalid_value", "type")
    assert codes["e2"] == ("invalid_base64", "audio")
    assert codes["e3"] == ("missing_required_parameter", "audio")
    assert codes["e4"] == ("invalid_value", "session.audio.input.format.type")
    assert codes["e5"] == ("invalid_value", "session.audio.input.format.rate")
    assert codes["e6"] == ("invalid_value", "session.audio.input.turn_detection.threshold")
    assert codes["e7"] == ("model_not_found", "session.audio.input.transcription.model")
    assert codes["e8"][0] == "unsupported_language"
    assert codes["e9"] == ("invalid_value", "session.type")
    assert codes["e10"][0] == "input_audio_buffer_commit_empty"
    assert codes["e11"] == ("append_too_large", "audio")
    assert [e["error"]["code"] for e in errors if e["error"]["event_id"] is None] == ["invalid_json", "invalid_json"]
    assert all(e["error"]["type"] == "invalid_request_error" for e in errors)
    (completed,) = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed["transcript"] == expected_words(completed["usage"]["seconds"], WPS) != ""
    assert metric_value(metrics(server), 'qwenasr_live_client_errors_total{code="invalid_base64"}') >= 1


def test_clear_drops_the_buffer(server: ServerProcess) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            await recv(conn)
            await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})  # type: ignore[typeddict-item]
            await recv(conn)
            await send_audio(conn, pcm16(speech()[: 24_000 * 3]))
            await conn.input_audio_buffer.clear()
            cleared = await recv_until(conn, "input_audio_buffer.cleared")
            await conn.input_audio_buffer.commit()  # nothing left
            error = await recv(conn)
            await send_audio(conn, pcm16(speech()[:24_000]))
            await conn.input_audio_buffer.commit()
            return [*cleared, error, *await recv_until(conn, "conversation.item.input_audio_transcription.completed")]

    events = asyncio.run(scenario())
    assert of_type(events, "error")[0]["error"]["code"] == "input_audio_buffer_commit_empty"
    (completed,) = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed["usage"]["seconds"] == pytest.approx(1.0, abs=0.01)


def test_the_beta_transcription_session_update_is_understood(server: ServerProcess) -> None:
    async def scenario() -> list[dict[str, Any]]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            await recv(conn)
            await conn.send(
                {  # type: ignore[arg-type]
                    "type": "transcription_session.update",
                    "session": {
                        "input_audio_format": "g711_ulaw",
                        "input_audio_transcription": {"model": "qwen3-asr", "language": "de"},
                        "turn_detection": None,
                    },
                }
            )
            return [await recv(conn)]

    (updated,) = asyncio.run(scenario())
    assert updated["type"] == "transcription_session.updated"
    assert updated["session"]["input_audio_format"] == "g711_ulaw"
    assert updated["session"]["input_audio_transcription"]["language"] == "de"
    assert updated["session"]["turn_detection"] is None


def assert_refused(error: InvalidStatus, status: int, code: str) -> None:
    assert error.response.status_code == status
    assert error.response.headers["Content-Type"] == "application/json"
    body = json.loads(error.response.body or b"{}")
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code


def test_authentication_header_subprotocol_and_refusals(server: ServerProcess) -> None:
    async def scenario() -> None:
        # Each refusal is an HTTP answer in OpenAI's error shape that says why (a bare 403 before).
        with pytest.raises(InvalidStatus) as refused:
            async with client(server.url, key="wrong").realtime.connect(extra_query=TRANSCRIPTION):
                pass
        assert_refused(refused.value, 401, "invalid_api_key")
        assert refused.value.response.headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(InvalidStatus) as refused:  # a conversation session (another intent) is not served
            async with websockets.connect(
                ws_url(server, "intent=conversation"), additional_headers={"Authorization": f"Bearer {KEY}"}
            ):
                pass
        assert_refused(refused.value, 400, "unsupported_intent")
        with pytest.raises(InvalidStatus) as refused:  # an unknown model
            async with websockets.connect(
                ws_url(server, "model=gpt-4o-transcribe"), additional_headers={"Authorization": f"Bearer {KEY}"}
            ):
                pass
        assert_refused(refused.value, 404, "model_not_found")
        assert "qwen3-asr" in json.loads(refused.value.response.body or b"{}")["error"]["message"]
        # ?model= with the served name works through the SDK's own parameter.
        async with client(server.url).realtime.connect(model="qwen3-asr") as conn:
            assert (await recv(conn))["type"] == "session.created"
        # Browsers: the key in a subprotocol; the server picks "realtime" and never echoes the key.
        protocols = ["realtime", f"openai-insecure-api-key.{KEY}"]
        async with websockets.connect(ws_url(server), subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(ws_url(server), subprotocols=["realtime", "openai-insecure-api-key.nope"]):  # type: ignore[list-item]
                pass
        assert_refused(refused.value, 401, "invalid_api_key")

    asyncio.run(scenario())


def test_session_limit_idle_timeout_and_disconnects_leak_nothing(server: ServerProcess) -> None:
    async def scenario() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        open_sockets = [await websockets.connect(ws_url(server), additional_headers=headers) for _ in range(3)]
        for ws in open_sockets:
            assert json.loads(await ws.recv())["type"] == "session.created"
        # A fourth is over LIVE_MAX_SESSIONS=3: an error event, then close 1013 (try again later).
        async with websockets.connect(ws_url(server), additional_headers=headers) as extra:
            refusal = json.loads(await extra.recv())
            assert refusal["type"] == "error" and refusal["error"]["code"] == "session_limit_reached"
            with pytest.raises(ConnectionClosed) as closed:
                await extra.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        # Mid-turn disconnects: audio in flight, partials and a final decode running, then the client vanishes.
        for ws in open_sockets[:2]:
            await ws.send(
                json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm16(speech()[: 24_000 * 2]))})
            )
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await ws.close()
        # The third stays silent: after LIVE_IDLE_TIMEOUT_SECONDS=3 an `idle_timeout` error, then close 1000.
        started = time.monotonic()
        event = json.loads(await asyncio.wait_for(open_sockets[2].recv(), 10))
        assert event["type"] == "error" and event["error"]["code"] == "idle_timeout"
        with pytest.raises(ConnectionClosed) as idle:
            await asyncio.wait_for(open_sockets[2].recv(), 5)
        assert idle.value.rcvd is not None and idle.value.rcvd.code == 1000
        assert 2.5 < time.monotonic() - started < 8

    asyncio.run(scenario())
    text = wait_idle(server)
    assert metric_value(text, "qwenasr_live_sessions_active") == 0
    assert metric_value(text, "qwenasr_requests_in_flight") == 0  # no engine request outlived its session
    assert metric_value(text, 'qwenasr_live_sessions_total{reason="rejected"}') >= 1
    assert metric_value(text, 'qwenasr_live_sessions_rejected_total{reason="session_limit_reached"}') >= 1
    assert metric_value(text, "qwenasr_live_sessions_limit") == 3
    assert metric_value(text, 'qwenasr_live_sessions_total{reason="idle_timeout"}') >= 1


def test_an_idle_timeout_mid_turn_transcribes_the_turn_before_closing(server: ServerProcess) -> None:
    """A recording sent without trailing silence: server VAD never hears the turn end, the client goes
    quiet waiting for it. The idle timeout commits what the session holds and sends its transcript, then
    `idle_timeout` and close 1000 (the speech was dropped before, found by a new user's first try)."""

    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        async with websockets.connect(ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            voice = pcm16(speech()[: 24_000 * 2])  # 2 s, ending mid-speech
            for start in range(0, len(voice), 4_800):
                await ws.send(
                    json.dumps({"type": "input_audio_buffer.append", "audio": b64(voice[start : start + 4_800])})
                )
            events: list[dict[str, Any]] = []
            try:
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
            except ConnectionClosed as closed:
                return events, closed.rcvd.code if closed.rcvd else None

    events, code = asyncio.run(scenario())
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.speech_started" in kinds
    (committed,) = of_type(events, "input_audio_buffer.committed")
    (completed,) = of_type(events, "conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == committed["item_id"] and completed["transcript"]
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "idle_timeout"
    assert kinds.index("conversation.item.input_audio_transcription.completed") < len(kinds) - 1
    assert code == 1000


def test_a_client_that_stops_reading_is_disconnected(server: ServerProcess) -> None:
    """A client that reads nothing while one append makes more server events than LIVE_SEND_QUEUE_EVENTS=16
    (speech with many pauses: a burst of turn events) gets close code 1008; the queue never grows past
    its bound."""
    gap = silence(1.0)
    burst = np.concatenate([part for _ in range(4) for part in (speech("ds_LDC93S1.wav"), gap)])

    async def scenario() -> tuple[int | None, list[str]]:
        ws = await websockets.connect(ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"})
        ws.transport.pause_reading()  # read nothing from now on
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm16(burst))}))
        await asyncio.sleep(2.0)
        ws.transport.resume_reading()
        types: list[str] = []
        try:
            async with asyncio.timeout(20):
                while True:
                    types.append(json.loads(await ws.recv())["type"])
        except ConnectionClosed as closed:
            return (closed.rcvd.code if closed.rcvd else None), types

    code, types = asyncio.run(scenario())
    assert code == 1008
    assert len(types) <= 16 + 1  # the queue's bound (the writer may hold one more)
    text = wait_idle(server)
    assert metric_value(text, 'qwenasr_live_sessions_total{reason="slow_consumer"}') == 1
    assert metric_value(text, "qwenasr_requests_in_flight") == 0


def test_a_client_that_neither_reads_nor_sends_is_closed_by_the_idle_timeout(server: ServerProcess) -> None:
    """granian stops reading a WebSocket whose peer does not read, so such a client looks silent: the idle
    timeout (3 s here) ends its session; nothing piles up meanwhile."""
    junk = json.dumps({"type": "nonsense." + "x" * 2000})

    async def scenario() -> float:
        ws = await websockets.connect(
            ws_url(server), additional_headers={"Authorization": f"Bearer {KEY}"}, max_queue=1
        )
        ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.transport.pause_reading()
        started = time.monotonic()
        with contextlib.suppress(TimeoutError, ConnectionClosed, OSError):
            for _ in range(20_000):  # each answered with an error event the client never reads
                await asyncio.wait_for(ws.send(junk), 2)
        while metric_value(metrics(server), "qwenasr_live_sessions_active") and time.monotonic() - started < 20:
            await asyncio.sleep(0.2)
        ended = time.monotonic() - started
        ws.transport.abort()
        return ended

    assert asyncio.run(scenario()) < 12
    text = wait_idle(server)
    assert metric_value(text, "qwenasr_live_sessions_active") == 0


def test_session_length_limit(tmp_path: Path) -> None:
    env = {"DOUBLE_WORDS_PER_SECOND": str(WPS), "DECODE_WORKERS": "1", "LIVE_MAX_SESSION_SECONDS": "2"}
    process = ServerProcess.with_test_double(env, tmp_path / "server.log")
    try:
        process.wait_until("/ready", timeout=60)

        async def scenario() -> list[dict[str, Any]]:
            async with client(process.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
                events = [await recv(conn)]
                await conn.session.update(
                    session={"type": "transcription", "audio": {"input": {"turn_detection": None}}}
                )  # type: ignore[typeddict-item]
                await send_audio(conn, pcm16(speech()[: 24_000 * 3]))
                await conn.input_audio_buffer.commit()
                while True:
                    try:
                        events.append(await recv(conn, timeout=10))
                    except ConnectionClosed as closed:
                        assert closed.rcvd is not None and closed.rcvd.code == 1000
                        return events

        events = asyncio.run(scenario())
        # The committed turn was still transcribed before the session ended with `session_expired`.
        assert of_type(events, "conversation.item.input_audio_transcription.completed")
        assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "session_expired"
    finally:
        process.stop()


def test_the_readme_example_runs(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Live transcription") :]
    code = section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 3)]
    assert len(code.strip().splitlines()) <= 17
    code = code.replace("http://localhost:8001", server.url).replace("unused-or-your-key", KEY)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    audio = pcm16(speech("sb_spk1_snt1.wav"))  # a recording that ends in speech: the example ends its turn
    asyncio.run(asyncio.wait_for(namespace["main"](audio), 30))
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith("w1 w2") and printed == expected_words(len(printed.split()) / WPS + 0.01, WPS)


def test_the_realtime_benchmark_runs(server: ServerProcess, tmp_path: Path) -> None:
    """bench/realtime.py against the double: every session finishes, every turn completes, latencies are measured."""
    from bench import realtime

    out = tmp_path / "realtime.json"
    argv = ["--url", server.url, "--api-key", KEY, "--sessions", "1,2", "--turns", "2", "--ramp-seconds", "0.2"]
    argv += [
        "--wav",
        str(Path(__file__).resolve().parent / "fixtures" / "samples" / "ds_LDC93S1.wav"),
        "--json",
        str(out),
    ]
    assert realtime.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["turns_completed"] for row in rows] == [2, 4]
    for row in rows:
        assert row["turns_failed"] == 0 and not row["errors"]
        assert 0 < row["first_delta_p50_s"] < 5 and 0 < row["final_after_end_of_speech_p95_s"] < 2


def test_sessions_are_refused_while_the_model_loads(tmp_path: Path) -> None:
    process = ServerProcess.with_test_double(
        {"DECODE_WORKERS": "1", "DOUBLE_LOAD_DELAY": "60"}, tmp_path / "server.log"
    )
    try:
        process.wait_until_answering(timeout=60)

        async def scenario() -> tuple[dict[str, Any], int | None]:
            async with websockets.connect(ws_url(process)) as ws:
                refusal = json.loads(await ws.recv())
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                return refusal, closed.value.rcvd.code if closed.value.rcvd else None

        refusal, code = asyncio.run(scenario())
        assert refusal["type"] == "error" and refusal["error"]["code"] == "engine_unavailable"
        assert code == 1013
        text = metrics(process)
        assert metric_value(text, 'qwenasr_live_sessions_total{reason="rejected"}') == 1
        assert metric_value(text, 'qwenasr_live_sessions_rejected_total{reason="engine_unavailable"}') == 1
    finally:
        process.stop()
