"""The pipeline's exceptions as OpenAI-style errors: one table, read top to bottom (the first type that
matches wins, so a subclass stands above its base), and the outcome label each error counts under in
`qwenasr_transcriptions_total`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import structlog

from qwenasr_appliance.aligner.base import AlignerDeadError, AlignerError
from qwenasr_appliance.api.errors import APIError, internal_error, overloaded, unavailable
from qwenasr_appliance.api.shutdown import ServerStopping
from qwenasr_appliance.audio.decode import AudioError
from qwenasr_appliance.engines.base import EngineDeadError, EngineError
from qwenasr_appliance.logs import exception_fields
from qwenasr_appliance.supervisor.aligner_supervisor import AlignerUnavailable
from qwenasr_appliance.supervisor.supervisor import EngineUnavailable
from qwenasr_appliance.transcription.admission import Overloaded
from qwenasr_appliance.workers import WorkerCrashedError, WorkerTimeoutError

log = structlog.get_logger(__name__)

# Not audio, or a format no decoder reads: 400 as OpenAI answers it ("Invalid file format", an
# `invalid_request_error`); the SDKs map 400 to `BadRequestError` but 415 to a generic status error.
_AUDIO_ERROR_STATUS: Final = {"unsupported_format": 400, "file_too_large": 413, "decode_failed": 503}


def _audio_error(exc: AudioError) -> APIError:
    status = _AUDIO_ERROR_STATUS.get(exc.code, 400)
    if status >= 500:
        return APIError(status, str(exc), type="service_unavailable", code=exc.code, headers={"Retry-After": "5"})
    return APIError(status, str(exc), param="file", code=exc.code)


_ERROR_TABLE: Final[tuple[tuple[type[Exception], Callable[[Any], APIError]], ...]] = (
    (APIError, lambda exc: exc),
    (
        EngineUnavailable,
        lambda exc: unavailable(
            f"The model is not ready: {exc.reason}",
            exc.retry_after_seconds,
            code="engine_failed" if exc.permanent else "engine_unavailable",
        ),
    ),
    (
        AlignerUnavailable,
        lambda exc: unavailable(
            f"Word timestamps are unavailable: {exc.reason}. Other requests are served as usual.",
            exc.retry_after_seconds,
            code="aligner_unavailable",
        ),
    ),
    (
        AlignerDeadError,
        lambda _: unavailable(
            "The forced aligner failed during the request and is restarting.", 10, code="aligner_restarting"
        ),
    ),
    (AlignerError, lambda exc: internal_error(f"Word alignment failed: {exc}")),
    (
        Overloaded,
        lambda exc: overloaded(
            "The server is at capacity; retry after the time in the Retry-After header.", exc.retry_after
        ),
    ),
    (AudioError, _audio_error),
    (
        ServerStopping,
        lambda _: unavailable(
            "The server is shutting down and stopped this request before it finished; retry it.",
            1,
            code="server_shutting_down",
        ),
    ),
    (
        EngineDeadError,
        lambda _: unavailable(
            "The engine failed while processing the request and is restarting.", 5, code="engine_restarting"
        ),
    ),
    (
        WorkerCrashedError,
        lambda _: unavailable(
            "A worker process of the server stopped while handling the request and was replaced; retry it.",
            5,
            code="worker_restarting",
        ),
    ),
    (
        WorkerTimeoutError,
        lambda exc: APIError(
            504,
            f"The server did not finish in time: {exc}. Retry the request.",
            type="server_error",
            code="timeout",
            headers={"Retry-After": "5"},
        ),
    ),
    (
        TimeoutError,
        lambda _: APIError(
            504, "The transcription took longer than the server's time limit.", type="server_error", code="timeout"
        ),
    ),
    (EngineError, lambda exc: internal_error(f"The engine failed to process the request: {exc}")),
)


def to_api_error(exc: Exception) -> APIError:
    """The client-facing error for a failure of the transcription pipeline; an unexpected one is logged
    and answered 500 `internal_error`."""
    for kind, convert in _ERROR_TABLE:
        if isinstance(exc, kind):
            return convert(exc)
    log.error("transcription.unexpected_error", **exception_fields(exc))
    return internal_error()


def outcome(error: APIError) -> str:
    """The `outcome` label of `qwenasr_transcriptions_total` for a request that ended in `error`."""
    if error.code == "server_shutting_down":
        return "cancelled"
    rejections = ("server_overloaded", "engine_unavailable", "engine_failed", "aligner_unavailable")
    if error.status_code in (429, 503) and error.code in rejections:
        return "rejected"
    return "client_error" if error.status_code < 500 else "engine_error"
