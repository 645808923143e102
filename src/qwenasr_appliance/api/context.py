"""What route handlers reach through `app.state`: one object built at start-up."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from litestar import Request
from litestar.datastructures import State

from qwenasr_appliance.api.shutdown import ShutdownGrace
from qwenasr_appliance.api.upload_buffer import UploadBuffer
from qwenasr_appliance.config import Settings
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.pipeline import TranscriptionService


@dataclass
class AppContext:
    settings: Settings
    supervisor: EngineSupervisor
    admission: AdmissionController
    service: TranscriptionService
    shutdown: ShutdownGrace
    upload_buffer: UploadBuffer
    started_at: float = field(default_factory=time.monotonic)


def app_context(state: State) -> AppContext:
    context = state["context"]
    assert isinstance(context, AppContext)
    return context


def request_context(request: Request[object, object, State]) -> AppContext:
    return app_context(request.app.state)
