"""Engine calls of live sessions: best-effort partial re-decodes, and final decodes of committed turns.

Both share the engine (and so vLLM's continuous batching) and the admission controller with file
requests:

- a final decode goes through `TranscriptionService.transcribe_samples`, the file path after decoding
  (same chunking, same options, same parsing), so a turn's transcript is what a file of the same audio
  gets; it waits in the admission queue like a file request and fails the same way (Overloaded);
- a partial re-decode runs only when a slot is free at once and nothing queues: partials never delay
  file requests or finals, and under load they are skipped (the turn's final is still exact).
"""

from __future__ import annotations

import structlog

from qwenasr_appliance.audio.samples import AudioArray
from qwenasr_appliance.audio.split import pad_to_min
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import EngineDeadError, EngineError, TranscribeOptions, run_to_completion
from qwenasr_appliance.metrics import METRICS, Metrics
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.live.session_config import LiveSessionConfig
from qwenasr_appliance.transcription.pipeline import TranscriptionService
from qwenasr_appliance.transcription.types import Transcript

log = structlog.get_logger(__name__)


class LiveDecoder:
    def __init__(
        self,
        settings: Settings,
        service: TranscriptionService,
        supervisor: EngineSupervisor,
        admission: AdmissionController,
        *,
        metrics: Metrics = METRICS,
    ) -> None:
        self._settings = settings
        self._service = service
        self._supervisor = supervisor
        self._admission = admission
        self._metrics = metrics

    @property
    def engine_ready(self) -> bool:
        return self._supervisor.ready

    def options(self, config: LiveSessionConfig, assistant_prefix: str = "") -> TranscribeOptions:
        """What a file request with the session's language and prompt would send (temperature 0)."""
        return TranscribeOptions(
            language=config.language_name,
            context=config.prompt,
            temperature=0.0,
            max_new_tokens=self._settings.max_new_tokens,
            assistant_prefix=assistant_prefix,
        )

    def _has_spare_capacity(self) -> bool:
        return self._admission.active < self._admission.limit and self._admission.queued == 0

    async def partial(self, samples: AudioArray, config: LiveSessionConfig, prefix: str, request_id: str) -> str | None:
        """The engine's continuation of `prefix` for the utterance so far (16 kHz samples), or None when
        skipped (no spare capacity, no engine) or failed. Cancelling it aborts the engine request."""
        engine = self._supervisor.engine
        if engine is None or not self._has_spare_capacity():
            return None
        options = self.options(config, prefix)
        try:
            async with self._admission.slot():
                output = await run_to_completion(engine, pad_to_min(samples), options, request_id)
        except EngineDeadError as exc:
            self._metrics.engine_errors.labels(kind="dead").inc()
            await self._supervisor.report_dead(engine, exc)
            return None
        except EngineError as exc:
            log.warning("live.partial_failed", request_id=request_id, error=type(exc).__name__)
            return None
        return output.raw_text

    async def final(self, samples: AudioArray, config: LiveSessionConfig, request_id: str) -> tuple[Transcript, int]:
        """The committed turn's transcript and output tokens. Raises what `transcribe_samples` raises."""
        return await self._service.transcribe_samples(samples, self.options(config), request_id)
