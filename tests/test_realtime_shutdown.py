"""Live sessions across a graceful shutdown: SIGTERM to a real granian process while real clients (the
OpenAI SDK's realtime client) hold committed turns, buffered audio and an open server-VAD turn.

granian 2.8.7 alone hands `websocket.disconnect` to the app within milliseconds of the signal, drops what
the app sends after it and closes the TCP connection at exit without a close frame (the client sees
1006): the transcripts of the last turns were lost. The app takes the signal from granian
(api/shutdown.py) and lets granian stop only when the sessions are done, so a client gets: the audio the
session held committed as a last turn, `session_closed` errors for events sent after that, every turn's
`...completed` (or `...failed` `server_shutting_down` when the grace period is too short), then `error`
`server_shutting_down` and close 1001, all within SHUTDOWN_GRACE_SECONDS; the process exits 0 before
granian's kill. Both event loops granian may pick are covered: uvloop (the appliance's own granian
configuration, where vLLM installs uvloop) and asyncio's (`--loop asyncio`, the CPU image without uvloop).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.hardening import metric_value
from tests.realtime_support import b64, client, expected_words, of_type, pcm16, recv, recv_until, silence, speech
from tests.servers import ServerProcess
from tests.test_faults import assert_worker_stopped_on_its_own

pytestmark = pytest.mark.slow

WPS = 2.0
TRANSCRIPTION = {"intent": "transcription"}
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"
Launch = Callable[[dict[str, str], Path], ServerProcess]
LAUNCHES: dict[str, Launch] = {
    "appliance-granian-uvloop": ServerProcess.product_with_test_double,
    "granian-asyncio-loop": lambda env, log: ServerProcess.with_test_double(env, log, "--loop", "asyncio"),
}


def start(launch: Launch, tmp_path: Path, **env: str) -> ServerProcess:
    base = {
        "DOUBLE_WORDS_PER_SECOND": str(WPS),
        "DECODE_WORKERS": "1",
        "LIVE_PARTIAL_INTERVAL_SECONDS": "0",  # finals only: every engine call is one the test waits for
    }
    server = launch({**base, **env}, tmp_path / "server.log")
    server.wait_until("/ready", timeout=60)
    return server


async def until_closed(conn: Any, timeout: float = 30.0) -> tuple[list[dict[str, Any]], int | None, float]:  # noqa: ASYNC109
    """Every event up to the close, the close code the server sent, and when the close came (monotonic)."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            events.append(await recv(conn, max(0.1, deadline - time.monotonic())))
        except ConnectionClosed as closed:
            return events, closed.rcvd.code if closed.rcvd else None, time.monotonic()


async def manual_session_with_buffered_audio(conn: Any) -> str:
    """Manual commits: a committed turn of 3 s, then 2 s more in the buffer. Returns the first item id."""
    await recv(conn)  # session.created
    await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})  # type: ignore[typeddict-item]
    await recv(conn)
    voice = pcm16(speech())
    await conn.input_audio_buffer.append(audio=b64(voice[: 24_000 * 2 * 3]))
    await conn.input_audio_buffer.commit()
    await conn.input_audio_buffer.append(audio=b64(voice[24_000 * 2 * 3 : 24_000 * 2 * 5]))
    committed = (await recv_until(conn, "input_audio_buffer.committed"))[-1]
    # Events are taken in order: once this is answered, the server holds the 2 s appended before it.
    await conn.session.update(session={"type": "transcription"})
    await recv_until(conn, "session.updated")
    return str(committed["item_id"])


def assert_every_turn_has_one_final(events: list[dict[str, Any]]) -> None:
    """No open turn left behind, no committed turn without its final event, no final event twice."""
    committed = [e["item_id"] for e in of_type(events, "input_audio_buffer.committed")]
    finals = [e["item_id"] for e in events if e["type"] in {COMPLETED, FAILED}]
    assert sorted(committed) == sorted(finals) and len(set(finals)) == len(finals), [e["type"] for e in events]
    started = {e["item_id"] for e in of_type(events, "input_audio_buffer.speech_started")}
    assert started <= set(committed)
    for event in of_type(events, COMPLETED):  # the engine gets at least 0.5 s (padded): one word
        assert event["transcript"] == expected_words(max(0.5, event["usage"]["seconds"]), WPS)


def assert_ends_with_shutdown(events: list[dict[str, Any]], code: int | None) -> None:
    last = events[-1]
    assert last["type"] == "error", [e["type"] for e in events[-5:]]
    assert last["error"]["code"] == "server_shutting_down" and last["error"]["type"] == "server_error"
    assert code == 1001  # going away: reconnect (through the load balancer) to another replica


