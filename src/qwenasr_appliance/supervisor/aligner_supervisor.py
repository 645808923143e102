"""The forced aligner's lifecycle, owned by the engine supervisor.

The aligner is optional (`ALIGNER_MODEL_ID`) and never decides whether the server is ready: the ASR
model loads first and serves as soon as it is up; the aligner loads after it, in its own task, with the
plan `plans.aligner_plan` picks next to the ASR plan. States (`GET /status` shows them under `aligner`):

    disabled                                     (no ALIGNER_MODEL_ID)
    waiting -> loading -> ready | failed         (loading starts once the ASR model serves)
    ready -> restarting -> ready | failed        (the aligner died while serving)
    any -> stopped                               (stop())

While it is not `ready`, requests for word timestamps get `AlignerUnavailable` (a 503 that says why);
everything else is served as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any, Final, Literal

import structlog

from qwenasr_appliance.aligner.base import Aligner, AlignerDescription
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import EngineLoadError
from qwenasr_appliance.supervisor.factory import ALIGNER_CLASSES, AlignerFactory, import_engine_class
from qwenasr_appliance.supervisor.guard import error_text, guarded
from qwenasr_appliance.supervisor.plans import NoPlanError, Plan, aligner_plan
from qwenasr_appliance.supervisor.probe import VramProbe, VramProbeFn
from qwenasr_appliance.supervisor.status import AlignerStatus

AlignerState = Literal["disabled", "waiting", "loading", "ready", "failed", "restarting", "stopped"]

RETRY_AFTER_SECONDS: Final[dict[str, int]] = {"waiting": 30, "loading": 15, "restarting": 10, "failed": 300}
CLOSE_TIMEOUT_SECONDS: Final = 60.0
MAX_BACKOFF_SECONDS: Final = 60.0

logger = structlog.get_logger()


class AlignerUnavailable(Exception):
    """No aligner serves; word timestamps answer 503 with `Retry-After: retry_after_seconds`."""

    def __init__(self, state: str, reason: str, retry_after_seconds: int) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds


class AlignerSupervisor:
    """Loads the forced aligner after the ASR model, reports its state, reloads it when it dies."""

    def __init__(self, settings: Settings, *, factory: AlignerFactory, probe: VramProbeFn, default: bool) -> None:
        self._settings = settings
        self._factory = factory
        self._probe_fn = probe
        self._import_first = default  # the real factory: import the module (vLLM takes seconds) off the loop
        self._state: AlignerState = "waiting" if settings.aligner_model_id else "disabled"
        self._error: str | None = None
        self._aligner: Aligner | None = None
        self._description: AlignerDescription | None = None
        self._asr_plan: Plan | None = None
        self._plan: Plan | None = None
        self._task: asyncio.Task[None] | None = None
        self._load_seconds: float | None = None
        self._restarts = 0

    @property
    def state(self) -> AlignerState:
        return self._state

    @property
    def enabled(self) -> bool:
        return self._state != "disabled"

    @property
    def ready(self) -> bool:
        return self._state == "ready" and self._aligner is not None

    def require(self) -> Aligner:
        """The serving aligner; raises `AlignerUnavailable` saying why there is none."""
        aligner = self._aligner
        if self._state == "ready" and aligner is not None:
            return aligner
        reasons = {
            "disabled": "no forced aligner is configured (set ALIGNER_MODEL_ID)",
            "waiting": "the forced aligner loads once the ASR model is ready",
            "loading": "the forced aligner is loading",
            "restarting": f"the forced aligner is restarting after it failed: {self._error}",
            "failed": f"the forced aligner failed: {self._error}",
            "stopped": "the server is shutting down",
        }
        reason = reasons.get(self._state, f"the forced aligner is {self._state}")
        raise AlignerUnavailable(self._state, reason, RETRY_AFTER_SECONDS.get(self._state, 10))

    def snapshot(self) -> AlignerStatus:
        description = self._description if self.ready else None
        return AlignerStatus(
            state=self._state,
            ready=self.ready,
            model=self._settings.aligner_model_id or None,
            plan=self._plan.name if self._plan else None,
            device=description.device if description else None,
            dtype=description.dtype if description else None,
            error=self._error,
            load_seconds=round(self._load_seconds, 3) if self._load_seconds is not None else None,
            restarts=self._restarts,
            details=dict(description.details) if description else {},
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, asr_plan: Plan) -> None:
        """The ASR model serves with `asr_plan`: load the aligner beside it (once; later calls do nothing)."""
        if self._state != "waiting" or self._task is not None:
            return
        self._asr_plan = asr_plan
        self._task = asyncio.create_task(self._guarded(self._load(asr_plan)), name="aligner-load")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        aligner, self._aligner = self._aligner, None
        if aligner is not None:
            await _close_quietly(aligner)
        if self._state != "disabled":
            self._set_state("stopped", self._error)

    async def report_dead(self, aligner: Aligner, error: BaseException | str) -> None:
        """A request saw `aligner` die: reload it (with back-off), however many requests report it."""
        if aligner is not self._aligner or self._state != "ready":
            return
        message = error if isinstance(error, str) else error_text(error)
        self._aligner = None
        logger.error("aligner.dead", plan=self._plan.name if self._plan else None, error=message)
        self._set_state("restarting", message)
        self._task = asyncio.create_task(self._guarded(self._restart(aligner, message)), name="aligner-restart")

    # -- loading ----------------------------------------------------------------------------------

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        await guarded(work, "aligner.supervisor.error", self._on_supervisor_error)

    async def _on_supervisor_error(self, error: str) -> None:
        self._set_state("failed", f"supervisor error: {error}")

    async def _load(self, asr_plan: Plan) -> None:
        self._set_state("loading", None)
        probe = await self._probe() if asr_plan.engine == "vllm" else VramProbe()
        try:
            plan = aligner_plan(self._settings, asr_plan, probe)
        except NoPlanError as exc:
            self._set_state("failed", str(exc))
            return
        self._plan = plan
        error = await self._attempt(plan)
        if error is not None:
            self._set_state("failed", error)

    async def _restart(self, dead: Aligner, message: str) -> None:
        await _close_quietly(dead)
        limit = self._settings.engine_restart_max
        for attempt in range(limit):
            delay = min(self._settings.engine_restart_backoff_seconds * 2**attempt, MAX_BACKOFF_SECONDS)
            self._restarts += 1
            logger.warning("aligner.restart", restart=attempt + 1, limit=limit, delay_seconds=delay)
            await asyncio.sleep(delay)
            plan, asr_plan = self._plan, self._asr_plan
            if plan is None or asr_plan is None:  # only a loaded aligner can die: both are known
                break
            if plan.engine == "vllm":  # what is free may have changed
                try:
                    plan = self._plan = aligner_plan(self._settings, asr_plan, await self._probe())
                except NoPlanError as exc:
                    message = str(exc)
                    continue
            failure = await self._attempt(plan)
            if failure is None:
                return
            message = failure
        self._set_state("failed", f"the aligner died and {limit} reload(s) did not bring it back: {message}")

    async def _attempt(self, plan: Plan) -> str | None:
        """Load `plan`; None when it serves, else what went wrong."""
        began = time.monotonic()
        logger.info("aligner.plan.start", plan=plan.name, model=self._settings.aligner_model_id, reason=plan.reason)
        aligner: Aligner | None = None
        try:
            if self._import_first:
                await asyncio.to_thread(import_engine_class, plan, ALIGNER_CLASSES)
            aligner = self._factory(plan, self._settings)
            await aligner.load()
        except asyncio.CancelledError:
            if aligner is not None:
                await _close_quietly(aligner)
            raise
        except Exception as exc:
            kind = exc.kind if isinstance(exc, EngineLoadError) else "other"
            text = str(exc) if isinstance(exc, EngineLoadError) and str(exc) else error_text(exc)
            if aligner is not None:
                await _close_quietly(aligner)
            logger.warning("aligner.plan.failed", plan=plan.name, kind=kind, error=text)
            return f"{plan.name}: {kind} ({text})"
        self._load_seconds = time.monotonic() - began
        try:
            self._description = aligner.describe()
        except Exception as exc:
            logger.warning("aligner.describe.failed", plan=plan.name, error=error_text(exc))
            self._description = None
        self._aligner = aligner
        self._set_state("ready", None)
        description = self._description
        logger.info(
            "aligner.ready",
            plan=plan.name,
            load_seconds=round(self._load_seconds, 3),
            device=description.device if description else None,
            dtype=description.dtype if description else plan.dtype,
        )
        return None

    async def _probe(self) -> VramProbe:
        try:
            return await asyncio.to_thread(self._probe_fn)
        except Exception as exc:
            return VramProbe(error=f"the VRAM probe failed: {error_text(exc)}")

    def _set_state(self, state: AlignerState, error: str | None) -> None:
        previous, self._state, self._error = self._state, state, error
        if previous != state:
            log = logger.error if state == "failed" else logger.info
            log("aligner.state", previous=previous, state=state, error=error)


async def _close_quietly(aligner: Aligner) -> None:
    try:
        await asyncio.wait_for(aligner.close(), CLOSE_TIMEOUT_SECONDS)
    except Exception as exc:
        logger.warning("aligner.close.failed", error=error_text(exc))


__all__ = ["AlignerState", "AlignerSupervisor", "AlignerUnavailable"]
