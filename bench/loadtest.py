"""Overload test: drive the appliance past its configured concurrency and account for every request.

An async client (httpx) sends `--requests` requests, or fewer when `--duration` seconds pass first (the
cap also bounds each request), then waits for the answers. Closed loop by default: `--concurrency`
workers each send their next request as soon as the previous one is answered (a client that ignores
Retry-After and hammers). With `--rate R`, open loop: a request starts every 1/R seconds, whatever the
answers, with at most `--concurrency` in flight (arrivals like independent users'). Every request ends
in exactly one bucket:

* accepted: 200 with a complete, parseable transcription
* rejected: 429 with a `Retry-After` header (the admission queue was full or the wait too long)
* unavailable: 503 with a `Retry-After` header (engine loading or restarting, server shutting down)
* errors: any other HTTP answer (including 429/503 without `Retry-After`): by status code
* lost: no HTTP answer at all (connection refused or reset, timeout, truncated body): by exception

Reported: those counts, latency p50/p95/max of accepted requests (upload start to last byte), and,
with `--pid` (a local server's process id), the RSS of that process and all its descendants (the
granian worker, the decode workers) before the run, at its peak (sampled every 50 ms) and after.

    python -m bench.loadtest --url http://127.0.0.1:8001 --concurrency 32 --requests 500 --duration 120 \
        [--rate 20] [--model Qwen/Qwen3-ASR-1.7B] [--file speech.wav] [--pid 1234] [--api-key KEY] [--json]

Exit status: 0 when nothing was lost and nothing unexpected came back, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import sys
import time
import wave
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"


@dataclass(frozen=True)
class LoadConfig:
    url: str
    model: str = "Qwen/Qwen3-ASR-1.7B"
    concurrency: int = 8
    requests: int = 100
    rate: float | None = None  # requests started per second (open loop); None: closed loop
    duration: float = 60.0  # seconds: no request starts after this, and none waits longer
    audio: bytes = b""
    filename: str = "load.wav"
    pid: int | None = None
    api_key: str | None = None


@dataclass
class LoadReport:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    unavailable: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    not_sent: int = 0  # requests the duration cap left unsent
    wall_seconds: float = 0.0
    latency_p50: float | None = None
    latency_p95: float | None = None
    latency_max: float | None = None
    rejected_latency_max: float | None = None
    retry_after_values: dict[str, int] = field(default_factory=dict)
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_after_mib: float | None = None

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def answered(self) -> int:
        return self.accepted + self.rejected + self.unavailable + self.errors_total

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lost_total": self.lost_total, "errors_total": self.errors_total}


def tone_wav(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    """A 16-bit mono WAV of a modulated tone (no numpy needed)."""
    frames = bytearray()
    for i in range(int(seconds * rate)):
        t = i / rate
        value = 0.3 * math.sin(2 * math.pi * 220 * t) * (0.6 + 0.4 * math.sin(2 * math.pi * 3 * t))
        frames += int(value * 32767).to_bytes(2, "little", signed=True)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(bytes(frames))
    return out.getvalue()


def percentile(values: list[float], share: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            pending += [int(child) for child in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
    return found


def _proc_rss_bytes(pid: int) -> int:
    """RSS of `pid` and all its descendants, from /proc (0 when the process is gone)."""
    total = 0
    for one in _descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


async def _sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _proc_rss_bytes(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


def _classify(report: LoadReport, response: httpx.Response, latency: float, latencies: list[float]) -> None:
    status = response.status_code
    retry_after = response.headers.get("retry-after")
    if status == 200:
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError):
            report.lost["truncated_or_unparseable_200"] = report.lost.get("truncated_or_unparseable_200", 0) + 1
            return
        if not isinstance(text, str):
            report.errors["200_without_text"] = report.errors.get("200_without_text", 0) + 1
            return
        report.accepted += 1
        latencies.append(latency)
    elif status in (429, 503) and retry_after and retry_after.isdigit() and int(retry_after) >= 1:
        if status == 429:
            report.rejected += 1
            report.rejected_latency_max = max(report.rejected_latency_max or 0.0, latency)
        else:
            report.unavailable += 1
        report.retry_after_values[retry_after] = report.retry_after_values.get(retry_after, 0) + 1
    else:
        key = f"{status}" + ("" if status not in (429, 503) else "_without_retry_after")
        report.errors[key] = report.errors.get(key, 0) + 1


async def run_load(config: LoadConfig) -> LoadReport:
    """Run one overload test; see the module docstring."""
    report = LoadReport()
    audio = config.audio or tone_wav()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    latencies: list[float] = []
    lost: Counter[str] = Counter()
    stop_sampling = asyncio.Event()
    peak = [0]
    sampler: asyncio.Task[None] | None = None
    if config.pid is not None:
        report.rss_before_mib = _proc_rss_bytes(config.pid) / 2**20
        sampler = asyncio.create_task(_sample_rss(config.pid, peak, stop_sampling))

    started = time.monotonic()
    deadline = started + config.duration
    next_index = 0
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    timeout = httpx.Timeout(config.duration, connect=10.0)

    async with httpx.AsyncClient(base_url=config.url, limits=limits, timeout=timeout, headers=headers) as client:

        async def one() -> None:
            files = {"file": (config.filename, audio, "audio/wav")}
            begun = time.monotonic()
            try:
                response = await client.post(TRANSCRIPTIONS_PATH, files=files, data={"model": config.model})
            except httpx.HTTPError as exc:
                lost[type(exc).__name__] += 1
                return
            _classify(report, response, time.monotonic() - begun, latencies)

        async def worker() -> None:
            nonlocal next_index
            while next_index < config.requests and time.monotonic() < deadline:
                next_index += 1
                report.sent += 1
                await one()

        async def arrivals(rate: float) -> None:
            in_flight = asyncio.Semaphore(config.concurrency)
            tasks: list[asyncio.Task[None]] = []

            async def limited() -> None:
                try:
                    await one()
                finally:
                    in_flight.release()

            for index in range(config.requests):
                start = started + index / rate
                if start >= deadline:
                    break
                await asyncio.sleep(max(0.0, start - time.monotonic()))
                await in_flight.acquire()
                report.sent += 1
                tasks.append(asyncio.create_task(limited()))
            await asyncio.gather(*tasks)

        if config.rate:
            await arrivals(config.rate)
        else:
            await asyncio.gather(*(worker() for _ in range(config.concurrency)))

    report.wall_seconds = time.monotonic() - started
    report.not_sent = config.requests - report.sent
    report.lost = dict(lost)
    if latencies:
        report.latency_p50 = percentile(latencies, 0.50)
        report.latency_p95 = percentile(latencies, 0.95)
        report.latency_max = max(latencies)
    if sampler is not None and config.pid is not None:
        stop_sampling.set()
        await sampler
        report.rss_after_mib = _proc_rss_bytes(config.pid) / 2**20
        report.rss_peak_mib = max(peak[0], _proc_rss_bytes(config.pid)) / 2**20
    return report


def _fmt(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.3f} {unit}" if unit == "s" else f"{value:.1f} {unit}"


def render(report: LoadReport, config: LoadConfig) -> str:
    lines = [
        f"overload test: {config.url}, concurrency {config.concurrency}, {config.requests} requests, "
        + (f"{config.rate:g}/s open loop, " if config.rate else "closed loop, ")
        + f"cap {config.duration:g} s",
        f"  sent {report.sent} (not sent: {report.not_sent}) in {report.wall_seconds:.2f} s",
        f"  accepted (200)     {report.accepted}",
        f"  rejected (429)     {report.rejected}   Retry-After seen: {report.retry_after_values or '-'}",
        f"  unavailable (503)  {report.unavailable}",
        f"  errors             {report.errors_total} {report.errors or ''}",
        f"  lost               {report.lost_total} {report.lost or ''}",
        f"  accepted latency   p50 {_fmt(report.latency_p50)}, p95 {_fmt(report.latency_p95)}, "
        f"max {_fmt(report.latency_max)}; slowest 429 {_fmt(report.rejected_latency_max)}",
    ]
    if report.rss_before_mib is not None:
        lines.append(
            f"  server RSS         before {_fmt(report.rss_before_mib, 'MiB')}, peak "
            f"{_fmt(report.rss_peak_mib, 'MiB')}, after {_fmt(report.rss_after_mib, 'MiB')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8001")
    parser.add_argument("--model", default=LoadConfig.model)
    parser.add_argument("--concurrency", type=int, default=LoadConfig.concurrency, help="requests kept in flight")
    parser.add_argument("--requests", type=int, default=LoadConfig.requests, help="requests to send at most")
    parser.add_argument("--rate", type=float, help="open loop: requests started per second (default: closed loop)")
    parser.add_argument("--duration", type=float, default=LoadConfig.duration, help="time cap in seconds")
    parser.add_argument("--file", type=Path, help="audio file to send (default: a generated 1 s WAV)")
    parser.add_argument("--pid", type=int, help="local server process id: report its RSS (with descendants)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        parser.error("--concurrency and --requests must be at least 1, --duration positive")
    config = LoadConfig(
        url=args.url.rstrip("/"),
        model=args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        rate=args.rate,
        duration=args.duration,
        audio=args.file.read_bytes() if args.file else b"",
        filename=args.file.name if args.file else "load.wav",
        pid=args.pid,
        api_key=args.api_key,
    )
    report = asyncio.run(run_load(config))
    print(render(report, config), file=sys.stderr)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.lost_total == 0 and report.errors_total == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
