"""Operational endpoints: `/health` (process alive), `/ready` (engine serving), `/status`, `/metrics`."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from qwenasr_appliance import __version__
from qwenasr_appliance.api.auth import require_api_key_for_ops
from qwenasr_appliance.api.context import request_context
from qwenasr_appliance.api.errors import error_responses
from qwenasr_appliance.api.schemas import (
    HealthResponse,
    LimitsStatus,
    QueueStatus,
    ReadyResponse,
    StatusResponse,
)
from qwenasr_appliance.metrics import render_latest


class OpsController(Controller):
    path = "/"
    guards = [require_api_key_for_ops]
    tags = ["operations"]
    include_in_schema = True

    @get("/health", summary="Liveness: the process answers", responses=error_responses(401))
    async def health(self) -> HealthResponse:
        return HealthResponse()

    @get(
        "/ready",
        summary="Readiness: 200 only when the engine can serve",
        responses={
            503: ResponseSpec(ReadyResponse, description="The engine is not serving", generate_examples=False),
            **error_responses(401),
        },
    )
    async def ready(self, request: Request[Any, Any, State]) -> Response[ReadyResponse]:
        supervisor = request_context(request).supervisor
        status = supervisor.snapshot()
        # Serving on the CPU where a GPU is expected, with GPU_FALLBACK=not_ready: 503 in state `degraded`.
        held = supervisor.held_from_traffic
        ready = supervisor.ready and held is None
        body = ReadyResponse(ready=ready, state=status.state, reason=held or supervisor.not_ready_reason)
        if ready:
            return Response(body, status_code=200)
        return Response(body, status_code=503, headers={"Retry-After": "10"})

    @get(
        "/status",
        summary="Engine and aligner state, plan, attempts, VRAM, queue, uptime and version",
        responses=error_responses(401),
    )
    async def status(self, request: Request[Any, Any, State]) -> StatusResponse:
        context = request_context(request)
        settings = context.settings
        admission = context.admission
        return StatusResponse(
            version=__version__,
            model=settings.model_id,
            served_model_name=settings.model_name,
            uptime_seconds=round(time.monotonic() - context.started_at, 3),
            ready=context.supervisor.ready and context.supervisor.held_from_traffic is None,  # as /ready says
            engine=context.supervisor.snapshot(),
            aligner=context.supervisor.aligner.snapshot(),
            queue=QueueStatus(
                in_flight=admission.active,
                queued=admission.queued,
                max_concurrent_requests=admission.limit,
                max_queue_size=admission.max_queue,
            ),
            limits=LimitsStatus(
                max_upload_bytes=settings.max_upload_bytes,
                max_audio_seconds=settings.max_audio_seconds,
                chunk_seconds=settings.chunk_seconds,
            ),
        )

    @get(
        "/metrics",
        summary="Prometheus metrics",
        media_type=MediaType.TEXT,
        responses=error_responses(401),
    )
    async def metrics(self) -> Response[bytes]:
        body, content_type = render_latest()
        # Litestar appends `; charset=utf-8` to text types itself: drop the one the content type has.
        media_type = "; ".join(p.strip() for p in content_type.split(";") if not p.strip().startswith("charset="))
        return Response(body, media_type=media_type)
