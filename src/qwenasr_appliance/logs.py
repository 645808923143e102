"""Structured logs: structlog and the standard library (granian, Litestar, vLLM) through one renderer,
JSON lines (`LOG_FORMAT=json`) or coloured console lines (`console`)."""

from __future__ import annotations

import logging
import sys
import traceback
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


def _renderer(fmt: str) -> structlog.types.Processor:
    return structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()


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
