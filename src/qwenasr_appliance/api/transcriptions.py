"""`POST /v1/audio/transcriptions` and `POST /v1/audio/translations` (OpenAI's audio API)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
import structlog
from litestar import Controller, Request, Response, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Stream

from qwenasr_appliance.admission import Overloaded
from qwenasr_appliance.aligner.base import AlignerDeadError, AlignerError
from qwenasr_appliance.api.auth import require_api_key
from qwenasr_appliance.api.context import AppContext, request_context
from qwenasr_appliance.api.disconnect import ClientDisconnected, cancel_on_disconnect
from qwenasr_appliance.audio.decode import AudioError
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import EngineDeadError, EngineError
from qwenasr_appliance.errors import (
    APIError,
    ErrorResponse,
    bad_request,
    clip,
    error_responses,
    internal_error,
    model_not_found,
    overloaded,
    too_large,
    unavailable,
    unsupported_media,
)
from qwenasr_appliance.formats import render
from qwenasr_appliance.languages import UnsupportedLanguageError, resolve_language
from qwenasr_appliance.metrics import METRICS
from qwenasr_appliance.observability import REQUEST_ID, REQUEST_STATS
from qwenasr_appliance.schemas import RESPONSE_FORMATS, TIMESTAMP_GRANULARITIES, TranscriptionForm
from qwenasr_appliance.service import RequestStats, StreamDelta, StreamDone, StreamEvent, TranscriptionRequest
from qwenasr_appliance.shutdown import ServerStopping
from qwenasr_appliance.supervisor.aligner import AlignerUnavailable
from qwenasr_appliance.supervisor.supervisor import EngineUnavailable

log = structlog.get_logger(__name__)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
_AUDIO_ERROR_STATUS = {"unsupported_format": 415, "file_too_large": 413, "decode_failed": 503}


async def require_multipart(request: Request[Any, Any, State]) -> None:
    """Before the body is parsed: OpenAI's audio endpoints take multipart/form-data only."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise unsupported_media(
            "The request must be multipart/form-data with the audio in the 'file' field "
            f"(got {clip(content_type) or 'no content type'!r}).",
            param=None,
        )


