"""Settings from the environment.

Every setting is one environment variable; the names of the original server (`MODEL_ID`, `DTYPE`,
`QUANT_MODE`, `GPU_MEMORY_UTILIZATION`, `HOST`, `PORT`) keep working. An invalid value stops start-up
with a `ConfigError` that names the variable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from qwenasr_appliance.cpus import usable_cpus

EngineChoice = Literal["auto", "vllm", "cpu"]
QuantMode = Literal["auto", "bnb-4bit", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
GpuFallback = Literal["degraded", "not_ready"]

# SHUTDOWN_GRACE_SECONDS unset: QUEUE_TIMEOUT_SECONDS + REQUEST_TIMEOUT_SECONDS (a request admitted just
# before SIGTERM may wait for its slot and then run its whole time), at most this long.
MAX_SHUTDOWN_GRACE_SECONDS = 3600.0


class ConfigError(ValueError):
    """A setting is invalid; the message names the environment variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str = "Qwen/Qwen3-ASR-1.7B"
    served_model_name: str = ""
    engine: EngineChoice = "auto"
    # A GPU was given to this process (the Helm chart sets it when it requests one): the CPU engine
    # serving means the GPU could not be reached, which is `degraded` (or not ready, GPU_FALLBACK).
    expect_gpu: bool = False
    gpu_fallback: GpuFallback = "degraded"
    dtype: DType = "auto"
    quant_mode: QuantMode = "auto"
    gpu_memory_utilization: float = 0.90
    load_format: str = "auto"
    max_model_len: int = 0
    max_num_seqs: int = 256
    enforce_eager: bool = False
    max_new_tokens: int = 512
    chunk_seconds: float = 30.0
    host: str = "0.0.0.0"  # noqa: S104 - a server in a container listens on all interfaces
    port: int = 8001
    max_upload_bytes: int = 25 * 1024 * 1024
    max_audio_seconds: float = 7200.0
    max_concurrent_requests: int = 0
    max_queue_size: int = 512
    queue_timeout_seconds: float = 30.0
    request_timeout_seconds: float = 900.0
    max_prompt_chars: int = 2000
    decode_workers: int = 0
    cpu_threads: int = 0
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    api_keys: tuple[str, ...] = ()
    protect_ops_endpoints: bool = False
    # The defaults' QUEUE_TIMEOUT_SECONDS + REQUEST_TIMEOUT_SECONDS; load_settings derives it from the
    # values in effect when SHUTDOWN_GRACE_SECONDS is unset or empty.
    shutdown_grace_seconds: float = 930.0
    client_timeout_seconds: float = 30.0
    engine_restart_max: int = 5
    engine_restart_backoff_seconds: float = 2.0
    # The optional forced aligner (word timestamps): empty means none is loaded.
    aligner_model_id: str = ""
    aligner_gpu_memory_utilization: float = 0.10
    # Live transcription (OpenAI Realtime API over WebSocket, GET /v1/realtime): see README "Live transcription".
    live_max_sessions: int = 128  # open sessions at once; 0 turns /v1/realtime off
    live_max_session_seconds: float = 3600.0  # wall time of one session
    live_idle_timeout_seconds: float = 60.0  # longest time without a client event
    live_max_append_bytes: int = 1024 * 1024  # decoded audio bytes in one input_audio_buffer.append
    live_max_turn_seconds: float = 30.0  # a longer turn is committed where it stands
    live_partial_interval_seconds: float = 0.8  # new audio between partial re-decodes; 0: no partials
    live_send_queue_events: int = 1024  # server events waiting for a slow reader before the session is closed
    live_send_timeout_seconds: float = 10.0  # longest a single send may block
    live_page: bool = False  # the built-in try-it page at /live

    @property
    def model_name(self) -> str:
        """The name clients use in `model` and see in `/v1/models`."""
        return self.served_model_name or self.model_id

    @property
    def effective_decode_workers(self) -> int:
        """Processes of each audio worker pool (decoding; vLLM's feature extraction): DECODE_WORKERS, or
        when 0 one per CPU the container may use (cgroup quota and CPU set, see `cpus.py`)."""
        return self.decode_workers or usable_cpus()


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected one of true/false, 1/0, yes/no, on/off")


def _parse_int(raw: str) -> int:
    return int(raw.strip())


