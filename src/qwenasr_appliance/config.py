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

EngineChoice = Literal["auto", "vllm", "cpu"]
QuantMode = Literal["auto", "bnb-4bit", "none"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(ValueError):
    """A setting is invalid; the message names the environment variable."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str = "Qwen/Qwen3-ASR-1.7B"
    served_model_name: str = ""
    engine: EngineChoice = "auto"
    dtype: DType = "auto"
    quant_mode: QuantMode = "auto"
    gpu_memory_utilization: float = 0.90
    load_format: str = "auto"
    max_model_len: int = 0
    max_num_seqs: int = 256
    enforce_eager: bool = False
    max_new_tokens: int = 512
    chunk_seconds: float = 30.0
    # verbose_json segments get avg_logprob and no_speech_prob from the model's log-probabilities (costs
    # engine time); false: null there unless the request sends include[]=logprobs.
    verbose_json_confidence: bool = True
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
    shutdown_grace_seconds: float = 30.0
    client_timeout_seconds: float = 30.0
    engine_restart_max: int = 5
    engine_restart_backoff_seconds: float = 2.0
    # The optional forced aligner (word timestamps): empty means none is loaded.
    aligner_model_id: str = ""
    aligner_gpu_memory_utilization: float = 0.10

    @property
    def model_name(self) -> str:
        """The name clients use in `model` and see in `/v1/models`."""
        return self.served_model_name or self.model_id

    @property
    def effective_decode_workers(self) -> int:
        return self.decode_workers or max(1, os.cpu_count() or 1)


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
    "DTYPE": _Var("dtype", _choice("auto", "bfloat16", "float16", "float32")),
    "QUANT_MODE": _Var("quant_mode", _choice("auto", "bnb-4bit", "none")),
    "GPU_MEMORY_UTILIZATION": _Var("gpu_memory_utilization", _parse_float, _range(0.0, 1.0, low_open=True)),
    "LOAD_FORMAT": _Var("load_format", _text),
    "MAX_MODEL_LEN": _Var("max_model_len", _parse_int, _range(0, 1_048_576)),
    "MAX_NUM_SEQS": _Var("max_num_seqs", _parse_int, _range(1, 65_536)),
    "ENFORCE_EAGER": _Var("enforce_eager", _parse_bool),
    "MAX_NEW_TOKENS": _Var("max_new_tokens", _parse_int, _range(1, 32_768)),
    "CHUNK_SECONDS": _Var("chunk_seconds", _parse_float, _range(5.0, 1200.0)),
    "VERBOSE_JSON_CONFIDENCE": _Var("verbose_json_confidence", _parse_bool),
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
    "SHUTDOWN_GRACE_SECONDS": _Var("shutdown_grace_seconds", _parse_float, _range(0.0, 3600.0)),
    "CLIENT_TIMEOUT_SECONDS": _Var("client_timeout_seconds", _parse_float, _range(1.0, 3600.0)),
    "ENGINE_RESTART_MAX": _Var("engine_restart_max", _parse_int, _range(0, 1000)),
    "ENGINE_RESTART_BACKOFF_SECONDS": _Var("engine_restart_backoff_seconds", _parse_float, _range(0.0, 600.0)),
    "ALIGNER_MODEL_ID": _Var("aligner_model_id", str.strip),
    "ALIGNER_GPU_MEMORY_UTILIZATION": _Var(
        "aligner_gpu_memory_utilization", _parse_float, _range(0.0, 1.0, low_open=True)
    ),
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
        problem = var.check(value)
        if problem:
            raise ConfigError(name, f"invalid value {raw!r}: {problem}")
        values[var.field] = value
    keys_file = env.get("API_KEYS_FILE", "").strip()
    if keys_file:
        values["api_keys"] = tuple(values.get("api_keys", ())) + _read_keys_file(keys_file)
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


# Fast speech is about 4 words (6 Chinese characters) a second; Qwen's tokenizer spends at most about one
# token per Chinese character and 1.3 per English word: 8 tokens per audio second covers it with room.
MAX_TOKENS_PER_AUDIO_SECOND = 8
HEADER_TOKENS = 8  # `language English<asr_text>` and the end token


def truncation_risk(settings: Settings) -> str | None:
    """Why `MAX_NEW_TOKENS` may cut the transcript of a full `CHUNK_SECONDS` chunk; None when it fits."""
    needed = math.ceil(settings.chunk_seconds * MAX_TOKENS_PER_AUDIO_SECOND) + HEADER_TOKENS
    if settings.max_new_tokens >= needed:
        return None
    return (
        f"MAX_NEW_TOKENS={settings.max_new_tokens} cannot hold the transcript of a {settings.chunk_seconds:g} s chunk "
        f"of fast speech ({MAX_TOKENS_PER_AUDIO_SECOND} tokens per second plus {HEADER_TOKENS}: {needed}); such "
        "chunks are cut off (flagged as truncated). Raise MAX_NEW_TOKENS or lower CHUNK_SECONDS."
    )


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy of `settings` with some fields changed (used by tests and the CLI)."""
    return msgspec.structs.replace(settings, **changes)
