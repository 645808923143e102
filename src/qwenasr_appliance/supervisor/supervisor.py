"""The engine supervisor: loads the model through the first plan that works, and keeps it serving.

States (the `qwenasr_engine_state` gauge and `GET /status` show them):

    starting -> probing -> loading -> ready | degraded | failed
    ready | degraded -> restarting -> ready | degraded | failed    (the engine died while serving)
    any -> stopped                                                  (stop())

`degraded` means serving, but not as intended: a fallback plan was taken, or the CPU engine serves
although a GPU is expected (one is visible, or EXPECT_GPU=true). With GPU_FALLBACK=not_ready the latter
also makes `held_from_traffic` give the reason for `/ready` to answer 503 (the engine still serves).
`failed` is final (permanent until the server is restarted): the checkpoint cannot be had, every plan
failed, or the engine kept dying.

While loading, `/status` shows the current step (`engine.step`): resolving the model and downloading it
(here, before any engine starts: `model_source.py`), then the engine's own steps (`engines/progress.py`).

Listeners added with `add_serving_listener` hear of each engine that starts serving (the first load, a
restart, a fallback to another plan) with its description, e.g. to size admission from its capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeVar

import structlog

from qwenasr_appliance.config import Settings, replace
from qwenasr_appliance.engines.base import Engine, EngineDescription, EngineLoadError, LoadFailureKind
from qwenasr_appliance.engines.progress import LoadProgress, StepReading
from qwenasr_appliance.metrics import METRICS, Metrics
from qwenasr_appliance.supervisor.aligner_supervisor import AlignerSupervisor
from qwenasr_appliance.supervisor.factory import (
    AlignerFactory,
    EngineFactory,
    default_aligner_factory,
    default_engine_factory,
    import_engine_class,
)
from qwenasr_appliance.supervisor.guard import error_text, guarded
from qwenasr_appliance.supervisor.model_source import ModelResolver, ModelSourceError, resolve_model
from qwenasr_appliance.supervisor.plans import NoPlanError, Plan, plan_chain
from qwenasr_appliance.supervisor.probe import VramProbe, VramProbeFn, probe_vram
from qwenasr_appliance.supervisor.status import (
    Attempt,
    SupervisorStatus,
    attempt_status,
    engine_status,
    iso,
    plan_status,
    step_status,
    vram_status,
)

SupervisorState = Literal["starting", "probing", "loading", "ready", "degraded", "failed", "restarting", "stopped"]

SERVING_STATES: Final = frozenset({"ready", "degraded"})
# `failed` has none: it does not recover by itself, and a Retry-After would promise that it does.
RETRY_AFTER_SECONDS: Final[dict[str, int]] = {
    "starting": 10,
    "probing": 10,
    "loading": 10,
    "restarting": 5,
    "stopped": 5,
}
MAX_BACKOFF_SECONDS: Final = 60.0
CLOSE_TIMEOUT_SECONDS: Final = 60.0
KEPT_ATTEMPTS: Final = 64
# A death after the engine served this long starts a new count of restarts in a row.
STABLE_AFTER_SECONDS: Final = 300.0

logger = structlog.get_logger()
T = TypeVar("T")

ServingListener = Callable[[EngineDescription | None], None]


class EngineUnavailable(Exception):
    """No engine is serving; the API answers 503 with `Retry-After: retry_after_seconds`, or without one
    when the failure is permanent (`retry_after_seconds` None: state `failed`)."""

    def __init__(self, reason: str, retry_after_seconds: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds

    @property
    def permanent(self) -> bool:
        return self.retry_after_seconds is None


class EngineSupervisor:
    """Owns the engine: loads it in the background, falls back through the plans, restarts it."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: EngineFactory = default_engine_factory,
        aligner_factory: AlignerFactory = default_aligner_factory,
        probe: VramProbeFn = probe_vram,
        metrics: Metrics = METRICS,
        vllm_available: bool | None = None,
        cpu_available: bool | None = None,
        stable_after_seconds: float = STABLE_AFTER_SECONDS,
        model_resolver: ModelResolver | None = None,
    ) -> None:
        self._settings = settings
        # What the engines load: `settings` with MODEL_ID replaced by the local directory resolved from it.
        self._load_settings = settings
        # Test doubles load nothing: only the real engines need the checkpoint found first.
        self._resolver = model_resolver or (resolve_model if engine_factory is default_engine_factory else None)
        self._progress = LoadProgress()
        self._loading_engine: Engine | None = None
        self._resolved = False
        self._factory = engine_factory
        self._probe_fn = probe
        self._metrics = metrics
        self._vllm_available = vllm_available
        self._cpu_available = cpu_available
        self._stable_after = stable_after_seconds

        self._state: SupervisorState = "starting"
        self._reason: str | None = None
        self._engine: Engine | None = None
        self._description: EngineDescription | None = None
        self._plan: Plan | None = None
        self._plan_index = 0
        self._loading: tuple[Plan, int] | None = None
        self._chain: list[Plan] = []
        self._gpu_expected = False
        self._probe: VramProbe | None = None
        self._attempts: deque[Attempt] = deque(maxlen=KEPT_ATTEMPTS)
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._restarts = 0
        self._restarts_in_row = 0
        self._load_seconds: float | None = None
        self._started_at: datetime | None = None
        self._ready_at: datetime | None = None
        self._serving_since = 0.0
        self._plan_labels: dict[str, str] | None = None
        self._serving_listeners: list[ServingListener] = []
        self._cpu_unexpected: str | None = None  # why the CPU engine serving is not what was intended
        # The optional forced aligner: loaded after the model serves, never part of readiness.
        self._aligner = AlignerSupervisor(
            settings, factory=aligner_factory, probe=probe, default=aligner_factory is default_aligner_factory
        )
        metrics.set_engine_state("starting")

    # -- public view ------------------------------------------------------------------------------

    @property
    def state(self) -> SupervisorState:
        return self._state

    @property
    def ready(self) -> bool:
        """True while an engine serves (`ready` or `degraded`)."""
        return self._state in SERVING_STATES

    @property
    def engine(self) -> Engine | None:
        """The live engine while serving, else None."""
        return self._engine if self.ready else None

    @property
    def plan(self) -> Plan | None:
        return self._plan if self.ready else None

    @property
    def aligner(self) -> AlignerSupervisor:
        """The forced aligner's supervisor (state `disabled` without ALIGNER_MODEL_ID)."""
        return self._aligner

    @property
    def chain(self) -> tuple[Plan, ...]:
        return tuple(self._chain)

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        return tuple(self._attempts)

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def not_ready_reason(self) -> str | None:
        """Why no engine serves now, for 503 bodies and `/health/ready`; None while serving."""
        state = self._state
        if state in SERVING_STATES:
            return None
        if state == "loading" and self._loading is not None:
            plan, index = self._loading
            reason = f"the model is loading (plan {plan.name}, {index + 1} of {len(self._chain)})"
            step = self.current_step()
            if step is None:
                return reason
            done = (
                f", {(step.bytes_done or 0) / 1e9:.2f} of {step.bytes_total / 1e9:.2f} GB" if step.bytes_total else ""
            )
            return f"{reason}: {step.step.replace('_', ' ')}{done}, {step.seconds:.0f} s so far"
        messages = {
            "starting": "the engine has not started loading yet",
            "probing": "probing the GPUs before loading the model",
            "loading": "the model is loading",
            "restarting": f"the engine is restarting: {self._reason}",
            "failed": f"the engine failed and will not recover without a restart: {self._reason}",
            "stopped": "the server is shutting down",
        }
        return messages[state]

    @property
    def held_from_traffic(self) -> str | None:
        """Why `/ready` answers 503 although an engine serves (the CPU engine where a GPU is expected,
        with GPU_FALLBACK=not_ready); None otherwise. Requests that still arrive are served."""
        if self.ready and self._cpu_unexpected and self._settings.gpu_fallback == "not_ready":
            return f"{self._cpu_unexpected} (GPU_FALLBACK=not_ready)"
        return None

    def add_serving_listener(self, listener: ServingListener) -> None:
        """Call `listener(description)` each time an engine starts serving (now too, if one serves).
        The description is None when the engine could not describe itself. A listener that raises is
        logged and does not stop the others."""
        self._serving_listeners.append(listener)
        if self.ready:
            self._notify(listener)

    def require_engine(self) -> Engine:
        """The live engine; raises `EngineUnavailable` when none serves."""
        engine = self.engine
        if engine is None:
            raise EngineUnavailable(self.not_ready_reason or "no engine", RETRY_AFTER_SECONDS.get(self._state))
        return engine

    def snapshot(self) -> SupervisorStatus:
        description = self._description if self.ready else None
        return SupervisorStatus(
            state=self._state,
            ready=self.ready,
            reason=self._reason,
            plan=self._plan.name if self.ready and self._plan else None,
            engine=engine_status(description) if description else None,
            chain=[plan_status(plan) for plan in self._chain],
            attempts=[attempt_status(attempt) for attempt in self._attempts],
            vram=vram_status(self._probe) if self._probe else None,
            load_seconds=self._load_seconds,
            restarts=self._restarts,
            started_at=iso(self._started_at),
            ready_at=iso(self._ready_at),
            step=step_status(reading) if (reading := self.current_step()) else None,
        )

    def current_step(self) -> StepReading | None:
        """The load step now under way (the loading engine's, else resolving/downloading); None when idle."""
        if self._state not in ("loading", "restarting"):
            return None
        progress = getattr(self._loading_engine, "load_progress", None)
        reading = progress.reading() if isinstance(progress, LoadProgress) else None
        return reading or self._progress.reading()

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - the API tests and CLI use
        """Wait until an engine serves (True), or loading failed, stop() ran or `timeout` passed (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self.ready:
                return True
            if self._state in ("failed", "stopped"):
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Begin loading in the background and return at once."""
        if self._task is not None or self._stopping:
            return
        self._started_at = _now()
        self._task = asyncio.create_task(self._guarded(self._initial_load()), name="engine-supervisor-load")

    async def stop(self) -> None:
        """Cancel loading or restarting, close the engine; safe to call twice and before start()."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        await self._aligner.stop()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        engine, self._engine = self._engine, None
        if engine is not None:
            await self._close_quietly(engine)
        self._clear_plan_metric()
        self._set_state("stopped", None)
        self._stopped.set()

    async def report_dead(self, engine: Engine, error: BaseException | str) -> None:
        """The request path saw `engine` die. Restarts it once however many requests report it."""
        if self._stopping or engine is not self._engine or not self.ready:
            return
        message = error if isinstance(error, str) else error_text(error)
        self._engine = None
        if time.monotonic() - self._serving_since >= self._stable_after:
            self._restarts_in_row = 0
        logger.error("engine.dead", plan=self._plan.name if self._plan else None, error=message)
        self._clear_plan_metric()
        self._set_state("restarting", f"the engine died: {message}")
        self._task = asyncio.create_task(self._guarded(self._restart(engine, message)), name="engine-restart")

    # -- loading ----------------------------------------------------------------------------------

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        await guarded(work, "engine.supervisor.error", self._on_supervisor_error)

    async def _on_supervisor_error(self, error: str) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await self._close_quietly(engine)
        self._fail(f"supervisor error: {error}")

    async def _initial_load(self) -> None:
        self._set_state("probing", None)
        probe = await self._run_probe()
        vllm = self._vllm_available if self._vllm_available is not None else _installed("vllm")
        cpu = self._cpu_available if self._cpu_available is not None else _installed("qwen_asr")
        try:
            self._chain = plan_chain(self._settings, probe, vllm_available=vllm, cpu_available=cpu)
        except NoPlanError as exc:
            self._fail(f"no plan can load the model: {exc}")
            return
        self._gpu_expected = self._settings.expect_gpu or (self._settings.engine == "auto" and bool(probe.gpus))
        logger.info(
            "engine.plans",
            plans=[plan.name for plan in self._chain],
            reasons={plan.name: plan.reason for plan in self._chain},
            vllm_installed=vllm,
            cpu_engine_installed=cpu,
        )
        self._set_state("loading", None)
        try:
            failures = await self._load_chain(0)
        except ModelSourceError as exc:
            self._progress.clear()
            self._fail(f"the model cannot be loaded: {exc}")
            return
        if failures is not None:
            self._fail("every plan failed: " + failures)

    async def _resolve_model(self) -> None:
        """Find the checkpoint (local directory, cache or download) once, before the first engine that can
        be imported loads. Raises `ModelSourceError` when it cannot be had: no plan could load it then."""
        model_id = self._settings.model_id
        if self._resolved or self._resolver is None or self._settings.load_format == "dummy":
            return
        try:
            path = await run_in_daemon_thread(self._resolver, model_id, self._progress)
        finally:
            self._progress.clear()
        self._resolved = True
        logger.info("engine.model.resolved", model=model_id, path=path)
        if path != model_id:
            self._load_settings = replace(
                self._settings, model_id=path, served_model_name=self._settings.served_model_names
            )

    async def _restart(self, dead: Engine, message: str) -> None:
        await self._close_quietly(dead)
        limit = self._settings.engine_restart_max
        while True:
            if self._restarts_in_row >= limit:
                self._fail(f"the engine died and {limit} restart(s) in a row did not bring it back: {message}")
                return
            delay = min(
                self._settings.engine_restart_backoff_seconds * 2**self._restarts_in_row,
                max(MAX_BACKOFF_SECONDS, self._settings.engine_restart_backoff_seconds),
            )
            self._restarts_in_row += 1
            self._restarts += 1
            self._metrics.engine_restarts.inc()
            logger.warning("engine.restart", restart=self._restarts_in_row, limit=limit, delay_seconds=delay)
            await asyncio.sleep(delay)
            await self._run_probe()
            failures = await self._load_chain(self._plan_index)
            if failures is None:
                return
            message = f"reloading failed: {failures}"

    async def _load_chain(self, start: int) -> str | None:
        """Try the plans from `start` on until one serves; None on success, else the failures."""
        cycle: list[Attempt] = []
        broken: set[tuple[str, str, str | None]] = set()
        for index in range(start, len(self._chain)):
            plan = self._chain[index]
            if plan.variant in broken:
                skipped = Attempt(plan, _now(), 0.0, "skipped", "the same engine/dtype/quantization failed above")
                cycle.append(skipped)
                self._attempts.append(skipped)
                logger.info("engine.plan.skipped", plan=plan.name)
                continue
            if any(attempt.outcome != "skipped" for attempt in cycle):
                self._metrics.engine_fallbacks.labels(to_plan=plan.name).inc()
                logger.warning("engine.fallback", to_plan=plan.name, reason=plan.reason)
            self._loading = (plan, index)
            engine, attempt = await self._attempt(plan)
            self._loading = None
            cycle.append(attempt)
            self._attempts.append(attempt)
            if engine is not None:
                self._serve(engine, plan, index, attempt)
                return None
            if attempt.outcome in ("import", "unsupported"):
                broken.add(plan.variant)
            if attempt.outcome == "out_of_memory":
                _free_memory()
        return "; ".join(f"{a.plan.name}: {a.outcome} ({a.error})" for a in cycle) or "no plan to try"

    async def _attempt(self, plan: Plan) -> tuple[Engine | None, Attempt]:
        started_at, began = _now(), time.monotonic()
        logger.info("engine.plan.start", plan=plan.name, reason=plan.reason)
        if plan.engine == "vllm" and plan.dtype == "float16":
            logger.warning("engine.plan.float16", plan=plan.name, reason=plan.reason)
        engine: Engine | None = None
        try:
            if self._factory is default_engine_factory:
                # Import the engine module (vLLM takes seconds) off the event loop.
                await asyncio.to_thread(import_engine_class, plan)
            await self._resolve_model()
            engine = self._factory(plan, self._load_settings)
            self._loading_engine = engine
            await engine.load()
        except asyncio.CancelledError:
            self._loading_engine = None
            if engine is not None:
                await self._close_quietly(engine)
            raise
        except ModelSourceError as exc:
            # No plan can load what cannot be had: recorded for this plan, then the chain stops.
            self._attempts.append(Attempt(plan, started_at, time.monotonic() - began, "model_not_found", str(exc)))
            self._metrics.engine_load_attempts.labels(plan=plan.name, outcome="model_not_found").inc()
            raise
        except Exception as exc:
            self._loading_engine = None
            duration = time.monotonic() - began
            kind = classify_failure(exc)
            # An EngineLoadError's message is written for operators; others need their type.
            error = str(exc) if isinstance(exc, EngineLoadError) and str(exc) else error_text(exc)
            if engine is not None:
                await self._close_quietly(engine)
            self._metrics.engine_load_attempts.labels(plan=plan.name, outcome=kind).inc()
            logger.warning(
                "engine.plan.failed",
                plan=plan.name,
                kind=kind,
                error=error,
                duration_seconds=round(duration, 3),
            )
            return None, Attempt(plan, started_at, duration, kind, error)
        self._loading_engine = None
        duration = time.monotonic() - began
        self._metrics.engine_load_attempts.labels(plan=plan.name, outcome="ok").inc()
        self._metrics.model_load_duration.set(duration)
        return engine, Attempt(plan, started_at, duration, "ok", None)

    def _serve(self, engine: Engine, plan: Plan, index: int, attempt: Attempt) -> None:
        self._engine, self._plan, self._plan_index = engine, plan, index
        try:
            self._description = engine.describe()
        except Exception as exc:
            logger.warning("engine.describe.failed", plan=plan.name, error=error_text(exc))
            self._description = None
        self._load_seconds = attempt.duration_seconds
        self._ready_at = _now()
        self._serving_since = time.monotonic()
        self._cpu_unexpected = self._cpu_unexpected_reason(plan)
        degraded = self._degraded_reason(plan, index)
        self._set_plan_metric(plan)
        self._set_state("degraded" if degraded else "ready", degraded)
        for listener in list(self._serving_listeners):
            self._notify(listener)
        self._aligner.start(plan)  # the first time the model serves; a no-op afterwards
        description = self._description
        logger.info(
            "engine.ready",
            plan=plan.name,
            state=self._state,
            reason=degraded,
            load_seconds=round(attempt.duration_seconds, 3),
            engine=description.name if description else None,
            device=description.device if description else None,
            dtype=description.dtype if description else plan.dtype,
            quantization=description.quantization if description else plan.quantization,
            max_concurrency=description.max_concurrency if description else None,
            held_from_traffic=self.held_from_traffic,
        )

    def _notify(self, listener: ServingListener) -> None:
        try:
            listener(self._description)
        except Exception as exc:
            logger.error(
                "engine.listener.failed",
                listener=getattr(listener, "__qualname__", repr(listener)),
                error=error_text(exc),
            )

    def _degraded_reason(self, plan: Plan, index: int) -> str | None:
        if index > 0:
            last_failures: dict[str, Attempt] = {}
            for attempt in self._attempts:
                if attempt.outcome not in ("ok", "skipped"):
                    last_failures[attempt.plan.name] = attempt
            earlier = [
                f"{p.name}: {last_failures[p.name].outcome} ({last_failures[p.name].error})"
                for p in self._chain[:index]
                if p.name in last_failures
            ]
            return f"serving with fallback plan {plan.name} after " + ("; ".join(earlier) or "earlier plans")
        if self._cpu_unexpected:
            return f"{self._cpu_unexpected}: {plan.reason}"
        return None

    def _cpu_unexpected_reason(self, plan: Plan) -> str | None:
        """Why the CPU engine serving `plan` is not what was intended; None when it is (or it is a GPU plan)."""
        if plan.engine != "cpu" or not self._gpu_expected:
            return None
        probe = self._probe
        if probe is not None and probe.gpus:
            return "serving on CPU although a GPU is visible"
        why = probe.why_none if probe is not None else None
        seen = f"no GPU is visible ({why})" if why else "no GPU is visible"
        return f"serving on CPU although a GPU is expected (EXPECT_GPU=true) and {seen}"

    def _fail(self, reason: str) -> None:
        self._engine = None
        self._clear_plan_metric()
        self._set_state("failed", reason)
        logger.error("engine.failed", reason=reason)

    async def _run_probe(self) -> VramProbe:
        try:
            probe = await asyncio.to_thread(self._probe_fn)
        except Exception as exc:
            probe = VramProbe(error=f"the VRAM probe failed: {error_text(exc)}")
        self._probe = probe
        for gpu in probe.gpus:
            self._metrics.gpu_memory_total.labels(gpu=str(gpu.index)).set(gpu.total_bytes)
            self._metrics.gpu_memory_free.labels(gpu=str(gpu.index)).set(gpu.free_bytes)
        # A host without a GPU is no fault (`no_gpu`); NVML failing where there is one is (`error`).
        log = logger.warning if probe.error else logger.info
        log(
            "engine.probe",
            gpus=[
                {"index": g.index, "name": g.name, "total_bytes": g.total_bytes, "free_bytes": g.free_bytes}
                for g in probe.gpus
            ],
            no_gpu=probe.no_gpu,
            error=probe.error,
        )
        return probe

    async def _close_quietly(self, engine: Engine) -> None:
        try:
            await asyncio.wait_for(engine.close(), CLOSE_TIMEOUT_SECONDS)
        except Exception as exc:
            logger.warning("engine.close.failed", error=error_text(exc))

    # -- state and metrics ------------------------------------------------------------------------

    def _set_state(self, state: SupervisorState, reason: str | None) -> None:
        previous, self._state, self._reason = self._state, state, reason
        self._metrics.set_engine_state(state)
        if previous != state:
            logger.info("engine.state", previous=previous, state=state, reason=reason)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _set_plan_metric(self, plan: Plan) -> None:
        self._clear_plan_metric()
        labels = {
            "engine": plan.engine,
            "plan": plan.name,
            "dtype": plan.dtype,
            "quantization": plan.quantization or "none",
        }
        self._metrics.engine_plan.labels(**labels).set(1)
        self._plan_labels = labels

    def _clear_plan_metric(self) -> None:
        if self._plan_labels is not None:
            self._metrics.engine_plan.labels(**self._plan_labels).set(0)
            self._plan_labels = None


def classify_failure(exc: BaseException) -> LoadFailureKind:
    """The load failure kind of an exception an engine raised."""
    if isinstance(exc, EngineLoadError):
        return exc.kind
    if isinstance(exc, ImportError):
        return "import"
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower():
        return "out_of_memory"
    return "other"


def _free_memory() -> None:
    """After an out-of-memory failure: drop garbage and cached CUDA blocks before the next plan."""
    gc.collect()
    torch = sys.modules.get("torch")  # not imported means CUDA was never initialised through it
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception as exc:
        logger.debug("engine.free_memory.failed", error=error_text(exc))


async def run_in_daemon_thread(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` on a daemon thread: a blocking step that cannot be interrupted (a hub request, a
    download) never holds the process up at exit when the server is stopped (SIGTERM) during it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled: the server stopped meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work(*args)
        except BaseException as exc:
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=getattr(work, "__name__", "blocking-step"), daemon=True).start()
    return await future


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _now() -> datetime:
    return datetime.now(UTC)


__all__ = ["EngineSupervisor", "EngineUnavailable", "classify_failure"]