def _parse_float(raw: str) -> float:
    value = float(raw.strip())
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _parse_optional_float(raw: str) -> float | None:
    """A float, or None for an empty value (the setting's derived default)."""
    return _parse_float(raw) if raw.strip() else None


def _parse_keys(raw: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in raw.split(",") if key.strip())


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


@dataclass(frozen=True)
class _Var:
    field: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None] = lambda _value: None


def _range(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if (value <= low if low_open else value < low) or value > high:
            bracket = "(" if low_open else "["
            return f"must be in {bracket}{low}, {high}]"
        return None

    return check


_VARS: dict[str, _Var] = {
    "MODEL_ID": _Var("model_id", _text),
    "SERVED_MODEL_NAME": _Var("served_model_name", str.strip),
    "ENGINE": _Var("engine", _choice("auto", "vllm", "cpu")),
    "EXPECT_GPU": _Var("expect_gpu", _parse_bool),
    "GPU_FALLBACK": _Var("gpu_fallback", _choice("degraded", "not_ready")),
    "DTYPE": _Var("dtype", _choice("auto", "bfloat16", "float16", "float32")),
    "QUANT_MODE": _Var("quant_mode", _choice("auto", "bnb-4bit", "none")),
    "GPU_MEMORY_UTILIZATION": _Var("gpu_memory_utilization", _parse_float, _range(0.0, 1.0, low_open=True)),
    "LOAD_FORMAT": _Var("load_format", _text),
    "MAX_MODEL_LEN": _Var("max_model_len", _parse_int, _range(0, 1_048_576)),
    "MAX_NUM_SEQS": _Var("max_num_seqs", _parse_int, _range(1, 65_536)),
    "ENFORCE_EAGER": _Var("enforce_eager", _parse_bool),
    "MAX_NEW_TOKENS": _Var("max_new_tokens", _parse_int, _range(1, 32_768)),
    "CHUNK_SECONDS": _Var("chunk_seconds", _parse_float, _range(5.0, 1200.0)),
    "HOST": _Var("host", _text),
    "PORT": _Var("port", _parse_int, _range(1, 65_535)),
    "MAX_UPLOAD_BYTES": _Var("max_upload_bytes", _parse_int, _range(1024, 2**34)),
    "MAX_AUDIO_SECONDS": _Var("max_audio_seconds", _parse_float, _range(1.0, 86_400.0)),
    "MAX_CONCURRENT_REQUESTS": _Var("max_concurrent_requests", _parse_int, _range(0, 100_000)),
    "MAX_QUEUE_SIZE": _Var("max_queue_size", _parse_int, _range(0, 1_000_000)),
    "QUEUE_TIMEOUT_SECONDS": _Var("queue_timeout_seconds", _parse_float, _range(0.0, 3600.0, low_open=True)),
    "REQUEST_TIMEOUT_SECONDS": _Var("request_timeout_seconds", _parse_float, _range(1.0, 86_400.0)),
    "MAX_PROMPT_CHARS": _Var("max_prompt_chars", _parse_int, _range(0, 100_000)),
    "DECODE_WORKERS": _Var("decode_workers", _parse_int, _range(0, 1024)),
    "CPU_THREADS": _Var("cpu_threads", _parse_int, _range(0, 1024)),
    "LOG_LEVEL": _Var("log_level", _choice("debug", "info", "warning", "error")),
    "LOG_FORMAT": _Var("log_format", _choice("json", "console")),
    "API_KEYS": _Var("api_keys", _parse_keys),
    "PROTECT_OPS_ENDPOINTS": _Var("protect_ops_endpoints", _parse_bool),
    "SHUTDOWN_GRACE_SECONDS": _Var(
        "shutdown_grace_seconds", _parse_optional_float, _range(0.0, MAX_SHUTDOWN_GRACE_SECONDS)
    ),
    "CLIENT_TIMEOUT_SECONDS": _Var("client_timeout_seconds", _parse_float, _range(1.0, 3600.0)),
    "ENGINE_RESTART_MAX": _Var("engine_restart_max", _parse_int, _range(0, 1000)),
    "ENGINE_RESTART_BACKOFF_SECONDS": _Var("engine_restart_backoff_seconds", _parse_float, _range(0.0, 600.0)),
    "ALIGNER_MODEL_ID": _Var("aligner_model_id", str.strip),
    "ALIGNER_GPU_MEMORY_UTILIZATION": _Var(
        "aligner_gpu_memory_utilization", _parse_float, _range(0.0, 1.0, low_open=True)
    ),
    "LIVE_MAX_SESSIONS": _Var("live_max_sessions", _parse_int, _range(0, 100_000)),
    "LIVE_MAX_SESSION_SECONDS": _Var("live_max_session_seconds", _parse_float, _range(1.0, 86_400.0)),
    "LIVE_IDLE_TIMEOUT_SECONDS": _Var("live_idle_timeout_seconds", _parse_float, _range(1.0, 86_400.0)),
    "LIVE_MAX_APPEND_BYTES": _Var("live_max_append_bytes", _parse_int, _range(1024, 15 * 1024 * 1024)),
    "LIVE_MAX_TURN_SECONDS": _Var("live_max_turn_seconds", _parse_float, _range(1.0, 300.0)),
    "LIVE_PARTIAL_INTERVAL_SECONDS": _Var("live_partial_interval_seconds", _parse_float, _range(0.0, 60.0)),
    "LIVE_SEND_QUEUE_EVENTS": _Var("live_send_queue_events", _parse_int, _range(8, 100_000)),
    "LIVE_SEND_TIMEOUT_SECONDS": _Var("live_send_timeout_seconds", _parse_float, _range(0.1, 600.0)),
    "LIVE_PAGE": _Var("live_page", _parse_bool),
}

# Qwen3-ForcedAligner aligns at most this much audio per call (qwen-asr's MAX_FORCE_ALIGN_INPUT_SECONDS).
MAX_ALIGN_SECONDS = 180.0

ENV_VARIABLES: tuple[str, ...] = (*_VARS, "API_KEYS_FILE")


def _read_keys_file(path: str) -> tuple[str, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("API_KEYS_FILE", f"cannot read {path!r}: {exc.strerror}") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def default_shutdown_grace(queue_timeout_seconds: float, request_timeout_seconds: float) -> float:
    """SHUTDOWN_GRACE_SECONDS when unset: the queue timeout plus the request timeout, at most
    `MAX_SHUTDOWN_GRACE_SECONDS`, so that a rollout lets every admitted request finish (the Helm chart
    derives the same value). The drain ends as soon as nothing runs: an idle server stops at once."""
    return min(MAX_SHUTDOWN_GRACE_SECONDS, queue_timeout_seconds + request_timeout_seconds)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from the environment, naming the variable of the first invalid value."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, var in _VARS.items():
        raw = env.get(name)
        if raw is None:
            continue
        try:
            value = var.parse(raw)
        except ValueError as exc:
            raise ConfigError(name, f"invalid value {raw!r}: {exc}") from exc
        if value is None:
            continue  # empty: the derived default
        problem = var.check(value)
        if problem:
            raise ConfigError(name, f"invalid value {raw!r}: {problem}")
        values[var.field] = value
    keys_file = env.get("API_KEYS_FILE", "").strip()
    if keys_file:
        values["api_keys"] = tuple(values.get("api_keys", ())) + _read_keys_file(keys_file)
    if "shutdown_grace_seconds" not in values:
        defaults = Settings()
        values["shutdown_grace_seconds"] = default_shutdown_grace(
            values.get("queue_timeout_seconds", defaults.queue_timeout_seconds),
            values.get("request_timeout_seconds", defaults.request_timeout_seconds),
        )
    settings = Settings(**values)
    if settings.max_new_tokens > 0 and settings.max_model_len and settings.max_new_tokens >= settings.max_model_len:
        raise ConfigError("MAX_NEW_TOKENS", "must be smaller than MAX_MODEL_LEN")
    if settings.aligner_model_id and settings.chunk_seconds > MAX_ALIGN_SECONDS:
        raise ConfigError(
            "CHUNK_SECONDS",
            f"must be at most {MAX_ALIGN_SECONDS:.0f} when ALIGNER_MODEL_ID is set "
            "(the forced aligner handles at most that much audio at once)",
        )
    return settings


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy of `settings` with some fields changed (used by tests and the CLI)."""
    return msgspec.structs.replace(settings, **changes)
