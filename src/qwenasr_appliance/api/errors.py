"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure a client can see goes through `APIError`; the exception handlers below turn Litestar's
own exceptions (validation, 404, 405, 413...) and anything unexpected into the same shape, so no
request ever gets an HTML page or a bare 500 traceback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_404_NOT_FOUND,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_415_UNSUPPORTED_MEDIA_TYPE,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from qwenasr_appliance.logs import exception_fields

log = structlog.get_logger(__name__)


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def to_response(self) -> Response[ErrorResponse]:
        return Response(self.body(), status_code=self.status_code, headers=self.headers, media_type=MediaType.JSON)


_ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid field, malformed multipart form, or a file that is not audio or does not decode",
    401: "Missing or invalid API key (when API keys are configured)",
    404: "Unknown model",
    408: "The request body stalled",
    413: "Upload over the size limit, or a multipart form over the parser's limits",
    415: "Not a multipart/form-data request",
    429: "The queue is full; retry after Retry-After seconds",
    500: "Unexpected server error",
    503: "The model is loading or restarting, or the server is shutting down; retry after Retry-After seconds. "
    "Without Retry-After (code engine_failed) the failure is permanent until the server is restarted",
    504: "The transcription took longer than the server's time limit",
}


def error_responses(*status_codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the errors a route can answer, all in OpenAI's error shape."""
    return {
        code: ResponseSpec(ErrorResponse, description=_ERROR_DESCRIPTIONS[code], generate_examples=False)
        for code in status_codes
    }


def clip(value: str, limit: int = 64) -> str:
    """A client-sent value as echoed in an error message: cut to `limit` characters."""
    return value if len(value) <= limit else value[:limit] + "..."


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(HTTP_400_BAD_REQUEST, message, param=param, code=code)


def model_not_found(model: str, served: Sequence[str]) -> APIError:
    """404 for a `model` this server does not serve; the message lists the names it accepts (`served`)."""
    names = ", ".join(f"'{name}'" for name in served)
    return APIError(
        HTTP_404_NOT_FOUND,
        f"The model '{clip(model)}' does not exist. This server serves {names}"
        " (more names can be configured with SERVED_MODEL_NAME, comma-separated).",
        param="model",
        code="model_not_found",
    )


def unsupported_media(message: str, *, param: str | None = None) -> APIError:
    """415 for a request body that is not multipart/form-data at all (a file that is not audio is a 400
    `unsupported_format`, as OpenAI answers it)."""
    return APIError(HTTP_415_UNSUPPORTED_MEDIA_TYPE, message, param=param, code="unsupported_media_type")


def too_large(message: str, *, param: str | None = "file") -> APIError:
    return APIError(HTTP_413_REQUEST_ENTITY_TOO_LARGE, message, param=param, code="file_too_large")


def unavailable(message: str, retry_after: int | None, *, code: str = "engine_unavailable") -> APIError:
    """503; `retry_after` None (a permanent failure) sends no Retry-After, which would promise recovery."""
    return APIError(
        HTTP_503_SERVICE_UNAVAILABLE,
        message,
        type="service_unavailable",
        code=code,
        headers={} if retry_after is None else {"Retry-After": str(max(1, retry_after))},
    )


def overloaded(message: str, retry_after: int) -> APIError:
    return APIError(
        HTTP_429_TOO_MANY_REQUESTS,
        message,
        type="rate_limit_error",
        code="server_overloaded",
        headers={"Retry-After": str(max(1, retry_after))},
    )


def unauthorized() -> APIError:
    return APIError(
        HTTP_401_UNAUTHORIZED,
        "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def internal_error(message: str = "The server failed to process the request.") -> APIError:
    return APIError(HTTP_500_INTERNAL_SERVER_ERROR, message, type="server_error", code="internal_error")


_STATUS_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    # One code for an oversized upload, whichever limit trips first (the body while it streams in, or
    # the file after parsing: `too_large`).
    413: ("invalid_request_error", "file_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("service_unavailable", "service_unavailable"),
}


# Most parts a multipart form may have (Litestar's `multipart_form_part_limit`, set in app.py).
MULTIPART_PART_LIMIT = 64
_MULTIPART_LIMIT_DETAIL = "Request Entity Too Large"
_MISSING_FIELD = re.compile(r"missing required field `([^`]+)`")


def multipart_limit() -> APIError:
    """413 for a multipart form over the parser's limits (parts, headers per part, header line length)."""
    return APIError(
        HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        f"The multipart form is over the server's limits: at most {MULTIPART_PART_LIMIT} parts, 8 headers per part "
        "and 4 KiB per part header line.",
        code="multipart_limit",
    )


def _validation_details(exc: ValidationException) -> tuple[str, str | None]:
    """A readable message and the offending parameter from Litestar's validation error."""
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], dict):
        first = extra[0]
        key, message = first.get("key"), str(first.get("message") or "")
        missing = _MISSING_FIELD.search(message)
        if missing:
            return f"Missing required parameter: '{missing.group(1)}'.", missing.group(1)
        if key == "file":
            return "'file' must be one uploaded file, sent once.", "file"
        if key and key != "data" and message.endswith("got `array`"):  # a scalar field sent twice or more
            return f"'{clip(str(key))}' was sent more than once; send each parameter once.", str(key)
        if key and key != "data" and message:
            return f"Invalid value for '{clip(str(key))}': {message}", str(key)
        if message:
            return message, None
    return str(exc.detail or "The request is invalid."), None


def api_error_handler(_: Request[Any, Any, Any], exc: APIError) -> Response[ErrorResponse]:
    return exc.to_response()


def _too_large_message(request: Request[Any, Any, Any]) -> str:
    """The 413 of a body over Litestar's `request_max_body_size` (MAX_UPLOAD_BYTES and the form around
    it), naming the upload limit as the handler's own 413 does."""
    context = request.app.state.get("context")
    limit = getattr(getattr(context, "settings", None), "max_upload_bytes", None)
    if limit is None:
        return "The request body is larger than the server accepts."
    return f"The request body is larger than the server accepts: the file may be at most {limit} bytes."


def http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorResponse]:
    status = exc.status_code
    error_type, code = _STATUS_TYPES.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    if isinstance(exc, ValidationException):
        message, param = _validation_details(exc)
    elif status == HTTP_400_BAD_REQUEST and exc.detail == _MULTIPART_LIMIT_DETAIL:
        # Litestar answers a multipart form over one of its parser's limits with this 400.
        return multipart_limit().to_response()
    elif status == HTTP_404_NOT_FOUND:
        message, param = f"No route for {clip(request.method, 16)} {clip(request.url.path, 200)}.", None
    elif status == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        message, param = _too_large_message(request), "file"
    else:
        message, param = str(exc.detail), None
    headers = dict(exc.headers or {})
    return APIError(status, message, type=error_type, param=param, code=code, headers=headers).to_response()


def unexpected_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorResponse]:
    # An exception's repr and message can carry request bytes (a UnicodeDecodeError holds the whole
    # buffer it failed on): only a clipped form of both reaches the log.
    log.error("request.unhandled_error", path=clip(request.url.path, 200), **exception_fields(exc))
    return internal_error().to_response()


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    APIError: api_error_handler,
    HTTPException: http_exception_handler,
    Exception: unexpected_error_handler,
}
