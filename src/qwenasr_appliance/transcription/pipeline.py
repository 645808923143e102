"""The transcription pipeline: admit → decode (worker processes; a long file in pieces) → split at
quiet points → engine (all chunks at once, so the engine batches them) → parse → merge with offsets.

HTTP concerns (form parsing, status codes, formats) live in `api/`; engine concerns in `engines/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator

import structlog

from qwenasr_appliance.aligner.base import AlignedChunk, Aligner, AlignerDeadError, merge_chunks
from qwenasr_appliance.audio.decode import DecodedAudio
from qwenasr_appliance.audio.decoder_pool import AudioDecoder
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.audio.split import AudioChunk, is_silent, pad_to_min, split_at_quiet_points
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import (
    Engine,
    EngineDeadError,
    EngineOutput,
    TranscribeOptions,
    run_to_completion,
)
from qwenasr_appliance.engines.prompt import ParsedTranscript, parse_output, parse_partial
from qwenasr_appliance.metrics import METRICS, Metrics
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.text import join_texts
from qwenasr_appliance.transcription.types import (
    RequestStats,
    StreamDelta,
    StreamDone,
    StreamEvent,
    Transcript,
    TranscriptionRequest,
    TranscriptSegment,
    TranscriptWord,
)

log = structlog.get_logger(__name__)


def first_error(group: BaseExceptionGroup[BaseException], *, prefer: type[BaseException]) -> BaseException:
    """The first exception of type `prefer` in a (nested) exception group, else its first exception."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending[:0] = current.exceptions
        else:
            leaves.append(current)
    return next((leaf for leaf in leaves if isinstance(leaf, prefer)), leaves[0])


def _merged_language(parsed: list[ParsedTranscript], chunks: list[AudioChunk], forced: str | None) -> str:
    if forced:
        return forced
    weights: Counter[str] = Counter()
    for result, chunk in zip(parsed, chunks, strict=True):
        if result.language and result.text.strip():
            weights[result.language] += chunk.end_sample - chunk.start_sample
    return weights.most_common(1)[0][0] if weights else ""


