"""Live transcription under load: N concurrent sessions each streaming a WAV in real time.

Every session connects to `/v1/realtime?intent=transcription`, keeps the default server VAD, and sends
the recording `--turns` times (each followed by `--pause-seconds` of silence, so the VAD ends every turn)
in 100 ms appends paced by the wall clock, as a microphone would. Session starts are spread over
`--ramp-seconds`. For every turn it records, on the client's clock:

* time to first delta: the first `conversation.item.input_audio_transcription.delta` of the turn minus
  the moment the audio at speech start was sent (`audio_start_ms` + the prefix padding, i.e. where the
  VAD heard speech begin, mapped onto the send times of the appends);
* final latency after end of speech: the turn's `...completed` minus the moment the audio at
  `audio_end_ms` (the VAD's end of speech, which includes the silence rule) was sent; also reported from
  the arrival of `input_audio_buffer.speech_stopped`.

Per N: sessions that ran to the end, turns completed and failed, error events, p50/p95 of both latencies,
and at the end the largest N whose final-latency p95 stays under `--target-seconds` (1 s).

`--protocol vllm` drives vLLM's own `/v1/realtime` for comparison (its own events: `session.update`
with `model`, an opening `input_audio_buffer.commit`, appends of 16 kHz PCM16, a closing commit with
`final: true`, then `transcription.delta` / `transcription.done`; no VAD, so one turn per session and the
latency is counted from the closing commit). That client follows vLLM 0.26's realtime protocol as
documented; check it against the server in the same lease.

    python -m bench.realtime --url http://127.0.0.1:8001 --sessions 16,64,256 [--wav speech.wav]
        [--turns 3] [--api-key KEY] [--json results.json] [--protocol appliance|vllm --model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import websockets

DEFAULT_WAV = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "samples" / "wcpp_jfk.wav"
PIECE_SECONDS = 0.1
PREFIX_PADDING_MS = 300  # the server's default server_vad prefix padding


@dataclass
class Turn:
    item_id: str
    audio_start_ms: int = 0
    audio_end_ms: int | None = None
    first_delta_at: float | None = None
    stopped_at: float | None = None
    completed_at: float | None = None
    failed: bool = False


@dataclass
class SessionResult:
    turns: dict[str, Turn] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    finished: bool = False
    send_times: list[tuple[float, float]] = field(default_factory=list)  # (audio ms at the piece's start, wall time)

    def sent_at(self, audio_ms: float) -> float | None:
        """Wall time at which the audio at `audio_ms` was sent (the piece that held it)."""
        starts = [ms for ms, _ in self.send_times]
        index = bisect.bisect_right(starts, audio_ms) - 1
        return self.send_times[index][1] if index >= 0 else None


def load_pcm(path: Path, rate: int) -> bytes:
    data, source_rate = sf.read(path, dtype="float32", always_2d=True)
    mono = soxr.resample(data.mean(axis=1), source_rate, rate)
    return (np.clip(mono, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def _stream(ws: Any, audio: bytes, rate: int, result: SessionResult) -> None:
    piece = int(rate * PIECE_SECONDS) * 2
    started = time.perf_counter()
    for index, offset in enumerate(range(0, len(audio), piece)):
        due = started + index * PIECE_SECONDS
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        result.send_times.append((index * PIECE_SECONDS * 1000, time.perf_counter()))
        chunk = base64.b64encode(audio[offset : offset + piece]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))


async def appliance_session(
    url: str, headers: dict[str, str], audio: bytes, turns: int, limit_seconds: float
) -> SessionResult:
    result = SessionResult()
    async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=60) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if first["type"] != "session.created":
            result.errors.append(first.get("error", {}).get("code", first["type"]))
            return result
        sender = asyncio.create_task(_stream(ws, audio, 24_000, result))
        try:
            async with asyncio.timeout(limit_seconds):
                done = 0
                while done < turns:
                    event = json.loads(await ws.recv())
                    now = time.perf_counter()
                    kind, item = event["type"], event.get("item_id", "")
                    turn = result.turns.setdefault(item, Turn(item)) if item else None
                    if kind == "input_audio_buffer.speech_started" and turn:
                        turn.audio_start_ms = event["audio_start_ms"]
                    elif kind == "input_audio_buffer.speech_stopped" and turn:
                        turn.audio_end_ms, turn.stopped_at = event["audio_end_ms"], now
                    elif kind == "conversation.item.input_audio_transcription.delta" and turn:
                        turn.first_delta_at = turn.first_delta_at or now
                    elif kind == "conversation.item.input_audio_transcription.completed" and turn:
                        turn.completed_at, done = now, done + 1
                    elif kind == "conversation.item.input_audio_transcription.failed" and turn:
                        turn.failed, done = True, done + 1
                    elif kind == "error":
                        result.errors.append(event["error"].get("code") or "error")
            result.finished = True
        except TimeoutError:
            result.errors.append("client_timeout")
        finally:
            sender.cancel()
    return result


async def vllm_session(
    url: str, headers: dict[str, str], audio: bytes, model: str, limit_seconds: float
) -> SessionResult:
    result = SessionResult()
    turn = Turn("vllm")
    result.turns[turn.item_id] = turn
    async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=60) as ws:
        await asyncio.wait_for(ws.recv(), 60)  # session.created
        await ws.send(json.dumps({"type": "session.update", "model": model}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await _stream(ws, audio, 16_000, result)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        turn.stopped_at = time.perf_counter()
        turn.audio_end_ms = int(len(audio) / 2 / 16)
        try:
            async with asyncio.timeout(limit_seconds):
                while turn.completed_at is None:
                    event = json.loads(await ws.recv())
                    now = time.perf_counter()
                    if event["type"] == "transcription.delta":
                        turn.first_delta_at = turn.first_delta_at or now
                    elif event["type"] == "transcription.done":
                        turn.completed_at = now
                    elif event["type"] == "error":
                        result.errors.append(str(event.get("error", "error"))[:80])
                        turn.failed = True
                        break
            result.finished = True
        except TimeoutError:
            result.errors.append("client_timeout")
    return result


def summarize(
    sessions: int, results: list[SessionResult | BaseException], protocol: str, target: float
) -> dict[str, Any]:
    first_delta: list[float] = []
    final_after_audio: list[float] = []
    final_after_stopped: list[float] = []
    completed = failed = 0
    errors: dict[str, int] = {}
    finished = 0
    for result in results:
        if isinstance(result, BaseException):
            errors[type(result).__name__] = errors.get(type(result).__name__, 0) + 1
            continue
        finished += result.finished
        for error in result.errors:
            errors[error] = errors.get(error, 0) + 1
        for turn in result.turns.values():
            failed += turn.failed
            if turn.completed_at is None:
                continue
            completed += 1
            if protocol == "vllm":
                speech_sent = result.send_times[0][1] if result.send_times else None
                end_sent = turn.stopped_at
            else:
                speech_sent = result.sent_at(turn.audio_start_ms + PREFIX_PADDING_MS)
                end_sent = result.sent_at(turn.audio_end_ms) if turn.audio_end_ms is not None else None
            if turn.first_delta_at is not None and speech_sent is not None:
                first_delta.append(turn.first_delta_at - speech_sent)
            if end_sent is not None:
                final_after_audio.append(turn.completed_at - end_sent)
            if turn.stopped_at is not None:
                final_after_stopped.append(turn.completed_at - turn.stopped_at)
    p95 = percentile(final_after_audio, 95)
    return {
        "protocol": protocol,
        "sessions": sessions,
        "sessions_finished": finished,
        "turns_completed": completed,
        "turns_failed": failed,
        "errors": errors,
        "first_delta_p50_s": percentile(first_delta, 50),
        "first_delta_p95_s": percentile(first_delta, 95),
        "final_after_end_of_speech_p50_s": percentile(final_after_audio, 50),
        "final_after_end_of_speech_p95_s": p95,
        "final_after_speech_stopped_p50_s": percentile(final_after_stopped, 50),
        "final_after_speech_stopped_p95_s": percentile(final_after_stopped, 95),
        "meets_target": p95 is not None and p95 < target and finished == sessions and not failed,
    }


async def run_level(args: argparse.Namespace, sessions: int, audio: bytes) -> dict[str, Any]:
    base = args.url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(sessions)
    timeout = len(audio) / (48_000 if args.protocol == "appliance" else 32_000) + 120

    async def one(delay: float) -> SessionResult:
        await asyncio.sleep(delay)
        if args.protocol == "vllm":
            return await vllm_session(f"{base}/v1/realtime", headers, audio, args.model, timeout)
        return await appliance_session(f"{base}/v1/realtime?intent=transcription", headers, audio, args.turns, timeout)

    started = time.perf_counter()
    results = await asyncio.gather(
        *(one(rng.uniform(0, args.ramp_seconds)) for _ in range(sessions)), return_exceptions=True
    )
    summary = summarize(sessions, list(results), args.protocol, args.target_seconds)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    return summary


def build_audio(args: argparse.Namespace) -> bytes:
    rate = 24_000 if args.protocol == "appliance" else 16_000
    speech = load_pcm(Path(args.wav), rate)
    pause = bytes(int(rate * args.pause_seconds) * 2)
    turns = args.turns if args.protocol == "appliance" else 1
    return (speech + pause) * turns


def _fmt(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8001")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--sessions", default="16,64,256", help="comma-separated session counts")
    parser.add_argument("--wav", default=str(DEFAULT_WAV))
    parser.add_argument("--turns", type=int, default=2, help="times each session sends the recording")
    parser.add_argument("--pause-seconds", type=float, default=1.5, help="silence after each utterance")
    parser.add_argument("--ramp-seconds", type=float, default=2.0)
    parser.add_argument("--target-seconds", type=float, default=1.0)
    parser.add_argument("--protocol", choices=["appliance", "vllm"], default="appliance")
    parser.add_argument("--model", default="Qwen/Qwen3-ASR-1.7B", help="for --protocol vllm")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    audio = build_audio(args)
    rows = []
    for sessions in (int(n) for n in args.sessions.split(",") if n.strip()):
        row = asyncio.run(run_level(args, sessions, audio))
        rows.append(row)
        print(
            f"N={sessions:>4} finished={row['sessions_finished']:>4} turns={row['turns_completed']:>5} "
            f"failed={row['turns_failed']} first-delta p50/p95={_fmt(row['first_delta_p50_s'])}/{_fmt(row['first_delta_p95_s'])} s "
            f"final p50/p95={_fmt(row['final_after_end_of_speech_p50_s'])}/{_fmt(row['final_after_end_of_speech_p95_s'])} s "
            f"errors={row['errors']}",
            flush=True,
        )
    passing = [row["sessions"] for row in rows if row["meets_target"]]
    best = max(passing) if passing else None
    print(f"largest N with final p95 < {args.target_seconds:g} s: {best if best is not None else 'none'}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "largest_n_meeting_target": best, "args": vars(args)}, indent=2)
        )
    return 0 if all(row["sessions_finished"] == row["sessions"] for row in rows) else 1


__all__ = ["SessionResult", "Turn", "asdict", "main", "percentile", "summarize"]

if __name__ == "__main__":
    sys.exit(main())
