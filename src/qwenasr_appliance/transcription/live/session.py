"""One live transcription session: client events in, server events out, turns transcribed on the engine.

Transport-free: the WebSocket route (`api/realtime.py`) hands every text message to `receive` and sends
what the session passes to its `emit` callback, in order. `emit` must not block or raise; the transport
bounds its own queue (a client that reads too slowly is disconnected there).

Audio time line: every appended byte is decoded to 16 kHz (`audio.live_formats`) and numbered from 0, the
first sample of the session; `audio_start_ms` / `audio_end_ms` count on it. What is kept: in server VAD
mode, while nobody speaks, only the last `prefix_padding_ms` (plus the detector's look-back); while a
turn is open, its audio, at most `LIVE_MAX_TURN_SECONDS` (then the turn is committed where it stands);
in manual mode, the audio since the last commit or clear, with the same bound. Committed turns wait
for their final decode in a queue of at most `MAX_PENDING_TURNS`.

Events and order for one turn: `input_audio_buffer.speech_started` (server VAD) → any number of
`conversation.item.input_audio_transcription.delta` (partials while the person speaks, see
`stabilizer.py`) → `input_audio_buffer.speech_stopped` (server VAD) → `input_audio_buffer.committed` →
at most one more delta → `...completed` (or `...failed`). Deltas only append; `completed.transcript` is
the final decode of the whole turn, which is what the file path gives for the same audio.

Ending (`stop_accepting`: session length reached, server shutting down): no more client events; the
audio held (an open turn, in manual mode everything since the last commit) is committed as a last
turn, and every committed turn gets its `completed`, or `failed` when the transport stops waiting
(`fail_outstanding`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import structlog

from qwenasr_appliance.audio.live_formats import BYTES_PER_SAMPLE, LiveAudioDecoder
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import EngineError
from qwenasr_appliance.metrics import METRICS, Metrics
from qwenasr_appliance.supervisor.supervisor import EngineUnavailable
from qwenasr_appliance.transcription.admission import Overloaded
from qwenasr_appliance.transcription.live.decoder import LiveDecoder
from qwenasr_appliance.transcription.live.events import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    Cleared,
    ClientEventError,
    Committed,
    DurationUsage,
    ErrorDetail,
    ServerEvent,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    TranscriptionSessionUpdated,
    error_event,
    new_id,
    parse_client_event,
)
from qwenasr_appliance.transcription.live.session_config import (
    LiveSessionConfig,
    apply_update,
    legacy_session_view,
    session_view,
)
from qwenasr_appliance.transcription.live.stabilizer import PartialStabilizer
from qwenasr_appliance.transcription.live.turns import SpeechEnd, SpeechStart, TurnDetector

log = structlog.get_logger(__name__)

MAX_PENDING_TURNS: Final = 4  # committed turns waiting for their final decode, per session
MIN_COMMIT_SAMPLES: Final = SAMPLE_RATE // 10  # OpenAI refuses to commit less than 100 ms of audio
INGEST_PIECE_SAMPLES: Final = SAMPLE_RATE // 10  # audio is taken in 100 ms at a time (turn bounds, VAD)

Emit = Callable[[ServerEvent], None]


@dataclass
class _OpenTurn:
    item_id: str
    start: int  # session sample index of the turn's first sample
    started_at: float  # perf_counter() when the turn was detected (for the first-delta metric)
    stabilizer: PartialStabilizer
    decoded_until: int  # position when the last partial decode began
    partials: int = 0
    first_delta_at: float | None = None


@dataclass
class _CommittedTurn:
    item_id: str
    audio: AudioArray
    config: LiveSessionConfig
    stabilizer: PartialStabilizer
    ended_at: float  # perf_counter() at the end of speech or the commit
    first_delta_at: float | None
    started_at: float


@dataclass
class _Buffer:
    """Samples [start, start + length) of the session time line, as appended pieces."""

    start: int = 0
    pieces: list[AudioArray] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + sum(len(p) for p in self.pieces)

    def append(self, samples: AudioArray) -> None:
        if len(samples):
            self.pieces.append(samples)

    def _joined(self) -> AudioArray:
        if len(self.pieces) != 1:
            joined = np.concatenate(self.pieces) if self.pieces else np.zeros(0, dtype=np.float32)
            self.pieces = [joined] if len(joined) else []
            return joined
        return self.pieces[0]

    def slice(self, start: int, end: int) -> AudioArray:
        joined = self._joined()
        return joined[max(0, start - self.start) : max(0, end - self.start)].copy()

    def drop_before(self, position: int) -> None:
        """Forget samples before `position` (kept: [position, end))."""
        if position <= self.start:
            return
        joined = self._joined()
        cut = min(len(joined), position - self.start)
        rest = joined[cut:]
        self.pieces = [rest.copy()] if len(rest) else []
        self.start += cut
        if self.start < position:  # nothing was buffered up to `position`
            self.start = position


class LiveSession:
    def __init__(self, *, decoder: LiveDecoder, settings: Settings, emit: Emit, metrics: Metrics = METRICS) -> None:
        self.id = new_id("sess")
        self._decoder = decoder
        self._settings = settings
        self._emit = emit
        self._metrics = metrics
        self._accepted_models = frozenset({settings.model_name, settings.model_id})
        self._config = LiveSessionConfig(model=settings.model_name)
        self._audio = LiveAudioDecoder(self._config.audio_format)
        self._position = 0  # samples appended so far (16 kHz)
        self._buffer = _Buffer()
        self._detector: TurnDetector | None = self._new_detector(self._config, speaking=False)
        self._turn: _OpenTurn | None = None
        self._last_item_id: str | None = None
        self._max_turn_samples = round(settings.live_max_turn_seconds * SAMPLE_RATE)
        self._partial_every = round(settings.live_partial_interval_seconds * SAMPLE_RATE)
        self._partial_task: asyncio.Task[None] | None = None
        self._pending: asyncio.Queue[_CommittedTurn] = asyncio.Queue(MAX_PENDING_TURNS)
        self._final_worker: asyncio.Task[None] | None = None
        self._current: _CommittedTurn | None = None  # the turn being decoded by the final worker
        self._outstanding = 0  # committed turns whose final event has not been sent
        self.closing_reason: str | None = None

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Send `session.created` and start the final-decode worker. Call on the event loop."""
        self._final_worker = asyncio.create_task(self._finals(), name=f"live-finals-{self.id}")
        self._emit(SessionCreated(session=session_view(self._config, self.id)))

    def stop_accepting(self, reason: str) -> None:
        """Refuse further client events (`session_closed` errors) and commit the audio the session holds
        as a last turn, whatever its length (in server VAD mode `speech_stopped` first), so that every
        byte the session took gets a final event; committed turns still complete. Once; later calls
        change nothing."""
        if self.closing_reason is not None:
            return
        self.closing_reason = reason
        self._ingest(self._audio.flush())
        turn = self._turn
        if turn is None or self._position <= turn.start:
            return
        if self._detector is not None:
            self._emit(SpeechStopped(audio_end_ms=self._position * 1000 // SAMPLE_RATE, item_id=turn.item_id))
            self._detector.reset(self._position)
        self._commit(self._position)

    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109 - the caller bounds the wait
        """Wait until every committed turn has its final event; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._pending.join()
        except TimeoutError:
            return False
        return True

    async def fail_outstanding(self, message: str, *, code: str) -> None:
        """Stop the final decodes and send `...failed` (`code`, a server error) for every committed turn
        without its final event yet, the one being decoded and those queued: no turn the client was told
        of (`committed`) goes without a final event."""
        current = self._current
        worker = self._final_worker
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            self._final_worker = None
        turns = [current] if current is not None else []
        while not self._pending.empty():
            turns.append(self._pending.get_nowait())
            self._pending.task_done()
        self._outstanding = 0
        for turn in turns:
            self._fail(turn, message, code=code, error_type="server_error")

    @property
    def awaiting_finals(self) -> bool:
        """Committed turns are still waiting for their final transcripts (the client is not idle then)."""
        return self._outstanding > 0

    async def close(self) -> None:
        """Stop all work of the session: partial and final decodes are cancelled (their engine requests
        aborted). Safe to call twice."""
        self.closing_reason = self.closing_reason or "closed"
        tasks = [t for t in (self._partial_task, self._final_worker) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._partial_task = self._final_worker = None
        self._turn = None
        self._buffer = _Buffer(start=self._position)

    # -- client events ---------------------------------------------------------------------------------

    async def receive(self, message: str | bytes) -> None:
        """Apply one client event; a bad one is answered with an `error` event and changes nothing."""
        try:
            event = parse_client_event(message, max_audio_bytes=self._settings.live_max_append_bytes)
            if self.closing_reason is not None:
                raise ClientEventError(
                    f"The session is closing ({self.closing_reason}): no more events are accepted.",
                    code="session_closed",
                    event_id=event.event_id,
                )
            if isinstance(event, AudioAppend):
                self._append(event)
            elif isinstance(event, AudioCommit):
                self._manual_commit(event)
            elif isinstance(event, AudioClear):
                self._clear()
            else:
                self._update(event)
        except ClientEventError as error:
            self.reject(error)

    def reject(self, error: ClientEventError) -> None:
        self._metrics.live_client_errors.labels(code=error.code).inc()
        self._emit(error_event(error))

    def _update(self, event: SessionUpdate) -> None:
        config = apply_update(
            self._config, event, accepted_models=self._accepted_models, max_prompt_chars=self._settings.max_prompt_chars
        )
        if config.audio_format != self._config.audio_format:
            self._ingest(self._audio.flush())
            self._audio = LiveAudioDecoder(config.audio_format)
        if config.turn_detection != self._config.turn_detection:
            self._detector = self._new_detector(config, speaking=self._turn is not None)
        self._config = config
        if event.legacy:
            self._emit(TranscriptionSessionUpdated(session=legacy_session_view(config, self.id)))
        else:
            self._emit(SessionUpdated(session=session_view(config, self.id)))

    def _new_detector(self, config: LiveSessionConfig, *, speaking: bool) -> TurnDetector | None:
        vad = config.turn_detection
        if vad is None:
            return None
        return TurnDetector(
            vad.threshold, vad.prefix_padding_ms, vad.silence_duration_ms, position=self._position, speaking=speaking
        )

    def _append(self, event: AudioAppend) -> None:
        width = BYTES_PER_SAMPLE[self._config.audio_format]
        self._metrics.live_audio.inc(len(event.audio) / width / self._audio.input_rate)
        self._ingest(self._audio.decode(event.audio))

    def _manual_commit(self, event: AudioCommit) -> None:
        # Everything the client sent belongs to this turn: release what the resampler still holds.
        self._ingest(self._audio.flush())
        turn = self._turn
        held = 0 if turn is None else self._position - turn.start
        if turn is None or held < MIN_COMMIT_SAMPLES:
            raise ClientEventError(
                "Error committing input audio buffer: buffer too small. Expected at least 100ms of audio, but "
                f"buffer only has {held * 1000 / SAMPLE_RATE:.2f}ms of audio.",
                code="input_audio_buffer_commit_empty",
                event_id=event.event_id,
            )
        if self._detector is not None:
            self._detector.reset(self._position)
        self._commit(self._position)

    def _clear(self) -> None:
        self._cancel_partial()
        self._audio.flush()  # what the resampler holds was appended before the clear: dropped too
        self._turn = None
        self._buffer.drop_before(self._position)
        if self._detector is not None:
            self._detector.reset(self._position)
        self._emit(Cleared())

    # -- audio and turns -------------------------------------------------------------------------------

    def _ingest(self, samples: AudioArray) -> None:
        # In pieces, so a large append still ends turns at the right places and within the length bound.
        for start in range(0, len(samples), INGEST_PIECE_SAMPLES):
            self._ingest_piece(samples[start : start + INGEST_PIECE_SAMPLES])

    def _ingest_piece(self, samples: AudioArray) -> None:
        self._buffer.append(samples)
        self._position += len(samples)
        if self._detector is not None:
            for event in self._detector.push(samples):
                if isinstance(event, SpeechStart):
                    self._open_turn(event.turn_start)
                    assert self._turn is not None
                    self._emit(
                        SpeechStarted(audio_start_ms=event.turn_start * 1000 // SAMPLE_RATE, item_id=self._turn.item_id)
                    )
                elif isinstance(event, SpeechEnd) and self._turn is not None:
                    self._emit(
                        SpeechStopped(audio_end_ms=event.turn_end * 1000 // SAMPLE_RATE, item_id=self._turn.item_id)
                    )
                    self._commit(event.turn_end)
            if self._turn is None:
                self._buffer.drop_before(self._position - self._detector.lookback_samples)
        elif self._turn is None and len(samples):
            self._open_turn(self._position - len(samples))
        turn = self._turn
        if turn is not None and self._position - turn.start >= self._max_turn_samples:
            # Too long: commit what there is; with server VAD, speech that goes on opens a new turn.
            if self._detector is not None:
                self._emit(SpeechStopped(audio_end_ms=self._position * 1000 // SAMPLE_RATE, item_id=turn.item_id))
                self._detector.reset(self._position)
            self._commit(self._position)
        self._maybe_partial()

    def _open_turn(self, start: int) -> None:
        start = max(start, self._buffer.start)
        self._buffer.drop_before(start)
        self._turn = _OpenTurn(
            item_id=new_id("item"),
            start=start,
            started_at=time.perf_counter(),
            stabilizer=PartialStabilizer(self._config.language_name),
            decoded_until=start,
        )

    def _commit(self, end: int) -> None:
        turn = self._turn
        assert turn is not None
        self._cancel_partial()
        audio = self._buffer.slice(turn.start, end)
        self._buffer.drop_before(end)
        self._turn = None
        self._emit(Committed(item_id=turn.item_id, previous_item_id=self._last_item_id))
        self._last_item_id = turn.item_id
        committed = _CommittedTurn(
            item_id=turn.item_id,
            audio=audio,
            config=self._config,
            stabilizer=turn.stabilizer,
            ended_at=time.perf_counter(),
            first_delta_at=turn.first_delta_at,
            started_at=turn.started_at,
        )
        try:
            self._pending.put_nowait(committed)
            self._outstanding += 1
        except asyncio.QueueFull:
            self._fail(
                committed,
                f"More than {MAX_PENDING_TURNS} turns of this session are waiting to be transcribed.",
                code="too_many_pending_turns",
                error_type="server_error",
            )

    # -- partial transcripts ---------------------------------------------------------------------------

    def _cancel_partial(self) -> None:
        if self._partial_task is not None:
            self._partial_task.cancel()
            self._partial_task = None

    def _maybe_partial(self) -> None:
        turn = self._turn
        if turn is None or self._partial_every <= 0 or self._partial_task is not None:
            return
        if self._position - turn.decoded_until < self._partial_every or not self._decoder.engine_ready:
            return
        turn.decoded_until = self._position
        turn.partials += 1
        audio = self._buffer.slice(turn.start, self._position)
        prefix = turn.stabilizer.prefix()
        self._partial_task = asyncio.create_task(
            self._partial(turn, audio, prefix), name=f"live-partial-{turn.item_id}"
        )

    async def _partial(self, turn: _OpenTurn, audio: AudioArray, prefix: str) -> None:
        generated = await self._decoder.partial(audio, self._config, prefix, f"{turn.item_id}-p{turn.partials}")
        if self._turn is not turn:
            return
        self._partial_task = None
        if generated is not None:
            delta = turn.stabilizer.update(prefix, generated)
            if delta:
                self._send_delta(turn.item_id, delta, turn.started_at, turn.first_delta_at is None)
                turn.first_delta_at = turn.first_delta_at or time.perf_counter()
        self._maybe_partial()

    def _send_delta(self, item_id: str, delta: str, started_at: float, first: bool) -> None:
        if first:
            self._metrics.live_first_delta.observe(time.perf_counter() - started_at)
        self._emit(TranscriptionDelta(item_id=item_id, delta=delta))

    # -- final transcripts -----------------------------------------------------------------------------

    async def _finals(self) -> None:
        while True:
            turn = await self._pending.get()
            self._current = turn
            try:
                await self._final(turn)
            finally:
                self._current = None
                self._outstanding -= 1
                self._pending.task_done()

    async def _final(self, turn: _CommittedTurn) -> None:
        try:
            transcript, _tokens = await self._decoder.final(turn.audio, turn.config, turn.item_id)
        except Overloaded as exc:
            self._fail(turn, f"The server is at capacity: retry in {exc.retry_after} s.", code="rate_limit_exceeded")
            return
        except EngineUnavailable as exc:
            self._fail(
                turn, f"The model is not serving: {exc.reason}", code="engine_unavailable", error_type="server_error"
            )
            return
        except (EngineError, TimeoutError) as exc:
            log.warning("live.final_failed", session_id=self.id, item_id=turn.item_id, error=type(exc).__name__)
            self._fail(
                turn,
                "The transcription of this turn failed in the engine.",
                code="engine_error",
                error_type="server_error",
            )
            return
        except Exception:  # a bug must fail this turn, not stop the session's finals
            log.exception("live.final_crashed", session_id=self.id, item_id=turn.item_id)
            self._fail(
                turn, "The server failed to transcribe this turn.", code="server_error", error_type="server_error"
            )
            return
        remainder = turn.stabilizer.remainder(transcript.text)
        if remainder:
            self._send_delta(turn.item_id, remainder, turn.started_at, turn.first_delta_at is None)
        self._emit(
            TranscriptionCompleted(
                item_id=turn.item_id,
                transcript=transcript.text,
                usage=DurationUsage(seconds=round(len(turn.audio) / SAMPLE_RATE, 3)),
            )
        )
        self._metrics.live_turns.labels(outcome="completed").inc()
        self._metrics.live_final_latency.observe(time.perf_counter() - turn.ended_at)

    def _fail(
        self, turn: _CommittedTurn, message: str, *, code: str, error_type: str = "invalid_request_error"
    ) -> None:
        self._metrics.live_turns.labels(outcome="failed").inc()
        self._emit(
            TranscriptionFailed(
                item_id=turn.item_id, error=ErrorDetail(type=error_type, code=code, message=message, param=None)
            )
        )


__all__ = ["LiveSession"]