def _parse_bool(value: str | None, param: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise bad_request(f"'{param}' must be true or false.", param=param)


def _parse_temperature(value: str | None) -> float:
    if value is None or not value.strip():
        return 0.0
    try:
        temperature = float(value)
    except ValueError:
        raise bad_request("'temperature' must be a number between 0 and 1.", param="temperature") from None
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 1.0:
        raise bad_request("'temperature' must be a number between 0 and 1.", param="temperature")
    return temperature


def _granularities(value: list[str] | str | None) -> set[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    granularities = {item.strip().lower() for item in items if item.strip()}
    unknown = granularities - set(TIMESTAMP_GRANULARITIES)
    if unknown:
        raise bad_request(
            f"Unsupported timestamp granularity {clip(sorted(unknown)[0])!r}; use 'segment' or 'word'.",
            param="timestamp_granularities[]",
        )
    return granularities


def validate_form(form: TranscriptionForm, settings: Settings) -> tuple[str, str | None, str, float, bool]:
    """Check every field except the file; returns (response_format, language, prompt, temperature, stream)."""
    if form.model.strip() not in {settings.model_name, settings.model_id}:
        raise model_not_found(form.model)
    response_format = form.response_format.strip().lower()
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(
            f"Unsupported response_format {clip(form.response_format)!r}; use one of {', '.join(RESPONSE_FORMATS)}.",
            param="response_format",
        )
    language: str | None = None
    if form.language and form.language.strip():
        try:
            language = resolve_language(form.language)
        except UnsupportedLanguageError as exc:
            raise bad_request(str(exc), param="language", code="unsupported_language") from None
    prompt = form.prompt or ""
    if len(prompt) > settings.max_prompt_chars:
        raise bad_request(
            f"'prompt' is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}.",
            param="prompt",
        )
    temperature = _parse_temperature(form.temperature)
    granularities = _granularities(form.timestamp_granularities)
    if granularities and response_format != "verbose_json":
        raise bad_request(
            "'timestamp_granularities[]' requires response_format 'verbose_json'.",
            param="timestamp_granularities[]",
        )
    if "word" in granularities and not settings.aligner_model_id:
        raise bad_request(
            "Word timestamps need the forced aligner, which this server does not load: its operator can "
            "enable them with ALIGNER_MODEL_ID=Qwen/Qwen3-ForcedAligner-0.6B. Segment timestamps are "
            "available ('timestamp_granularities[]=segment').",
            param="timestamp_granularities[]",
            code="word_timestamps_unavailable",
        )
    stream = _parse_bool(form.stream, "stream")
    if stream and response_format not in {"json", "text"}:
        raise bad_request(
            f"stream=true is available with response_format 'json' or 'text', not {response_format!r}.",
            param="stream",
        )
    return response_format, language, prompt, temperature, stream


def _map_error(exc: Exception) -> APIError:
    """Turn pipeline failures into client-facing errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineUnavailable):
        return unavailable(f"The model is not ready: {exc.reason}", exc.retry_after_seconds)
    if isinstance(exc, AlignerUnavailable):
        return unavailable(
            f"Word timestamps are unavailable: {exc.reason}. Other requests are served as usual.",
            exc.retry_after_seconds,
            code="aligner_unavailable",
        )
    if isinstance(exc, AlignerDeadError):
        return unavailable(
            "The forced aligner failed during the request and is restarting.", 10, code="aligner_restarting"
        )
    if isinstance(exc, AlignerError):
        return internal_error(f"Word alignment failed: {exc}")
    if isinstance(exc, Overloaded):
        return overloaded("The server is at capacity; retry after the time in the Retry-After header.", exc.retry_after)
    if isinstance(exc, AudioError):
        status = _AUDIO_ERROR_STATUS.get(exc.code, 400)
        if status >= 500:
            return APIError(status, str(exc), type="service_unavailable", code=exc.code, headers={"Retry-After": "5"})
        return APIError(status, str(exc), param="file", code=exc.code)
    if isinstance(exc, ServerStopping):
        return unavailable(
            "The server is shutting down and stopped this request before it finished; retry it.",
            1,
            code="server_shutting_down",
        )
    if isinstance(exc, EngineDeadError):
        return unavailable(
            "The engine failed while processing the request and is restarting.", 5, code="engine_restarting"
        )
    if isinstance(exc, TimeoutError):
        return APIError(
            504, "The transcription took longer than the server's time limit.", type="server_error", code="timeout"
        )
    if isinstance(exc, EngineError):
        return internal_error(f"The engine failed to process the request: {exc}")
    log.error("transcription.unexpected_error", error=repr(exc), exc_info=exc)
    return internal_error()


def _outcome(error: APIError) -> str:
    if error.code == "server_shutting_down":
        return "cancelled"
    rejections = ("server_overloaded", "engine_unavailable", "aligner_unavailable")
    if error.status_code in (429, 503) and error.code in rejections:
        return "rejected"
    return "client_error" if error.status_code < 500 else "engine_error"


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _next_event(rest: AsyncIterator[StreamEvent], stop: asyncio.Event) -> StreamEvent | None:
    """The next event, or `ServerStopping` when the shutdown grace period ends first."""
    if stop.is_set():
        raise ServerStopping
    following = asyncio.ensure_future(anext(rest, None))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({following, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
    if following.cancelled():
        raise ServerStopping
    return following.result()


async def _sse_events(
    first: StreamEvent, rest: AsyncIterator[StreamEvent], stop: asyncio.Event
) -> AsyncIterator[bytes]:
    event: StreamEvent | None = first
    try:
        while event is not None:
            if isinstance(event, StreamDelta):
                yield _sse({"type": "transcript.text.delta", "delta": event.text})
            elif isinstance(event, StreamDone):
                transcript = event.transcript
                yield _sse(
                    {
                        "type": "transcript.text.done",
                        "text": transcript.text,
                        "usage": {"type": "duration", "seconds": round(transcript.duration, 3)},
                    }
                )
            event = await _next_event(rest, stop)
        METRICS.transcriptions.labels(outcome="ok").inc()
    except Exception as exc:
        error = _map_error(exc)
        METRICS.transcriptions.labels(outcome=_outcome(error)).inc()
        yield _sse({"type": "error", "error": {"message": error.message, "type": error.type, "code": error.code}})
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


class TranscriptionController(Controller):
    path = "/v1/audio"
    guards = [require_api_key]
    tags = ["audio"]

    @post(
        "/transcriptions",
        status_code=200,
        before_request=require_multipart,
        summary="Transcribe audio",
        description="OpenAI-compatible transcription. Formats: json, text, srt, vtt, verbose_json; stream=true "
        "answers with Server-Sent Events (transcript.text.delta, transcript.text.done).",
        responses=error_responses(400, 401, 404, 408, 413, 415, 429, 500, 503, 504),
    )
    async def create_transcription(
        self,
        request: Request[Any, Any, State],
        data: Annotated[TranscriptionForm, Body(media_type=RequestEncodingType.MULTI_PART)],
    ) -> Response[bytes] | Stream:
        context = request_context(request)
        stats = REQUEST_STATS.get() or RequestStats()
        try:
            return await self._transcribe(request, context, data, stats)
        except ClientDisconnected:
            METRICS.transcriptions.labels(outcome="cancelled").inc()
            log.info("transcription.client_disconnected")
            return Response(b"", status_code=499)
        except Exception as exc:
            error = _map_error(exc)
            METRICS.transcriptions.labels(outcome=_outcome(error)).inc()
            raise error from None

    async def _transcribe(
        self, request: Request[Any, Any, State], context: AppContext, form: TranscriptionForm, stats: RequestStats
    ) -> Response[bytes] | Stream:
        settings = context.settings
        response_format, language, prompt, temperature, stream = validate_form(form, settings)
        audio = await form.file.read()
        await form.file.close()
        if len(audio) > settings.max_upload_bytes:
            raise too_large(f"The file is {len(audio)} bytes; the limit is {settings.max_upload_bytes} bytes.")
        transcription = TranscriptionRequest(
            audio=audio,
            filename=form.file.filename,
            language=language,
            prompt=prompt,
            response_format=response_format,
            temperature=temperature,
            stream=stream,
            word_timestamps="word" in _granularities(form.timestamp_granularities),
        )
        request_id = REQUEST_ID.get()
        if stream:
            events = context.service.stream(transcription, request_id, stats)
            stop = context.shutdown.expired
            first = await cancel_on_disconnect(request.receive, anext(events), stop=stop)
            return Stream(
                _sse_events(first, events, stop),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        transcript = await cancel_on_disconnect(
            request.receive,
            context.service.transcribe(transcription, request_id, stats),
            stop=context.shutdown.expired,
        )
        started = time.perf_counter()
        body, content_type = render(transcript, response_format)
        METRICS.stage_duration.labels(stage="response").observe(time.perf_counter() - started)
        METRICS.transcriptions.labels(outcome="ok").inc()
        headers = {"X-Audio-Duration": f"{transcript.duration:.3f}"}
        if transcript.language:
            headers["Content-Language"] = transcript.language.lower()
        return Response(body, media_type=content_type, headers=headers)

    @post(
        "/translations",
        status_code=400,
        summary="Translate audio (not supported)",
        description="Qwen3-ASR transcribes; it does not translate. Always answers 400 in OpenAI's error shape.",
        responses=error_responses(400, 401),
    )
    async def create_translation(self) -> ErrorResponse:
        raise bad_request(
            "Translation is not supported: Qwen3-ASR transcribes speech in its own language. "
            "Use /v1/audio/transcriptions.",
            param=None,
            code="unsupported_operation",
        )
