"""Structured logs: structlog and the standard library (granian, Litestar, vLLM) through one renderer,
JSON lines (`LOG_FORMAT=json`) or coloured console lines (`console`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Final

import structlog

# The most characters of an exception's repr, and of its traceback, written to a log line.
MAX_ERROR_CHARS: Final = 300
MAX_TRACEBACK_CHARS: Final = 8000


def exception_fields(exc: BaseException) -> dict[str, str]:
    """Log fields for an unexpected exception that never echo more than a little client input.

    An exception's repr and message may hold request data (a `UnicodeDecodeError` carries the whole
    buffer it failed on: a 2 MB upload once grew the log by 10 MB), so the repr is clipped to
    `MAX_ERROR_CHARS` and the traceback lists the frames only (file, line, source), not the message.
    """
    text = repr(exc)
    frames = "".join(traceback.format_tb(exc.__traceback__))
    return {
        "error_type": type(exc).__qualname__,
        "error": text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "...",
        "traceback_frames": frames[-MAX_TRACEBACK_CHARS:],
    }


def _console_colors() -> bool:
    """Colours only on a terminal, and not with NO_COLOR set (no-color.org): a log redirected to a file
    otherwise fills with ANSI escapes."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _renderer(fmt: str) -> structlog.types.Processor:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=_console_colors())
    return structlog.processors.JSONRenderer()


def granian_log_config(fmt: str) -> dict[str, Any]:
    """A logging dictconfig for granian's own process, so its lines share our format."""
    formatter = {
        "()": "structlog.stdlib.ProcessorFormatter",
        "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, _renderer(fmt)],
        "foreign_pre_chain": [
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    }
    return {"formatters": {"generic": formatter, "access": formatter}}


# Libraries that give their own logger a handler of its own (raw text on stderr): each of their lines
# would be printed twice, raw and through ours.
_LIBRARIES_WITH_HANDLERS = ("huggingface_hub", "transformers", "qwen_asr")


def adopt_library_loggers(names: tuple[str, ...] = _LIBRARIES_WITH_HANDLERS) -> None:
    """Remove the handlers these libraries installed on their loggers and let their records reach ours,
    so each line appears once, in our format. Call it after importing them (they add handlers on import)."""
    for name in names:
        library = logging.getLogger(name)
        for handler in list(library.handlers):
            if type(handler) is logging.StreamHandler:
                library.removeHandler(handler)
        library.propagate = True


def library_formatter(fmt: str = "json") -> logging.Formatter:
    """A logging formatter that renders standard-library records like ours (used by `vllm_logging_config`)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _renderer(fmt),
        ],
    )


def vllm_logging_config(level: str, fmt: str) -> dict[str, Any]:
    """vLLM's logging dictconfig (`VLLM_LOGGING_CONFIG_PATH`): its lines, in this process and in its engine
    core processes, on stdout in our format instead of vLLM's own."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"appliance": {"()": f"{__name__}.library_formatter", "fmt": fmt}},
        "handlers": {
            "appliance": {"class": "logging.StreamHandler", "formatter": "appliance", "stream": "ext://sys.stdout"}
        },
        "loggers": {"vllm": {"handlers": ["appliance"], "level": level.upper(), "propagate": False}},
    }


def _point_vllm_at_our_format(level: str, fmt: str) -> None:
    if "VLLM_LOGGING_CONFIG_PATH" in os.environ or importlib.util.find_spec("vllm") is None:
        return
    path = Path(tempfile.gettempdir()) / f"qwenasr-vllm-logging-{os.getpid()}.json"
    try:
        path.write_text(json.dumps(vllm_logging_config(level, fmt)))
    except OSError:
        return  # vLLM keeps its own format
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)


def configure_logging(level: str, fmt: str) -> None:
    """Route structlog and the standard library (granian, litestar) through one JSON or console renderer."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer = _renderer(fmt)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "multipart"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # libraries' `warnings.warn` as log lines in our format, not raw stderr
    adopt_library_loggers()
    _point_vllm_at_our_format(level, fmt)