@pytest.mark.parametrize("launch", list(LAUNCHES), ids=list(LAUNCHES))
def test_sigterm_lets_live_sessions_finish_their_turns_then_closes_them(tmp_path: Path, launch: str) -> None:
    grace = 15.0
    # 0.25 s per word: the 3 s turn takes 1.5 s to transcribe, the 2 s buffered one 1 s.
    server = start(LAUNCHES[launch], tmp_path, DOUBLE_TOKEN_DELAY="0.25", SHUTDOWN_GRACE_SECONDS=str(grace))

    async def streaming_vad_session(
        conn: Any, ready: asyncio.Event, signalled: asyncio.Event
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Server VAD, speech streamed in real time without end: a turn is open at SIGTERM, and the client
        goes on streaming, as a microphone does, until the server closes."""
        await recv(conn)
        voice = pcm16(speech())
        sent_before_signal = asyncio.Event()

        async def stream() -> None:
            try:
                for start_byte in range(0, len(voice), 4_800):  # 100 ms pieces, every 100 ms
                    await conn.input_audio_buffer.append(audio=b64(voice[start_byte : start_byte + 4_800]))
                    if signalled.is_set():
                        sent_before_signal.set()
                    await asyncio.sleep(0.1)
            except ConnectionClosed:
                pass

        sender = asyncio.create_task(stream())
        events = await recv_until(conn, "input_audio_buffer.speech_started")
        ready.set()
        more, code, _closed_at = await until_closed(conn)
        sender.cancel()
        assert sent_before_signal.is_set(), "the client did not stream past the signal"
        return events + more, code

    async def refused_while_draining() -> tuple[dict[str, Any], int | None]:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/v1/realtime") as ws:
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 10))
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as closed:
                return refusal, closed.rcvd.code if closed.rcvd else None
        raise AssertionError("the refused session was not closed")

    async def scenario() -> dict[str, Any]:
        ready, signalled = asyncio.Event(), asyncio.Event()
        async with (
            client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as manual,
            client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as vad,
        ):
            first_item = await manual_session_with_buffered_audio(manual)
            streaming = asyncio.create_task(streaming_vad_session(vad, ready, signalled))
            await asyncio.wait_for(ready.wait(), 20)
            sent_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            signalled.set()
            manual_result = asyncio.create_task(until_closed(manual))
            await asyncio.sleep(0.3)
            refusal, refusal_code = await refused_while_draining()
            # granian still serves HTTP while the sessions wind down: /metrics shows the refusal.
            scraped = await asyncio.to_thread(httpx.get, server.url + "/metrics", timeout=5)
            readiness = await asyncio.to_thread(httpx.get, server.url + "/ready", timeout=5)
            manual_events, manual_code, manual_closed_at = await manual_result
            vad_events, vad_code = await streaming
        return {
            "first_item": first_item,
            "manual": (manual_events, manual_code, manual_closed_at - sent_at),
            "vad": (vad_events, vad_code),
            "refusal": (refusal, refusal_code),
            "metrics": scraped.text,
            "ready": readiness,
            "sent_at": sent_at,
        }

    try:
        result = asyncio.run(scenario())
        exit_code = server.process.wait(grace + 15)
        exited_after = time.monotonic() - result["sent_at"]
    finally:
        server.stop()
    logs = server.logs()

    manual_events, manual_code, manual_closed_after = result["manual"]
    # The 2 s in the buffer became a last turn after the committed one, and both were transcribed.
    (last_commit,) = of_type(manual_events, "input_audio_buffer.committed")
    assert last_commit["previous_item_id"] == result["first_item"]
    completed = {e["item_id"]: e for e in of_type(manual_events, COMPLETED)}
    assert completed[result["first_item"]]["usage"]["seconds"] == pytest.approx(3.0, abs=0.01)
    assert completed[result["first_item"]]["transcript"] == expected_words(3.0, WPS)
    assert completed[last_commit["item_id"]]["usage"]["seconds"] == pytest.approx(2.0, abs=0.01)
    assert completed[last_commit["item_id"]]["transcript"] == expected_words(2.0, WPS)
    assert not of_type(manual_events, FAILED)
    assert_ends_with_shutdown(manual_events, manual_code)
    assert manual_closed_after < grace

    vad_events, vad_code = result["vad"]
    assert_every_turn_has_one_final(vad_events)
    stopped = of_type(vad_events, "input_audio_buffer.speech_stopped")
    assert stopped and of_type(vad_events, COMPLETED)
    # Appends that came after the session stopped taking audio were each refused, not dropped unseen.
    refused = [e for e in of_type(vad_events, "error") if e["error"]["code"] == "session_closed"]
    assert refused and vad_events.index(refused[0]) > vad_events.index(stopped[-1])
    assert_ends_with_shutdown(vad_events, vad_code)

    refusal, refusal_code = result["refusal"]
    assert refusal["type"] == "error" and refusal["error"]["code"] == "server_shutting_down"
    assert refusal_code == 1013
    assert metric_value(result["metrics"], 'qwenasr_live_sessions_rejected_total{reason="server_shutting_down"}') == 1
    assert metric_value(result["metrics"], "qwenasr_live_sessions_active") >= 1  # the manual one, at least

    # Not ready while draining: a probe (or a load balancer) sees the server takes no new work.
    assert result["ready"].status_code == 503
    assert result["ready"].json()["reason"].startswith("the server is shutting down")

    assert exit_code == 0
    assert exited_after < grace, "the live sessions held the shutdown past the grace period"
    assert logs.count('"reason": "shutdown", "seconds"') == 2  # live.session_ended of both sessions
    # granian was told to stop only after the sessions had ended (it would have cut them).
    assert logs.rindex('"event": "live.session_ended"') < logs.index('"event": "shutdown.server_stopping"')
    assert "live_sessions_cut" not in logs and "live_wind_down_unavailable" not in logs
    assert_worker_stopped_on_its_own(logs)
    print(f"{launch}: manual session closed {manual_closed_after:.2f} s after SIGTERM, exit after {exited_after:.2f} s")


def test_a_turn_outlasting_the_grace_period_fails_with_server_shutting_down(tmp_path: Path) -> None:
    grace = 2.0
    # 1 s per word: the 3 s turn would take 6 s, far past the grace period.
    server = start(
        LAUNCHES["appliance-granian-uvloop"], tmp_path, DOUBLE_TOKEN_DELAY="1.0", SHUTDOWN_GRACE_SECONDS=str(grace)
    )

    async def scenario() -> tuple[str, list[dict[str, Any]], int | None, float, float]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            first_item = await manual_session_with_buffered_audio(conn)
            sent_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            events, code, closed_at = await until_closed(conn)
            return first_item, events, code, closed_at - sent_at, sent_at

    try:
        first_item, events, code, closed_after, sent_at = asyncio.run(scenario())
        exit_code = server.process.wait(grace + 15)
        exited_after = time.monotonic() - sent_at
    finally:
        server.stop()

    # Both turns, the one being transcribed and the buffered one committed at SIGTERM, fail explicitly.
    (last_commit,) = of_type(events, "input_audio_buffer.committed")
    failed = of_type(events, FAILED)
    assert [e["item_id"] for e in failed] == [first_item, last_commit["item_id"]]
    assert all(e["error"]["code"] == "server_shutting_down" and e["error"]["type"] == "server_error" for e in failed)
    assert not of_type(events, COMPLETED)
    assert_ends_with_shutdown(events, code)
    assert closed_after < grace
    assert exit_code == 0
    assert exited_after < grace + 3, "the process did not exit soon after the grace period"
    logs = server.logs()
    assert '"event": "shutdown.server_stopping"' in logs
    assert_worker_stopped_on_its_own(logs)
    print(f"closed {closed_after:.2f} s after SIGTERM with a {grace:g} s grace period, exit after {exited_after:.2f} s")


def test_a_session_that_ends_by_its_length_transcribes_its_buffer(tmp_path: Path) -> None:
    """The session-length ending winds down the same way: the audio held is a last turn, then close 1000."""
    server = start(LAUNCHES["appliance-granian-uvloop"], tmp_path, LIVE_MAX_SESSION_SECONDS="2")

    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            await recv(conn)
            await conn.session.update(session={"type": "transcription", "audio": {"input": {"turn_detection": None}}})  # type: ignore[typeddict-item]
            await recv(conn)
            await conn.input_audio_buffer.append(audio=b64(pcm16(speech()[: 24_000 * 1])))  # never committed
            events, code, _closed_at = await until_closed(conn)
            return events, code

    try:
        events, code = asyncio.run(scenario())
    finally:
        server.stop()
    (committed,) = of_type(events, "input_audio_buffer.committed")
    (completed,) = of_type(events, COMPLETED)
    assert completed["item_id"] == committed["item_id"]
    assert completed["usage"]["seconds"] == pytest.approx(1.0, abs=0.01)
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "session_expired"
    assert code == 1000


def test_silence_never_makes_a_turn(tmp_path: Path) -> None:
    """Server VAD while nobody speaks: the look-back the session keeps is not a turn; SIGTERM then sends
    no committed event, only the shutdown error and the close."""
    server = start(LAUNCHES["appliance-granian-uvloop"], tmp_path, SHUTDOWN_GRACE_SECONDS="5")

    async def scenario() -> tuple[list[dict[str, Any]], int | None]:
        async with client(server.url).realtime.connect(extra_query=TRANSCRIPTION) as conn:
            await recv(conn)
            await conn.input_audio_buffer.append(audio=b64(pcm16(silence(2.0))))
            await conn.session.update(session={"type": "transcription"})
            await recv_until(conn, "session.updated")
            server.process.send_signal(signal.SIGTERM)
            events, code, _closed_at = await until_closed(conn)
            return events, code

    try:
        events, code = asyncio.run(scenario())
        assert server.process.wait(20) == 0
    finally:
        server.stop()
    assert [e["type"] for e in events] == ["error"]
    assert_ends_with_shutdown(events, code)
