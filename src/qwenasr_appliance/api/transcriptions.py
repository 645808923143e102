"""`POST /v1/audio/transcriptions` and `POST /v1/audio/translations` (OpenAI's audio API)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import structlog
from litestar import Controller, Request, Response, post
from litestar.datastructures import State
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Stream

from qwenasr_appliance.api.auth import require_api_key
from qwenasr_appliance.api.context import AppContext, request_context
from qwenasr_appliance.api.disconnect import ClientDisconnected, cancel_on_disconnect
from qwenasr_appliance.api.error_mapping import outcome, to_api_error
from qwenasr_appliance.api.errors import ErrorResponse, bad_request, clip, error_responses, too_large, unsupported_media
from qwenasr_appliance.api.form import parse_form
from qwenasr_appliance.api.multipart import FormRequest
from qwenasr_appliance.api.observer import REQUEST_ID, REQUEST_STATS
from qwenasr_appliance.api.render import render, transcript_headers
from qwenasr_appliance.api.schemas import TranscriptionForm
from qwenasr_appliance.api.streaming import sse_events
from qwenasr_appliance.metrics import METRICS
from qwenasr_appliance.transcription.types import RequestStats

log = structlog.get_logger(__name__)


async def read_multipart_form(request: Request[Any, Any, State]) -> None:
    """Before the handler's arguments are built: OpenAI's audio endpoints take multipart/form-data only,
    and the form is parsed here by `FormRequest` (Litestar's own parser, which would otherwise run when
    it builds `data`, fails on parts without a filename; see api/multipart.py)."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise unsupported_media(
            "The request must be multipart/form-data with the audio in the 'file' field "
            f"(got {clip(content_type) or 'no content type'!r}).",
            param=None,
        )
    await request.form()


def _truncation_header(stats: RequestStats) -> dict[str, str]:
    """`X-Audio-Truncated: true` when the upload's audio broke off and only what came before it was
    transcribed (a cut or damaged file, decoded as far as it goes, as FFmpeg does): the answer says so,
    and `X-Audio-Duration` gives how much was used."""
    return {"X-Audio-Truncated": "true"} if stats.audio_truncated else {}


class TranscriptionController(Controller):
    path = "/v1/audio"
    guards = [require_api_key]
    request_class = FormRequest  # a multipart parser that takes parts of any shape (api/multipart.py)
    tags = ["audio"]

    @post(
        "/transcriptions",
        status_code=200,
        before_request=read_multipart_form,
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
            error = to_api_error(exc)
            METRICS.transcriptions.labels(outcome=outcome(error)).inc()
            raise error from None

    async def _transcribe(
        self, request: Request[Any, Any, State], context: AppContext, form: TranscriptionForm, stats: RequestStats
    ) -> Response[bytes] | Stream:
        settings = context.settings
        params = parse_form(form, settings)
        audio = await form.file.read()
        await form.file.close()
        if len(audio) > settings.max_upload_bytes:
            raise too_large(f"The file is {len(audio)} bytes; the limit is {settings.max_upload_bytes} bytes.")
        transcription = params.to_request(audio, form.file.filename or None)
        request_id = REQUEST_ID.get()
        if params.stream:
            events = context.service.stream(transcription, request_id, stats)
            stop = context.shutdown.expired
            first = await cancel_on_disconnect(request.receive, anext(events), stop=stop)
            return Stream(
                sse_events(first, events, stop, logprobs=params.logprobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **_truncation_header(stats)},
            )
        transcript = await cancel_on_disconnect(
            request.receive,
            context.service.transcribe(transcription, request_id, stats),
            stop=context.shutdown.expired,
        )
        started = time.perf_counter()
        body, content_type = render(transcript, params.response_format, logprobs=params.logprobs)
        METRICS.stage_duration.labels(stage="response").observe(time.perf_counter() - started)
        METRICS.transcriptions.labels(outcome="ok").inc()
        headers = {**transcript_headers(transcript), **_truncation_header(stats)}
        if transcript.truncated:
            headers["X-Transcript-Truncated"] = "true"  # a chunk hit MAX_NEW_TOKENS: text may be missing
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
