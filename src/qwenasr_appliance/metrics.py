"""Prometheus metrics: one registry (the default one, where vLLM's in-process engine registers its
`vllm:*` metrics too), each metric defined once here.

Names follow Prometheus conventions: a `qwenasr_` namespace, base units in the name (`_seconds`,
`_bytes`), `_total` on counters. Every label value comes from a fixed set chosen by the server, never
from the request as sent: routes are templates, methods and statuses are mapped by `http_method_label`
and `http_status_label` (anything else counts as `other`). A client-chosen label value would make one
series per value: 3,000 requests with made-up methods grew /metrics from 47 KB to 125.7 MB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from qwenasr_appliance import __version__

ENGINE_STATES: Final = ("starting", "probing", "loading", "ready", "degraded", "failed", "restarting", "stopped")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_RTF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_AUDIO_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)


# RFC 9110 section 9 and RFC 5789 (PATCH); granian hands any token through as the method.
HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
OTHER: Final = "other"


def http_method_label(method: str) -> str:
    """The `method` label: a standard HTTP method, else `other`."""
    return method if method in HTTP_METHODS else OTHER


def http_status_label(status: int) -> str:
    """The `status` label: the status code when it is a valid one (100-599), else `other`."""
    return str(status) if 100 <= status <= 599 else OTHER


class Metrics:
    """All metrics of the appliance."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = Gauge(
            "qwenasr_build_info", "Build information; the value is always 1.", ["version"], registry=registry
        )
        self.build_info.labels(version=__version__).set(1)
        self.http_requests = Counter(
            "qwenasr_http_requests_total",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_request_duration = Histogram(
            "qwenasr_http_request_duration_seconds",
            "Time from request start to response end, by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.audio_processed = Counter(
            "qwenasr_audio_processed_seconds_total",
            "Seconds of audio transcribed successfully.",
            registry=registry,
        )
        self.audio_duration = Histogram(
            "qwenasr_audio_duration_seconds",
            "Duration of the audio in each transcription request.",
            buckets=_AUDIO_BUCKETS,
            registry=registry,
        )
        self.real_time_factor = Histogram(
            "qwenasr_real_time_factor",
            "Processing seconds per audio second, per successful transcription request.",
            buckets=_RTF_BUCKETS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "qwenasr_stage_duration_seconds",
            "Time spent per transcription request in each stage (decode, queue, engine, response).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.transcriptions = Counter(
            "qwenasr_transcriptions_total",
            "Transcription requests by outcome (ok, client_error, rejected, engine_error, cancelled).",
            ["outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "qwenasr_requests_in_flight", "Transcription requests being processed now.", registry=registry
        )
        self.queued = Gauge(
            "qwenasr_requests_queued",
            "Transcription requests waiting for a processing slot.",
            registry=registry,
        )
        self.concurrency_limit = Gauge(
            "qwenasr_concurrency_limit",
            "Transcription requests admitted at once now (MAX_CONCURRENT_REQUESTS, or when 0 the serving "
            "engine's capacity); in-flight over this is the share of slots used.",
            registry=registry,
        )
        self.upload_buffer = Gauge(
            "qwenasr_upload_buffer_bytes",
            "Bytes of uploads the server holds now (arriving, queued or being transcribed).",
            registry=registry,
        )
        self.upload_buffer_limit = Gauge(
            "qwenasr_upload_buffer_limit_bytes",
            "Most bytes of uploads held at once (UPLOAD_BUFFER_BYTES); past it uploads get 429.",
            registry=registry,
        )
        self.rejected = Counter(
            "qwenasr_requests_rejected_total",
            "Transcription requests refused before processing, by reason.",
            ["reason"],
            registry=registry,
        )
        self.engine_state = Gauge(
            "qwenasr_engine_state",
            "Engine supervisor state: 1 for the current state, 0 for the others.",
            ["state"],
            registry=registry,
        )
        self.engine_plan = Gauge(
            "qwenasr_engine_plan_info",
            "The engine plan in use; the value is 1 for the active plan.",
            ["engine", "plan", "dtype", "quantization"],
            registry=registry,
        )
        self.engine_load_attempts = Counter(
            "qwenasr_engine_load_attempts_total",
            "Engine load attempts by plan and outcome (ok, or the failure kind).",
            ["plan", "outcome"],
            registry=registry,
        )
        self.engine_fallbacks = Counter(
            "qwenasr_engine_fallbacks_total",
            "Fallbacks taken to a later plan after a failed one, by the plan fallen back to.",
            ["to_plan"],
            registry=registry,
        )
        self.engine_restarts = Counter(
            "qwenasr_engine_restarts_total",
            "Engine restarts after the engine died while serving.",
            registry=registry,
        )
        self.engine_errors = Counter(
            "qwenasr_engine_errors_total",
            "Requests that failed inside the engine, by kind (dead, request).",
            ["kind"],
            registry=registry,
        )
        self.repetition_loops = Counter(
            "qwenasr_repetition_loops_total",
            "Runaway loops in chunk transcripts, by action: collapsed (to two copies by the text fix) or "
            "stopped (generation ended early by the engine's loop guard; text after the loop is lost).",
            ["action"],
            registry=registry,
        )
        self.truncated_chunks = Counter(
            "qwenasr_truncated_chunks_total",
            "Chunks whose generation ended on the MAX_NEW_TOKENS limit (their text may be cut off).",
            registry=registry,
        )
        self.context_echoes = Counter(
            "qwenasr_context_echoes_total",
            "Chunk transcripts dropped because they were only the request's prompt written back.",
            registry=registry,
        )
        self.model_load_duration = Gauge(
            "qwenasr_model_load_duration_seconds",
            "Wall time of the last successful model load.",
            registry=registry,
        )
        self.gpu_memory_total = Gauge(
            "qwenasr_gpu_memory_total_bytes",
            "Total memory per visible GPU, read through NVML at the last probe.",
            ["gpu"],
            registry=registry,
        )
        self.gpu_memory_free = Gauge(
            "qwenasr_gpu_memory_free_bytes",
            "Free memory per visible GPU, read through NVML at the last probe.",
            ["gpu"],
            registry=registry,
        )
        self.worker_processes = Gauge(
            "qwenasr_worker_processes",
            "Worker processes by pool (decode, features) and state (idle, busy, starting, stalled: stopped or "
            "past its task's deadline), as of the last scrape or readiness check.",
            ["pool", "state"],
            registry=registry,
        )
        self.worker_replacements = Counter(
            "qwenasr_worker_replacements_total",
            "Worker processes replaced, by pool and reason (died: crashed or killed from outside; timeout: "
            "killed at its task's deadline).",
            ["pool", "reason"],
            registry=registry,
        )
        # Live transcription (GET /v1/realtime).
        self.live_sessions_active = Gauge(
            "qwenasr_live_sessions_active",
            "Live transcription sessions (Realtime API WebSockets) open now.",
            registry=registry,
        )
        self.live_sessions = Counter(
            "qwenasr_live_sessions_total",
            "Live sessions ended, by reason (client_closed, idle_timeout, session_expired, slow_consumer, "
            "shutdown, rejected, error).",
            ["reason"],
            registry=registry,
        )
        self.live_sessions_rejected = Counter(
            "qwenasr_live_sessions_rejected_total",
            "Live sessions refused as they opened, by the error code sent (session_limit_reached, "
            'engine_unavailable, server_shutting_down); each also counts in qwenasr_live_sessions_total{reason="rejected"}.',
            ["reason"],
            registry=registry,
        )
        self.live_sessions_limit = Gauge(
            "qwenasr_live_sessions_limit",
            "Live sessions this process holds at once (LIVE_MAX_SESSIONS; 0: live transcription is off).",
            registry=registry,
        )
        self.live_audio = Counter(
            "qwenasr_live_audio_seconds_total",
            "Seconds of audio received by live sessions.",
            registry=registry,
        )
        self.live_turns = Counter(
            "qwenasr_live_turns_total",
            "Committed turns of live sessions, by outcome (completed, failed).",
            ["outcome"],
            registry=registry,
        )
        self.live_first_delta = Histogram(
            "qwenasr_live_first_delta_seconds",
            "Time from the detection of speech (speech_started; the first append in manual mode) to the turn's first transcript delta.",
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.live_final_latency = Histogram(
            "qwenasr_live_final_latency_seconds",
            "Time from the end of speech (speech_stopped, or the commit) to the turn's completed transcript.",
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.live_client_errors = Counter(
            "qwenasr_live_client_errors_total",
            "Client events answered with an error event, by error code.",
            ["code"],
            registry=registry,
        )
        self.set_engine_state("starting")

    def worker_replaced(self, pool: str) -> Callable[[str], None]:
        """A `WorkerPool` `on_replaced` callback counting the pool's replacements."""
        return lambda reason: self.worker_replacements.labels(pool=pool, reason=reason).inc()

    def set_engine_state(self, state: str) -> None:
        for name in ENGINE_STATES:
            self.engine_state.labels(state=name).set(1 if name == state else 0)


METRICS: Final = Metrics(REGISTRY)


def render_latest(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text exposition of `registry` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
