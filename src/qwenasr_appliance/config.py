"""Settings from the environment and an optional `.env` file.

Every setting is one environment variable; the names of the original server (`MODEL_ID`, `DTYPE`,
`QUANT_MODE`, `GPU_MEMORY_UTILIZATION`, `HOST`, `PORT`) keep working. At start-up `.env` in the working
directory (or the file named by `ENV_FILE`) is read with python-dotenv; a variable set in the real
environment wins over the file. An empty or blank value (`PORT=`, as docker compose's `${PORT:-}`, a
Helm template or a copied `.env.example` give) counts as unset: the file's value, else the default
applies. Invalid values stop start-up with a `ConfigError` that names every invalid variable.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard

import dotenv
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
    """One or more settings are invalid; the message names each variable (`variable` is the first).

    `problems` holds `(variable, message)` for every invalid variable, in the order of `ENV_VARIABLES`."""

    def __init__(self, variable: str, message: str, *, more: tuple[tuple[str, str], ...] = ()) -> None:
        self.problems: tuple[tuple[str, str], ...] = ((variable, message), *more)
        super().__init__("; ".join(f"{name}: {text}" for name, text in self.problems))
        self.variable = variable


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str = "Qwen/Qwen3-ASR-1.7B"
    # SERVED_MODEL_NAME: names clients may send in `model` (comma-separated, as `vllm serve --served-model-name`).
    served_model_name: tuple[str, ...] = ()
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
    # verbose_json segments get avg_logprob and no_speech_prob from the model's log-probabilities (costs
    # engine time); false: null there unless the request sends include[]=logprobs.
    verbose_json_confidence: bool = True
    host: str = "0.0.0.0"  # noqa: S104 - a server in a container listens on all interfaces
    port: int = 8001
    max_upload_bytes: int = 25 * 1024 * 1024
    # Most bytes of uploads the server holds at once (arriving, queued, being transcribed); 0: a quarter
    # of the memory the container may use, at least 4 uploads of MAX_UPLOAD_BYTES (`upload_buffer_limit`).
    upload_buffer_bytes: int = 0
    max_audio_seconds: float = 7200.0
    max_concurrent_requests: int = 0
    max_queue_size: int = 512
    queue_timeout_seconds: float = 30.0
    request_timeout_seconds: float = 900.0
    worker_timeout_seconds: float = 120.0  # longest task of a decode or feature worker process
    max_prompt_chars: int = 2000
    decode_workers: int = 0
    cpu_threads: int = 0
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    api_keys: tuple[str, ...] = ()
    protect_ops_endpoints: bool = False
    # The defaults' QUEUE_TIMEOUT_SECONDS + REQUEST_TIMEOUT_SECONDS; load_settings derives it from the
    # values in effect when SHUTDOWN_GRACE_SECONDS is unset (or empty).
    shutdown_grace_seconds: float = 930.0
    client_timeout_seconds: float = 30.0
    http2: bool = False  # plain HTTP/2 (h2c) besides HTTP/1.1; see cli.build_server
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
    def served_model_names(self) -> tuple[str, ...]:
        """The served names, first the one `/v1/models` lists; `(MODEL_ID,)` when none is set."""
        return self.served_model_name or (self.model_id,)

    @property
    def model_name(self) -> str:
        """The name `/v1/models` lists (the first served name)."""
        return self.served_model_names[0]

    @property
    def accepted_model_names(self) -> tuple[str, ...]:
        """Every name a request's `model` may hold: the served names, then MODEL_ID."""
        return tuple(dict.fromkeys((*self.served_model_names, self.model_id)))

    @property
    def worker_job_timeout(self) -> float:
        """The deadline of one worker task: a task cannot take longer than its request may."""
        return min(self.worker_timeout_seconds, self.request_timeout_seconds)

    @property
    def effective_decode_workers(self) -> int:
        """Processes of each audio worker pool (decoding; vLLM's feature extraction): DECODE_WORKERS, or
        when 0 one per CPU the container may use (cgroup quota and CPU set, see `cpus.py`)."""
        return self.decode_workers or usable_cpus()


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
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
    "MODEL_ID": _Var("model_id", str.strip),
    "SERVED_MODEL_NAME": _Var("served_model_name", _parse_keys),
    "ENGINE": _Var("engine", _choice("auto", "vllm", "cpu")),
    "EXPECT_GPU": _Var("expect_gpu", _parse_bool),
    "GPU_FALLBACK": _Var("gpu_fallback", _choice("degraded", "not_ready")),
    "DTYPE": _Var("dtype", _choice("auto", "bfloat16", "float16", "float32")),
    "QUANT_MODE": _Var("quant_mode", _choice("auto", "bnb-4bit", "none")),
    "GPU_MEMORY_UTILIZATION": _Var("gpu_memory_utilization", _parse_float, _range(0.0, 1.0, low_open=True)),
    "LOAD_FORMAT": _Var("load_format", str.strip),
    "MAX_MODEL_LEN": _Var("max_model_len", _parse_int, _range(0, 1_048_576)),
    "MAX_NUM_SEQS": _Var("max_num_seqs", _parse_int, _range(1, 65_536)),
    "ENFORCE_EAGER": _Var("enforce_eager", _parse_bool),
    "MAX_NEW_TOKENS": _Var("max_new_tokens", _parse_int, _range(1, 32_768)),
    "CHUNK_SECONDS": _Var("chunk_seconds", _parse_float, _range(5.0, 1200.0)),
    "VERBOSE_JSON_CONFIDENCE": _Var("verbose_json_confidence", _parse_bool),
    "HOST": _Var("host", str.strip),
    "PORT": _Var("port", _parse_int, _range(1, 65_535)),
    "MAX_UPLOAD_BYTES": _Var("max_upload_bytes", _parse_int, _range(1024, 2**34)),
    "UPLOAD_BUFFER_BYTES": _Var("upload_buffer_bytes", _parse_int, _range(0, 2**44)),
    "MAX_AUDIO_SECONDS": _Var("max_audio_seconds", _parse_float, _range(1.0, 86_400.0)),
    "MAX_CONCURRENT_REQUESTS": _Var("max_concurrent_requests", _parse_int, _range(0, 100_000)),
    "MAX_QUEUE_SIZE": _Var("max_queue_size", _parse_int, _range(0, 1_000_000)),
    "QUEUE_TIMEOUT_SECONDS": _Var("queue_timeout_seconds", _parse_float, _range(0.0, 3600.0, low_open=True)),
    "REQUEST_TIMEOUT_SECONDS": _Var("request_timeout_seconds", _parse_float, _range(1.0, 86_400.0)),
    "WORKER_TIMEOUT_SECONDS": _Var("worker_timeout_seconds", _parse_float, _range(0.5, 86_400.0)),
    "MAX_PROMPT_CHARS": _Var("max_prompt_chars", _parse_int, _range(0, 100_000)),
    "DECODE_WORKERS": _Var("decode_workers", _parse_int, _range(0, 1024)),
    "CPU_THREADS": _Var("cpu_threads", _parse_int, _range(0, 1024)),
    "LOG_LEVEL": _Var("log_level", _choice("debug", "info", "warning", "error")),
    "LOG_FORMAT": _Var("log_format", _choice("json", "console")),
    "API_KEYS": _Var("api_keys", _parse_keys),
    "PROTECT_OPS_ENDPOINTS": _Var("protect_ops_endpoints", _parse_bool),
    "SHUTDOWN_GRACE_SECONDS": _Var("shutdown_grace_seconds", _parse_float, _range(0.0, MAX_SHUTDOWN_GRACE_SECONDS)),
    "CLIENT_TIMEOUT_SECONDS": _Var("client_timeout_seconds", _parse_float, _range(1.0, 3600.0)),
    "HTTP2": _Var("http2", _parse_bool),
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
# Names the settings file to read instead of `.env` in the working directory; read from the real environment only.
ENV_FILE_VARIABLE = "ENV_FILE"
DEFAULT_ENV_FILE = ".env"

