"""Structured logs: structlog and the standard library (granian, Litestar, vLLM) through one renderer,
JSON lines (`LOG_FORMAT=json`) or coloured console lines (`console`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


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