class TranscriptionService:
    def __init__(
        self,
        settings: Settings,
        supervisor: EngineSupervisor,
        admission: AdmissionController,
        *,
        metrics: Metrics = METRICS,
    ) -> None:
        self._settings = settings
        self._supervisor = supervisor
        self._admission = admission
        self._metrics = metrics
        self._decoder = AudioDecoder(settings.effective_decode_workers, max_seconds=settings.max_audio_seconds)

    async def warm_up(self) -> None:
        await self._decoder.warm_up()

    def close(self) -> None:
        self._decoder.close()

    def _options(self, request: TranscriptionRequest) -> TranscribeOptions:
        return TranscribeOptions(
            language=request.language,
            context=request.prompt,
            temperature=request.temperature,
            max_new_tokens=self._settings.max_new_tokens,
            incremental=request.stream,
        )

    async def _decode(self, request: TranscriptionRequest, stats: RequestStats) -> DecodedAudio:
        started = time.perf_counter()
        result = await self._decoder.decode(request.audio, request.filename)
        decoded = result.audio
        stats.decode_pieces = result.pieces
        stats.decode_seconds = time.perf_counter() - started
        stats.audio_seconds = decoded.duration_seconds
        self._metrics.stage_duration.labels(stage="decode").observe(stats.decode_seconds)
        return decoded

    def _chunks(self, decoded: DecodedAudio) -> list[AudioChunk]:
        chunks = split_at_quiet_points(decoded.samples, max_chunk_seconds=self._settings.chunk_seconds)
        return [c for c in chunks if not is_silent(c.samples)]

    @contextlib.asynccontextmanager
    async def _admitted(
        self, request: TranscriptionRequest, stats: RequestStats
    ) -> AsyncIterator[tuple[Engine, DecodedAudio, list[AudioChunk], TranscribeOptions]]:
        """Hold an admission slot while the body runs: the upload decoded and cut into chunks, with the
        engine serving now and the request's options. Raises Overloaded, AudioError, EngineUnavailable."""
        async with self._admission.slot() as waited:
            stats.queue_seconds = waited
            self._metrics.stage_duration.labels(stage="queue").observe(waited)
            decoded = await self._decode(request, stats)
            # The engine may have died, or been replaced, while this request waited for its slot.
            engine = self._supervisor.require_engine()
            yield engine, decoded, self._chunks(decoded), self._options(request)

    async def _guard_engine(self, engine: Engine, error: EngineDeadError) -> None:
        self._metrics.engine_errors.labels(kind="dead").inc()
        await self._supervisor.report_dead(engine, error)

    def _finish(
        self,
        decoded: DecodedAudio,
        chunks: list[AudioChunk],
        parsed: list[ParsedTranscript],
        request: TranscriptionRequest,
        stats: RequestStats,
    ) -> Transcript:
        segments = [
            TranscriptSegment(
                start=chunk.offset_seconds,
                end=chunk.offset_seconds + (chunk.end_sample - chunk.start_sample) / SAMPLE_RATE,
                text=result.text.strip(),
            )
            for chunk, result in zip(chunks, parsed, strict=True)
        ]
        language = _merged_language(parsed, chunks, request.language)
        stats.chunks = len(chunks)
        stats.language = language
        return Transcript(
            text=join_texts([r.text for r in parsed]),
            language=language,
            duration=decoded.duration_seconds,
            segments=segments,
        )

    def _observe_success(self, stats: RequestStats, started: float) -> None:
        elapsed = time.perf_counter() - started
        self._metrics.audio_processed.inc(stats.audio_seconds)
        self._metrics.audio_duration.observe(stats.audio_seconds)
        if stats.audio_seconds > 0:
            self._metrics.real_time_factor.observe(elapsed / stats.audio_seconds)

    async def transcribe(self, request: TranscriptionRequest, request_id: str, stats: RequestStats) -> Transcript:
        """Transcribe a whole file. Raises EngineUnavailable, Overloaded, AudioError, EngineError, TimeoutError."""
        self._supervisor.require_engine()
        # Word timestamps need the forced aligner: AlignerUnavailable (503) before any work when it is not up.
        aligner = self._supervisor.aligner.require() if request.word_timestamps else None
        started = time.perf_counter()
        async with self._admitted(request, stats) as (engine, decoded, chunks, options):
            engine_started = time.perf_counter()
            try:
                async with asyncio.timeout(self._settings.request_timeout_seconds):
                    outputs = await self._transcribe_chunks(engine, chunks, options, request_id)
            except EngineDeadError as exc:
                await self._guard_engine(engine, exc)
                raise
            stats.engine_seconds = time.perf_counter() - engine_started
            self._metrics.stage_duration.labels(stage="engine").observe(stats.engine_seconds)
            parsed = [parse_output(o.raw_text, request.language) for o in outputs]
            transcript = self._finish(decoded, chunks, parsed, request, stats)
            if aligner is not None:
                words = await self._align(aligner, chunks, parsed, transcript)
                transcript = dataclasses.replace(transcript, words=words)
        self._observe_success(stats, started)
        return transcript

    async def _align(
        self, aligner: Aligner, chunks: list[AudioChunk], parsed: list[ParsedTranscript], transcript: Transcript
    ) -> list[TranscriptWord]:
        """Word (CJK: character) timestamps: every chunk's text aligned against its audio, all chunks at once
        (off the event loop in the aligner), then placed on the recording's time line, inside its duration
        and non-decreasing (`aligner.base.merge_chunks`)."""
        started = time.perf_counter()

        async def align_chunk(chunk: AudioChunk, result: ParsedTranscript) -> AlignedChunk:
            seconds = (chunk.end_sample - chunk.start_sample) / SAMPLE_RATE
            text = result.text.strip()
            language = result.language or transcript.language
            units = await aligner.align(pad_to_min(chunk.samples), text, language) if text else []
            return AlignedChunk(chunk.offset_seconds, seconds, units)

        tasks = [asyncio.create_task(align_chunk(c, r)) for c, r in zip(chunks, parsed, strict=True)]
        try:
            async with asyncio.timeout(self._settings.request_timeout_seconds):
                aligned = await asyncio.gather(*tasks)
        except AlignerDeadError as exc:
            await self._supervisor.aligner.report_dead(aligner, exc)
            raise
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._metrics.stage_duration.labels(stage="align").observe(time.perf_counter() - started)
        units = merge_chunks(aligned, transcript.duration)
        return [TranscriptWord(word=unit.text, start=unit.start, end=unit.end) for unit in units]

    async def _transcribe_chunks(
        self, engine: Engine, chunks: list[AudioChunk], options: TranscribeOptions, request_id: str
    ) -> list[EngineOutput]:
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        run_to_completion(engine, pad_to_min(chunk.samples), options, f"{request_id}-{i}")
                    )
                    for i, chunk in enumerate(chunks)
                ]
        except ExceptionGroup as failures:
            # Callers (and the supervisor) act on the error, not on a group of them: a dead engine first.
            raise first_error(failures, prefer=EngineDeadError) from None
        return [task.result() for task in tasks]

    async def transcribe_samples(
        self, samples: AudioArray, options: TranscribeOptions, request_id: str
    ) -> tuple[Transcript, int]:
        """Transcribe audio already decoded (16 kHz mono float32) exactly as a file's audio after decoding:
        one admission slot, cut at quiet points, silent chunks dropped, every chunk through the engine at
        once with `options`, parsed and merged. Live sessions' committed turns come here. Returns the
        transcript and the output tokens. Raises Overloaded, EngineUnavailable, EngineError, TimeoutError."""
        self._supervisor.require_engine()
        async with self._admission.slot() as waited:
            self._metrics.stage_duration.labels(stage="queue").observe(waited)
            engine = self._supervisor.require_engine()
            chunks = split_at_quiet_points(samples, max_chunk_seconds=self._settings.chunk_seconds)
            chunks = [c for c in chunks if not is_silent(c.samples)]
            try:
                async with asyncio.timeout(self._settings.request_timeout_seconds):
                    outputs = await self._transcribe_chunks(engine, chunks, options, request_id)
            except EngineDeadError as exc:
                await self._guard_engine(engine, exc)
                raise
        parsed = [parse_output(o.raw_text, options.language) for o in outputs]
        language = _merged_language(parsed, chunks, options.language)
        text = join_texts([r.text for r in parsed])
        transcript = Transcript(text=text, language=language, duration=len(samples) / SAMPLE_RATE)
        return transcript, sum(o.output_tokens for o in outputs)

    async def stream(
        self, request: TranscriptionRequest, request_id: str, stats: RequestStats
    ) -> AsyncIterator[StreamEvent]:
        """Transcribe, yielding text deltas in audio order as the engine produces them, then the result.

        All chunks run at once (so the engine batches them); deltas of a later chunk are held back
        until every earlier chunk has finished.
        """
        self._supervisor.require_engine()
        started = time.perf_counter()
        async with self._admitted(request, stats) as (engine, decoded, chunks, options):
            engine_started = time.perf_counter()
            queues: list[asyncio.Queue[EngineOutput | BaseException]] = [asyncio.Queue() for _ in chunks]

            async def pump(index: int, chunk: AudioChunk) -> None:
                stream = engine.stream(pad_to_min(chunk.samples), options, f"{request_id}-{index}")
                try:
                    async for output in stream:
                        queues[index].put_nowait(output)
                except Exception as exc:
                    queues[index].put_nowait(exc)
                finally:
                    await stream.aclose()  # type: ignore[attr-defined]

            tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(chunks)]
            parsed: list[ParsedTranscript] = []
            emitted = ""
            try:
                async with asyncio.timeout(self._settings.request_timeout_seconds):
                    for index in range(len(chunks)):
                        while True:
                            item = await queues[index].get()
                            if isinstance(item, BaseException):
                                if isinstance(item, EngineDeadError):
                                    await self._guard_engine(engine, item)
                                raise item
                            partial = (
                                parse_output(item.raw_text, request.language)
                                if item.finished
                                else parse_partial(item.raw_text, request.language)
                            )
                            text = join_texts([*(p.text for p in parsed), partial.text])
                            if text.startswith(emitted) and len(text) > len(emitted):
                                yield StreamDelta(text[len(emitted) :])
                                emitted = text
                            if item.finished:
                                parsed.append(partial)
                                break
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            stats.engine_seconds = time.perf_counter() - engine_started
            self._metrics.stage_duration.labels(stage="engine").observe(stats.engine_seconds)
            transcript = self._finish(decoded, chunks, parsed, request, stats)
            if transcript.text != emitted and transcript.text.startswith(emitted):
                yield StreamDelta(transcript.text[len(emitted) :])
        self._observe_success(stats, started)
        yield StreamDone(transcript)
