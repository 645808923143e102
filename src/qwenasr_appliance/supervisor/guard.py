"""The supervisors' background tasks: how an unexpected error in one is reported, and how errors read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

logger = structlog.get_logger()


def error_text(exc: BaseException) -> str:
    """`Type: message` (or the type alone when the message is empty), as `/status` and the logs show it."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def guarded(work: Coroutine[Any, Any, None], event: str, on_error: Callable[[str], Awaitable[None]]) -> None:
    """Run a supervisor's background `work`; an unexpected exception is logged as `event` and handed to
    `on_error` as text, so a bug never leaves the state stuck in "loading". Cancellation propagates."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception(event)
        await on_error(error_text(exc))
