"""Operational endpoints: `/health` (process alive), `/ready` (engine serving), `/status`, `/metrics`."""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from qwenasr_appliance import __version__
from qwenasr_appliance.api.auth import require_api_key_for_ops
from qwenasr_appliance.api.context import AppContext, request_context
from qwenasr_appliance.api.errors import error_responses
from qwenasr_appliance.api.schemas import (
    HealthResponse,
    LimitsStatus,
    QueueStatus,
    ReadyResponse,
    StatusResponse,
)
from qwenasr_appliance.metrics import METRICS, render_latest
from qwenasr_appliance.workers import live_pools


def observe_worker_pools() -> str | None:
    """Set `qwenasr_worker_processes` from every running worker pool; the reason the server cannot
    serve when a pool has no usable worker (all stopped, hung past a deadline), else None."""
    reasons = []
    for pool in live_pools():
        status = pool.status()
        states = {"idle": status.idle, "busy": status.busy, "stalled": status.stalled, "starting": status.starting}
        for state, count in states.items():
            METRICS.worker_processes.labels(pool=status.name, state=state).set(count)
        if status.usable == 0:
            reasons.append(
                f"no {status.name} worker process is usable ({status.stalled} of {status.processes} stalled, "
                f"{status.starting} starting; "
                f"replaced so far: {status.replaced or 'none'})"
            )
    return "; ".join(reasons) or None


DRAINING_REASON = "the server is shutting down: it finishes the requests it holds and takes no new ones"


def readiness(context: AppContext) -> tuple[bool, str | None]:
    """Whether the server takes new work, and why not: the engine serving (and not held from traffic
    as a CPU fallback where a GPU is expected), every worker pool usable, and no shutdown under way."""
    supervisor = context.supervisor
    # Serving on the CPU where a GPU is expected, with GPU_FALLBACK=not_ready: 503 in state `degraded`.
    held = supervisor.held_from_traffic
    workers_down = observe_worker_pools()  # a pool with no usable worker (issue 12)
    draining = DRAINING_REASON if context.shutdown.draining else None
    ready = supervisor.ready and held is None and workers_down is None and draining is None
    return ready, None if ready else (draining or held or supervisor.not_ready_reason or workers_down)


class OpsController(Controller):
    path = "/"
    guards = [require_api_key_for_ops]
    tags = ["operations"]
    include_in_schema = True

    @get(
        "/health",
        summary="Liveness: the process answers, and its engine has not failed for good",
        responses={
            503: ResponseSpec(
                HealthResponse, description="The engine failed for good: restart the server", generate_examples=False
            ),
            **error_responses(401),
        },
    )
    async def health(self, request: Request[Any, Any, State]) -> Response[HealthResponse]:
        # `failed` is final (every plan failed, or ENGINE_RESTART_MAX deaths): only a restart can bring
        # the engine back, so a liveness probe that restarts the container is the remedy. Loading,
        # restarting and draining keep 200: they end by themselves.
        supervisor = request_context(request).supervisor
        if supervisor.state == "failed":
            return Response(HealthResponse(status="failed", reason=supervisor.not_ready_reason), status_code=503)
        return Response(HealthResponse(status="ok"), status_code=200)

    @get(
        "/ready",
        summary="Readiness: 200 only when the engine can serve",
        responses={
            503: ResponseSpec(ReadyResponse, description="The engine is not serving", generate_examples=False),
            **error_responses(401),
        },
    )
    async def ready(self, request: Request[Any, Any, State]) -> Response[ReadyResponse]:
        context = request_context(request)
        status = context.supervisor.snapshot()
        ready, reason = readiness(context)
        permanent = status.state == "failed"
        body = ReadyResponse(ready=ready, state=status.state, reason=reason, permanent=permanent)
        if ready:
            return Response(body, status_code=200)
        # A permanent failure gets no Retry-After: it would promise a recovery that will not come.
        return Response(body, status_code=503, headers={} if permanent else {"Retry-After": "10"})

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
            ready=readiness(context)[0],  # as /ready says
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
        observe_worker_pools()
        body, content_type = render_latest()
        # Litestar appends `; charset=utf-8` to text types itself: drop the one the content type has.
        media_type = "; ".join(p.strip() for p in content_type.split(";") if not p.strip().startswith("charset="))
        return Response(body, media_type=media_type)
