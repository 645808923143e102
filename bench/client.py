"""The load client: the same code drives the appliance and `vllm serve`.

A run sends a list of audio files to `POST {base}/v1/audio/transcriptions` (OpenAI multipart) from a
fixed number of concurrent workers; each worker sends its next file as soon as its previous answer is
read (closed loop). Per request it records the latency (upload start to last byte of the answer) and
the outcome; per run the wall time from the first send to the last answer.

* throughput = audio seconds of the successful requests / wall seconds
* p50 / p95 latency: linear interpolation between order statistics (numpy's default)
* errors: transport errors and non-200 answers, counted by kind

The only differences between servers are the base URL and the extra form fields a server needs to fix
the output length (for `vllm serve`: `max_completion_tokens`). Files are read into memory before the
clock starts; the multipart body is assembled per request (a byte join).

`scrape_metrics`, `token_stats` and `stage_stats` read Prometheus text from `/metrics` before and after a
run: vLLM's own counters (both servers expose them) give the generated tokens per engine request and how
requests finished, the appliance's `qwenasr_stage_duration_seconds` gives its per-stage times.

`measured_run` also samples the kernel-busy % of every GPU this machine's CUDA_VISIBLE_DEVICES shows
(`bench.gpu_busy`, NVML) from the first send to the last answer, as `gpu_busy`: meaningful when the
client runs on the servers' machine (as `run_all.py` runs it); "not available" where there is no NVML.

Command line (one run, JSON summary on stdout):
    python -m bench.client --url http://127.0.0.1:8001 --model qwen3-asr --format mp3 --concurrency 16 \
        --requests 32 [--field max_completion_tokens=100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.gpu_busy import DEFAULT_INTERVAL_SECONDS, GpuBusySampler
from bench.workload import AudioItem, clip_specs, ensure

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
STAGES = ("decode", "queue", "engine", "response")


@dataclass(frozen=True)
class Target:
    """A server under test."""

    system: str  # "appliance" or "vllm"
    base_url: str
    model: str
    fields: Mapping[str, str] = field(default_factory=dict)  # extra form fields, e.g. max_completion_tokens
    api_key: str | None = None

    def form_fields(self) -> dict[str, str]:
        return {"model": self.model, "response_format": "json", "temperature": "0", **self.fields}


@dataclass(frozen=True)
class RequestResult:
    index: int
    audio_seconds: float
    started: float  # seconds after the run started
    latency: float  # seconds
    status: int  # HTTP status; 0 for a transport error
    error: str  # "" when the request succeeded
    text_chars: int = 0


@dataclass
class LoadResult:
    system: str
    fmt: str
    concurrency: int
    results: list[RequestResult]
    wall_seconds: float
    client_cpu_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"system": self.system, "format": self.fmt, "concurrency": self.concurrency}
        out.update(summarize(self.results, self.wall_seconds))
        out["client_cpu_fraction"] = round(self.client_cpu_seconds / self.wall_seconds, 3) if self.wall_seconds else 0.0
        out.update(self.extra)
        return out


# -- statistics --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics; nan when empty."""
    if not values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError("q must be in [0, 100]")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def summarize(results: Sequence[RequestResult], wall_seconds: float) -> dict[str, Any]:
    """Throughput, latency percentiles and error counts of one run."""
    ok = [r for r in results if not r.error]
    latencies = [r.latency for r in ok]
    audio = sum(r.audio_seconds for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": errors,
        "audio_seconds": round(audio, 3),
        "wall_seconds": round(wall_seconds, 4),
        "throughput": round(audio / wall_seconds, 2) if wall_seconds > 0 else 0.0,  # audio s per wall s
        "requests_per_second": round(len(ok) / wall_seconds, 3) if wall_seconds > 0 else 0.0,
        "p50": _round(percentile(latencies, 50)),
        "p95": _round(percentile(latencies, 95)),
        "mean": _round(sum(latencies) / len(latencies)) if latencies else None,
        "min": _round(min(latencies)) if latencies else None,
        "max": _round(max(latencies)) if latencies else None,
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


# -- the HTTP side -----------------------------------------------------------------------------------


def multipart_body(fields: Mapping[str, str], filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with `fields` and the audio in `file`; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
    )
    parts.append(data)
    parts.append(f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _error_kind(status: int, body: bytes) -> str:
    try:
        payload = json.loads(body)
        code = payload.get("error", {}).get("code") if isinstance(payload.get("error"), dict) else None
    except (ValueError, AttributeError):
        code = None
    return f"http_{status}" + (f"_{code}" if code else "")


async def run_load(
    target: Target,
    items: Sequence[AudioItem],
    concurrency: int,
    *,
    request_timeout: float = 600.0,
    fmt: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    gpu_sampler: GpuBusySampler | None = None,
) -> LoadResult:
    """Send every item once from `concurrency` closed-loop workers; returns every request's result.

    `transport` replaces the network (tests pass an `httpx.MockTransport`). `gpu_sampler` runs from the
    first send to the last answer (its record is `extra["gpu_busy"]`): reading the files and opening
    NVML happen before, so neither counts as GPU idle time.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    payloads = [(item, item.read()) for item in items]  # off the clock
    fields = target.form_fields()
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    results: list[RequestResult] = []
    next_index = iter(range(len(payloads)))
    workers = min(concurrency, len(payloads))
    # One client (one connection) per worker: httpx's shared pool costs O(connections) per request,
    # which at 256 connections would make the client, not the server, the bottleneck.
    clients = [
        httpx.AsyncClient(
            base_url=target.base_url,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=httpx.Timeout(request_timeout, connect=30.0),
            headers=headers,
            transport=transport,
        )
        for _ in range(workers)
    ]
    if gpu_sampler is not None:
        gpu_sampler.start()
    t0 = time.perf_counter()
    cpu0 = time.process_time()

    async def worker(client: httpx.AsyncClient) -> None:
        for index in next_index:
            item, data = payloads[index]
            body, content_type = multipart_body(fields, item.filename, item.content_type, data)
            start = time.perf_counter()
            status = 0
            text_chars = 0
            try:
                response = await client.post(TRANSCRIPTIONS_PATH, content=body, headers={"Content-Type": content_type})
                status = response.status_code
                if status == 200:
                    try:
                        text_chars = len(response.json().get("text", ""))
                        error = ""
                    except ValueError:
                        error = "bad_json"
                else:
                    error = _error_kind(status, response.content)
            except httpx.TimeoutException:
                error = "timeout"
            except httpx.HTTPError as exc:
                error = f"transport_{type(exc).__name__}"
            end = time.perf_counter()
            results.append(
                RequestResult(
                    index=index,
                    audio_seconds=item.seconds,
                    started=start - t0,
                    latency=end - start,
                    status=status,
                    error=error,
                    text_chars=text_chars,
                )
            )

    extra: dict[str, Any] = {}
    try:
        await asyncio.gather(*(worker(client) for client in clients))
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    finally:
        if gpu_sampler is not None:
            extra["gpu_busy"] = gpu_sampler.stop()
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
    results.sort(key=lambda r: r.index)
    return LoadResult(
        system=target.system,
        fmt=fmt or (items[0].fmt if items else ""),
        concurrency=concurrency,
        results=results,
        wall_seconds=wall,
        client_cpu_seconds=cpu,
        extra=extra,
    )


# -- Prometheus text ---------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition -> {(name, sorted labels): value}."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        label_items = tuple(sorted(_LABEL.findall(labels or "")))
        samples[(name, label_items)] = number
    return samples


async def scrape_metrics(base_url: str, *, api_key: str | None = None) -> Samples:
    """The server's `/metrics`, parsed; empty when it cannot be read."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10.0, headers=headers) as client:
            response = await client.get(base_url.rstrip("/") + "/metrics")
    except httpx.HTTPError:
        return {}
    return parse_metrics(response.text) if response.status_code == 200 else {}


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample named `name` whose labels include `labels`."""
    total = 0.0
    for (sample_name, sample_labels), value in samples.items():
        if sample_name != name:
            continue
        present = dict(sample_labels)
        if all(present.get(k) == v for k, v in labels.items()):
            total += value
    return total


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


def token_stats(before: Samples, after: Samples) -> dict[str, Any] | None:
    """vLLM's counters over a run: engine requests by finish reason, generated and prompt tokens.

    None when the server exposes no `vllm:` metrics.
    """
    if not any(name.startswith("vllm:") for name, _ in after):
        return None
    finished: dict[str, int] = {}
    reasons = {
        dict(labels).get("finished_reason", "") for name, labels in after if name == "vllm:request_success_total"
    }
    for reason in sorted(reasons):
        count = round(_delta(before, after, "vllm:request_success_total", finished_reason=reason))
        if count:
            finished[reason] = count
    engine_requests = sum(finished.values())
    generated = round(_delta(before, after, "vllm:generation_tokens_total"))
    return {
        "engine_requests": engine_requests,
        "finished": finished,
        "generation_tokens": generated,
        "tokens_per_engine_request": round(generated / engine_requests, 2) if engine_requests else None,
        "prompt_tokens": round(_delta(before, after, "vllm:prompt_tokens_total")),
        "prompt_tokens_cached": round(_delta(before, after, "vllm:prompt_tokens_cached_total")),
        "preemptions": round(_delta(before, after, "vllm:num_preemptions_total")),
    }


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) pairs; q in 0..1."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return previous_bound
            if count == previous_count:
                return bound
            return previous_bound + (bound - previous_bound) * (rank - previous_count) / (count - previous_count)
        previous_bound, previous_count = bound, count
    return previous_bound


def stage_stats(
    before: Samples, after: Samples, metric: str = "qwenasr_stage_duration_seconds"
) -> dict[str, Any] | None:
    """Per stage of the appliance: observations, mean, and p50/p95 estimated from the histogram buckets."""
    if not any(name == f"{metric}_count" for name, _ in after):
        return None
    out: dict[str, Any] = {}
    stages = sorted({dict(labels).get("stage", "") for name, labels in after if name == f"{metric}_count"})
    for stage in stages:
        count = _delta(before, after, f"{metric}_count", stage=stage)
        total = _delta(before, after, f"{metric}_sum", stage=stage)
        bounds = sorted(
            {
                dict(labels)["le"]
                for name, labels in after
                if name == f"{metric}_bucket" and dict(labels).get("stage") == stage
            },
            key=float,
        )
        buckets = [(float(le), _delta(before, after, f"{metric}_bucket", stage=stage, le=le)) for le in bounds]
        p50 = histogram_quantile(buckets, 0.5)
        p95 = histogram_quantile(buckets, 0.95)
        out[stage] = {
            "count": round(count),
            "sum_seconds": round(total, 4),
            "mean_ms": round(1000 * total / count, 3) if count else None,
            "p50_ms": round(1000 * p50, 3) if p50 is not None else None,
            "p95_ms": round(1000 * p95, 3) if p95 is not None else None,
        }
    return out


async def measured_run(
    target: Target,
    items: Sequence[AudioItem],
    concurrency: int,
    *,
    request_timeout: float = 600.0,
    fmt: str | None = None,
    settle_seconds: float = 0.5,
    gpu_busy_interval: float | None = DEFAULT_INTERVAL_SECONDS,
) -> dict[str, Any]:
    """`run_load` between two `/metrics` scrapes: the summary plus token and stage statistics, and the
    GPU busy record (`gpu_busy`, sampled every `gpu_busy_interval` seconds; None: not sampled)."""
    before = await scrape_metrics(target.base_url, api_key=target.api_key)
    sampler = GpuBusySampler(gpu_busy_interval) if gpu_busy_interval else None
    load = await run_load(target, items, concurrency, request_timeout=request_timeout, fmt=fmt, gpu_sampler=sampler)
    await asyncio.sleep(settle_seconds)  # let the servers' metric updates of the last requests land
    after = await scrape_metrics(target.base_url, api_key=target.api_key)
    summary = load.summary()
    summary["tokens"] = token_stats(before, after)
    summary["stages"] = stage_stats(before, after)
    summary["latencies"] = [round(r.latency, 4) for r in load.results]
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--model", default="qwen3-asr")
    parser.add_argument("--system", default="server")
    parser.add_argument("--format", dest="fmt", default="mp3", choices=("mp3", "wav"))
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests", type=int, default=0, help="default: max(2 x concurrency, 16)")
    parser.add_argument("--first-index", type=int, default=0, help="first clip index (each index is unique audio)")
    parser.add_argument("--clip-seconds", type=float, default=29.5)
    parser.add_argument("--root", type=Path, default=Path("/tmp/qwenasr-bench/audio"))
    parser.add_argument("--field", action="append", default=[], help="extra form field NAME=VALUE (repeatable)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--gpu-busy-interval", type=float, default=DEFAULT_INTERVAL_SECONDS,
        help="seconds between GPU busy polls of this machine's GPUs (0: none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    fields = dict(item.split("=", 1) for item in args.field)
    count = args.requests or max(2 * args.concurrency, 16)
    items = ensure(
        args.root, clip_specs(args.fmt, range(args.first_index, args.first_index + count), args.clip_seconds)
    )
    target = Target(args.system, args.url, args.model, fields, args.api_key)
    summary = asyncio.run(
        measured_run(
            target, items, args.concurrency, request_timeout=args.timeout, fmt=args.fmt,
            gpu_busy_interval=args.gpu_busy_interval,
        )
    )  # fmt: skip
    summary.pop("latencies", None)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0 if summary["errors"] == 0 else 1


__all__ = [
    "LoadResult",
    "RequestResult",
    "Target",
    "histogram_quantile",
    "measured_run",
    "multipart_body",
    "parse_metrics",
    "percentile",
    "run_load",
    "scrape_metrics",
    "stage_stats",
    "summarize",
    "token_stats",
]

if __name__ == "__main__":
    raise SystemExit(main())
