"""The Litestar application and its lifespan (engine supervisor start and stop, graceful drain)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from litestar import Litestar
from litestar.datastructures import State

from qwenasr_appliance import __version__
from qwenasr_appliance.api.context import AppContext, app_context
from qwenasr_appliance.api.docs import docs_assets_router, openapi_config
from qwenasr_appliance.api.errors import EXCEPTION_HANDLERS, MULTIPART_PART_LIMIT
from qwenasr_appliance.api.head import HeadAsGet
from qwenasr_appliance.api.live_page import live_page_routes
from qwenasr_appliance.api.models import ModelsController
from qwenasr_appliance.api.observer import RequestObserver
from qwenasr_appliance.api.ops import OpsController
from qwenasr_appliance.api.realtime import live_sessions, realtime, realtime_without_upgrade
from qwenasr_appliance.api.request_head import RequestHeadLimit
from qwenasr_appliance.api.shutdown import ShutdownGrace
from qwenasr_appliance.api.slow_clients import BodyReadTimeout
from qwenasr_appliance.api.transcriptions import TranscriptionController
from qwenasr_appliance.api.upload_buffer import UploadBuffer, UploadBufferLimit
from qwenasr_appliance.config import (
    Settings,
    apply_env_file,
    load_settings,
    read_environment,
    truncation_risk,
    upload_buffer_limit,
)
from qwenasr_appliance.cpus import process_cpu_budget
from qwenasr_appliance.logs import configure_logging
from qwenasr_appliance.memory import usable_memory_bytes
from qwenasr_appliance.supervisor.factory import EngineFactory, default_engine_factory
from qwenasr_appliance.supervisor.probe import VramProbeFn, probe_vram
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController, admission_limit, follow_engine_capacity
from qwenasr_appliance.transcription.live.decoder import LiveDecoder
from qwenasr_appliance.transcription.live.registry import LiveSessions
from qwenasr_appliance.transcription.pipeline import TranscriptionService

log = structlog.get_logger(__name__)

# Multipart framing and the small text fields around the file.
_FORM_OVERHEAD_BYTES = 1 << 20


async def _drain(admission: AdmissionController, grace_seconds: float) -> None:
    """Give in-flight and queued transcriptions up to `grace_seconds` to finish."""
    if not await admission.wait_idle(grace_seconds):
        log.warning("shutdown.drain_timeout", in_flight=admission.active, queued=admission.queued)


def _lifespan(context: AppContext) -> object:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        log.info(
            "server.starting",
            version=__version__,
            model=context.settings.model_id,
            engine=context.settings.engine,
            quant_mode=context.settings.quant_mode,
            # Worker pools are sized from the CPUs the container may use, not the node's (cpus.py).
            cpu_budget=process_cpu_budget().as_log(),
            decode_workers=context.settings.effective_decode_workers,
            max_concurrent_requests=context.settings.max_concurrent_requests or "engine capacity",
            # Uploads held at once (UPLOAD_BUFFER_BYTES, or from the container's memory: memory.py).
            upload_buffer_bytes=context.upload_buffer.limit,
            memory_bytes=usable_memory_bytes(),
            shutdown_grace_seconds=context.settings.shutdown_grace_seconds,
        )
        risk = truncation_risk(context.settings)
        if risk:
            log.warning("config.truncation_risk", reason=risk)
        await context.supervisor.start()
        context.shutdown.install_signal_handlers()
        # Start the decode workers in the background: the server answers at once.
        warming = asyncio.create_task(context.service.warm_up())
        try:
            yield
        finally:
            warming.cancel()
            log.info("server.stopping", in_flight=context.admission.active, queued=context.admission.queued)
            # Under granian nothing is in flight any more (it drains connections first, see shutdown.py);
            # other servers may start the lifespan shutdown earlier.
            context.shutdown.begin("lifespan shutdown")
            await _drain(context.admission, context.settings.shutdown_grace_seconds + 1.0)
            await live_sessions(app.state).close_all()
            context.shutdown.close()
            await context.supervisor.stop()
            context.service.close()
            log.info("server.stopped")

    return lifespan


def build_litestar(
    settings: Settings, *, engine_factory: EngineFactory | None = None, probe: VramProbeFn | None = None
) -> Litestar:
    """The Litestar app without the outer ASGI wrappers of `create_app` (request observer, `HEAD` as `GET`);
    tests use it to reach `state`, and pass a fake VRAM `probe`."""
    supervisor = EngineSupervisor(
        settings, engine_factory=engine_factory or default_engine_factory, probe=probe or probe_vram
    )
    admission = AdmissionController(
        # MAX_CONCURRENT_REQUESTS=0: 1 until an engine serves, then that engine's capacity.
        max_concurrent=admission_limit(settings.max_concurrent_requests, None),
        max_queue=settings.max_queue_size,
        queue_timeout=settings.queue_timeout_seconds,
    )
    supervisor.add_serving_listener(follow_engine_capacity(admission, settings.max_concurrent_requests))
    service = TranscriptionService(settings, supervisor, admission)
    context = AppContext(
        settings=settings,
        supervisor=supervisor,
        admission=admission,
        service=service,
        shutdown=ShutdownGrace(settings.shutdown_grace_seconds),
        upload_buffer=UploadBuffer(upload_buffer_limit(settings, usable_memory_bytes())),
    )
    live = LiveSessions(settings, LiveDecoder(settings, service, supervisor, admission))
    return Litestar(
        route_handlers=[
            TranscriptionController,
            ModelsController,
            OpsController,
            realtime,
            realtime_without_upgrade,
            *live_page_routes(settings),
            docs_assets_router(),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[
            RequestHeadLimit(),
            BodyReadTimeout(settings.client_timeout_seconds),
            UploadBufferLimit(context.upload_buffer, discard_limit=settings.max_upload_bytes + _FORM_OVERHEAD_BYTES),
        ],
        lifespan=[_lifespan(context)],  # type: ignore[list-item]
        state=State({"context": context, "live": live}),
        request_max_body_size=settings.max_upload_bytes + _FORM_OVERHEAD_BYTES,
        multipart_form_part_limit=MULTIPART_PART_LIMIT,
        openapi_config=openapi_config(),
        logging_config=None,  # logging is ours (structlog), configured in create_app
        debug=False,
    )


def create_app(settings: Settings | None = None, *, engine_factory: EngineFactory | None = None) -> RequestObserver:
    """ASGI application factory (granian calls it with no arguments)."""
    if settings is None:
        environment = read_environment()
        apply_env_file(environment)  # e.g. HF_HUB_OFFLINE set in .env, for the hub library
        settings = load_settings(environment.values)
    configure_logging(settings.log_level, settings.log_format)
    app = build_litestar(settings, engine_factory=engine_factory)
    # granian's worker calls this factory just before it installs its signal handlers: the app takes
    # its stop trigger, so that live sessions wind down before granian cuts WebSockets (shutdown.py).
    app_context(app.state).shutdown.capture_server_stop()
    return RequestObserver(HeadAsGet(app))


__all__ = ["app_context", "build_litestar", "create_app"]