SettingSource = Literal["default", ".env", "environment"]


def _is_set(value: str | None) -> TypeGuard[str]:
    """Whether a setting's text sets it: an absent, empty or blank value leaves the default."""
    return value is not None and bool(value.strip())


@dataclass(frozen=True)
class Environment:
    """The variables settings are read from: the real environment laid over the settings file.

    `values` maps every variable (the appliance's and others, e.g. `HF_HUB_OFFLINE`) to its text;
    `file_values` holds what the file set; `env_file` is the file read, None when there was none;
    `from_environment` names the variables whose value comes from the real environment; `file_warnings`
    what in the file was not understood (`env_file_warnings`)."""

    values: Mapping[str, str]
    file_values: Mapping[str, str]
    env_file: Path | None
    from_environment: frozenset[str]
    file_warnings: tuple[str, ...] = ()  # `env_file_warnings`: lines not read, names no program reads

    def source(self, variable: str) -> SettingSource:
        """Where `variable`'s value comes from: the real environment, the settings file, or the default
        (also when the value in effect is empty: that is the default's)."""
        if not _is_set(self.values.get(variable)):
            return "default"
        return "environment" if variable in self.from_environment else ".env"


def env_file_path(environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The settings file to read: `ENV_FILE` (relative to `cwd`), else `cwd/.env` when it exists.

    Raises `ConfigError` when `ENV_FILE` names a file that is not there."""
    named = environ.get(ENV_FILE_VARIABLE, "").strip()
    if named:
        path = cwd / Path(named).expanduser()
        if not path.is_file():
            raise ConfigError(ENV_FILE_VARIABLE, f"{named!r} is not a readable file")
        return path
    default = cwd / DEFAULT_ENV_FILE
    return default if default.is_file() else None


# Variables of other programs a settings file may carry for the appliance's process and its children
# (the hub library, vLLM, CUDA, PyTorch, OpenMP...): only names outside these are reported as unknown.
_OTHER_PROGRAMS_PREFIXES: Final = (
    "HF_", "HUGGING", "TRANSFORMERS_", "VLLM_", "CUDA_", "NCCL_", "NVIDIA_", "TORCH", "PYTORCH_", "TRITON_",
    "OMP_", "MKL_", "OPENBLAS_", "TOKENIZERS_", "XDG_", "PYTHON", "LD_", "SSL_", "REQUESTS_", "NO_COLOR",
    "RUST_", "PROMETHEUS_", "GRANIAN_", "UV_", "PIP_", "TZ", "LANG", "LC_", "HOME", "PATH", "TMPDIR",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
)  # fmt: skip


def env_file_warnings(path: Path) -> tuple[str, ...]:
    """What `path` (a dotenv file) holds that nothing will read: lines that do not parse (python-dotenv
    skips them, naming neither the file nor the line's content), and names that are neither a setting of
    the appliance nor another program's known variable, with the setting it probably meant (difflib)."""
    import difflib
    import io

    from dotenv.parser import parse_stream

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return (f"{path}: not read ({exc})",)
    warnings: list[str] = []
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            warnings.append(f"{path}, line {line}: not a NAME=value line; it is ignored")
            continue
        name = binding.key
        if (
            name is None
            or name in ENV_VARIABLES
            or name == ENV_FILE_VARIABLE
            or name.startswith(_OTHER_PROGRAMS_PREFIXES)
        ):
            continue
        close = difflib.get_close_matches(name, ENV_VARIABLES, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else " (see .env.example for the settings)"
        warnings.append(f"{path}, line {line}: {name} is not a setting of the appliance{hint}")
    return tuple(warnings)


def read_environment(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Environment:
    """The process environment (default `os.environ`) over the settings file found from `cwd` (default:
    the working directory). A variable without a value in the file (`NAME` alone) is ignored, and so is a
    setting the environment gives an empty value: the file's value (or the default) applies."""
    env = dict(os.environ if environ is None else environ)
    path = env_file_path(env, Path.cwd() if cwd is None else cwd)
    file_values: dict[str, str] = {}
    if path is not None:
        # python-dotenv warns of a line it cannot parse without naming the file; `env_file_warnings`
        # says it with the file, the line and what to do.
        logging.getLogger("dotenv.main").setLevel(logging.ERROR)
        file_values = {k: v for k, v in dotenv.dotenv_values(path).items() if v is not None}
    # Only the appliance's settings: what an empty value means to other programs (CUDA_VISIBLE_DEVICES=
    # hides every GPU) is theirs to say.
    overriding = {k: v for k, v in env.items() if k not in ENV_VARIABLES or _is_set(v)}
    return Environment(
        values={**file_values, **overriding},
        file_values=file_values,
        env_file=path,
        from_environment=frozenset(overriding),
        file_warnings=env_file_warnings(path) if path is not None else (),
    )


def apply_env_file(environment: Environment) -> None:
    """Export what the settings file sets into `os.environ` where the real environment does not set it
    (or leaves a setting empty), so that child processes (granian's workers, vLLM's engine core) and
    libraries that read the environment themselves (`HF_HUB_OFFLINE`, `HF_TOKEN`) see it too."""
    for name, value in environment.file_values.items():
        if name not in environment.from_environment:
            os.environ[name] = value


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
    """Build `Settings` from `environ`, or (None) from the process environment over the settings file.

    An empty or blank value leaves a setting at its default (for SHUTDOWN_GRACE_SECONDS the derived one).
    Raises `ConfigError` naming every invalid variable."""
    env = read_environment().values if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name, var in _VARS.items():
        raw = env.get(name)
        if not _is_set(raw):
            continue
        try:
            value = var.parse(raw)
        except ValueError as exc:
            problems.append((name, f"invalid value {raw!r}: {exc}"))
            continue
        problem = var.check(value)
        if problem:
            problems.append((name, f"invalid value {raw!r}: {problem}"))
            continue
        values[var.field] = value
    keys_file = env.get("API_KEYS_FILE", "").strip()
    if keys_file:
        try:
            values["api_keys"] = tuple(values.get("api_keys", ())) + _read_keys_file(keys_file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(*problems[0], more=tuple(problems[1:]))
    if "shutdown_grace_seconds" not in values:
        defaults = Settings()
        values["shutdown_grace_seconds"] = default_shutdown_grace(
            values.get("queue_timeout_seconds", defaults.queue_timeout_seconds),
            values.get("request_timeout_seconds", defaults.request_timeout_seconds),
        )
    settings = Settings(**values)
    if 0 < settings.upload_buffer_bytes < settings.max_upload_bytes:
        raise ConfigError(
            "UPLOAD_BUFFER_BYTES", "must be 0 (automatic) or at least MAX_UPLOAD_BYTES: else no largest upload fits"
        )
    if settings.max_new_tokens > 0 and settings.max_model_len and settings.max_new_tokens >= settings.max_model_len:
        raise ConfigError("MAX_NEW_TOKENS", "must be smaller than MAX_MODEL_LEN")
    if settings.aligner_model_id and settings.chunk_seconds > MAX_ALIGN_SECONDS:
        raise ConfigError(
            "CHUNK_SECONDS",
            f"must be at most {MAX_ALIGN_SECONDS:.0f} when ALIGNER_MODEL_ID is set "
            "(the forced aligner handles at most that much audio at once)",
        )
    return settings


UPLOAD_BUFFER_MEMORY_SHARE = 0.25  # of the container's memory, when UPLOAD_BUFFER_BYTES=0
UPLOAD_BUFFER_MIN_UPLOADS = 4  # ... but room for at least this many of the largest uploads


def upload_buffer_limit(settings: Settings, memory_bytes: int | None) -> int:
    """Bytes of uploads the server holds at once: UPLOAD_BUFFER_BYTES, or when 0 a quarter of
    `memory_bytes` (the container's memory, `memory.usable_memory_bytes()`), at least 4 uploads of
    MAX_UPLOAD_BYTES (also when the memory is unknown). Uploads are held in memory once received, and
    spooled to the temporary directory past 1 MiB while they arrive: the one budget bounds both."""
    if settings.upload_buffer_bytes:
        return settings.upload_buffer_bytes
    floor = UPLOAD_BUFFER_MIN_UPLOADS * settings.max_upload_bytes
    if memory_bytes is None:
        return floor
    return max(floor, int(memory_bytes * UPLOAD_BUFFER_MEMORY_SHARE))


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
