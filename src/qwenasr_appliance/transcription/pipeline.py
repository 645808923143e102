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

from qwenasr_appliance.aligner.base import (
    AlignedChunk,
    Aligner,
    AlignerDeadError,
    AlignerError,
    aligner_supports,
    merge_chunks,
)
from qwenasr_appliance.audio.decode import DecodedAudio
from qwenasr_appliance.audio.decoder_pool import AudioDecoder
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.audio.split import AudioChunk, is_silent, pad_to_min, speech_spans, split_at_quiet_points
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import (
    Engine,
    EngineDeadError,
    EngineOutput,
    TokenLogprob,
    TranscribeOptions,
    run_to_completion,
)
from qwenasr_appliance.engines.prompt import OutputParser, ParsedTranscript, parse_output
from qwenasr_appliance.metrics import METRICS, Metrics
from qwenasr_appliance.supervisor.aligner_supervisor import AlignerUnavailable
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.confidence import (
    avg_logprob,
    compression_ratio,
    transcript_tokens,
    visible_tokens,
)
from qwenasr_appliance.transcription.text import join_texts
from qwenasr_appliance.transcription.types import (
    RequestStats,
    StreamDelta,
    StreamDone,
    StreamEvent,
    TokenConfidence,
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


def spoken_languages(parsed: list[ParsedTranscript], chunks: list[AudioChunk], forced: str | None) -> tuple[str, ...]:
    """Every language detected in chunks with text, the one spoken longest first, then by decreasing
    share of the recording's duration (ties: in order of appearance). A forced language is the only one.

    qwen-asr reports the chunks' languages in order of appearance (`merge_languages`:
    "Chinese,English"); here the order is by share, so that the first is the transcript's one language
    (`Transcript.language`, verbose_json's `language`) and the rest are the others spoken."""
    if forced:
        return (forced,)
    weights: Counter[str] = Counter()
    for result, chunk in zip(parsed, chunks, strict=True):
        if result.language and result.text.strip():
            weights[result.language] += chunk.end_sample - chunk.start_sample
    return tuple(language for language, _ in weights.most_common())


def _timed_segment(chunk: AudioChunk, text: str) -> TranscriptSegment:
    """A chunk's segment: its times bound the sound in it (`speech_spans`), the whole chunk if none."""
    offset = chunk.offset_seconds
    spans = tuple((offset + a / SAMPLE_RATE, offset + b / SAMPLE_RATE) for a, b in speech_spans(chunk.samples))
    if not spans or not text:
        return TranscriptSegment(start=offset, end=offset + chunk.samples.shape[0] / SAMPLE_RATE, text=text)
    return TranscriptSegment(start=spans[0][0], end=spans[-1][1], text=text, speech=spans)


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
        self._decoder = AudioDecoder(
            settings.effective_decode_workers,
            max_seconds=settings.max_audio_seconds,
            job_timeout=settings.worker_job_timeout,
        )

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
            logprobs=request.confidence,
        )

    async def _decode(self, request: TranscriptionRequest, stats: RequestStats) -> DecodedAudio:
        started = time.perf_counter()
        result = await self._decoder.decode(request.audio, request.filename)
        decoded = result.audio
        stats.decode_pieces = result.pieces
        stats.audio_truncated = decoded.truncated
        stats.decode_seconds = time.perf_counter() - started
        stats.audio_seconds = decoded.duration_seconds
        self._metrics.stage_duration.labels(stage="decode").observe(stats.decode_seconds)
        return decoded

    def _chunks(self, samples: AudioArray) -> list[AudioChunk]:
        chunks = split_at_quiet_points(samples, max_chunk_seconds=self._settings.chunk_seconds)
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
            yield engine, decoded, self._chunks(decoded.samples), self._options(request)

    async def _guard_engine(self, engine: Engine, error: EngineDeadError) -> None:
        self._metrics.engine_errors.labels(kind="dead").inc()
        await self._supervisor.report_dead(engine, error)

    def _parse(self, output: EngineOutput, request: TranscriptionRequest) -> ParsedTranscript:
        return parse_output(output.raw_text, request.language, request.prompt)

    def _segment(
        self, chunk: AudioChunk, output: EngineOutput, result: ParsedTranscript, request: TranscriptionRequest
    ) -> TranscriptSegment:
        """One chunk's segment with its confidence; counts and logs what went wrong in the chunk."""
        start = chunk.offset_seconds
        end = start + (chunk.end_sample - chunk.start_sample) / SAMPLE_RATE
        text = result.text.strip()
        truncated = output.finish_reason == "length"
        loop_stopped = output.finish_reason == "repetition"
        if truncated:
            self._metrics.truncated_chunks.inc()
            log.warning("transcription.chunk_truncated", start=round(start, 3), end=round(end, 3),
                        output_tokens=output.output_tokens)  # fmt: skip
        if loop_stopped:
            self._metrics.repetition_loops.labels(action="stopped").inc()
            log.warning("transcription.loop_stopped", start=round(start, 3), end=round(end, 3),
                        output_tokens=output.output_tokens)  # fmt: skip
        if result.loops:
            self._metrics.repetition_loops.labels(action="collapsed").inc(result.loops)
            log.info("transcription.loop_collapsed", start=round(start, 3), end=round(end, 3), loops=result.loops)
        if result.echo:
            self._metrics.context_echoes.inc()
            log.warning("transcription.context_echo_dropped", start=round(start, 3), end=round(end, 3))
        tokens: list[TokenLogprob] = []
        if output.logprobs is not None and not result.echo:
            tokens = transcript_tokens(output.logprobs, request.language)
        return dataclasses.replace(
            _timed_segment(chunk, text),
            avg_logprob=avg_logprob(tokens) if text else None,
            compression_ratio=compression_ratio(text),
            no_speech_prob=output.no_speech_prob,
            truncated=truncated,
            loop_stopped=loop_stopped,
            tokens=tuple(TokenConfidence(t.token, t.logprob, t.raw) for t in visible_tokens(tokens)) if text else (),
        )

    def _finish(
        self,
        decoded: DecodedAudio,
        chunks: list[AudioChunk],
        outputs: list[EngineOutput],
        parsed: list[ParsedTranscript],
        request: TranscriptionRequest,
        stats: RequestStats,
        text: str | None = None,
    ) -> Transcript:
        """The transcript of the chunks' outputs; `text` (the streamed text, when streamed) replaces the
        joined chunk texts, which it equals (see `stream`)."""
        segments = [
            self._segment(chunk, output, result, request)
            for chunk, output, result in zip(chunks, outputs, parsed, strict=True)
        ]
        languages = spoken_languages(parsed, chunks, request.language)
        language = languages[0] if languages else ""
        stats.chunks = len(chunks)
        stats.language = language
        return Transcript(
            text=join_texts([r.text for r in parsed]) if text is None else text,
            language=language,
            duration=decoded.duration_seconds,
            segments=segments,
            languages=languages,
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
        aligner = self._aligner_for(request)
        started = time.perf_counter()
        async with self._admitted(request, stats) as (engine, decoded, chunks, options):
            engine_started = time.perf_counter()
            outputs = await self._transcribe_chunks(engine, chunks, options, request_id)
            stats.engine_seconds = time.perf_counter() - engine_started
            self._metrics.stage_duration.labels(stage="engine").observe(stats.engine_seconds)
            parsed = [self._parse(o, request) for o in outputs]
            transcript = self._finish(decoded, chunks, outputs, parsed, request, stats)
            if aligner is not None:
                transcript = await self._with_words(aligner, chunks, parsed, transcript, required=not request.subtitles)
        self._observe_success(stats, started)
        return transcript

    def _aligner_for(self, request: TranscriptionRequest) -> Aligner | None:
        """The aligner this request uses. Word timestamps need it: AlignerUnavailable (503) before any
        work when it is not up. Subtitles use it when it is serving, and are timed without it otherwise."""
        if request.word_timestamps:
            return self._supervisor.aligner.require()
        if request.subtitles and self._supervisor.aligner.ready:
            with contextlib.suppress(AlignerUnavailable):
                return self._supervisor.aligner.require()
        return None

    async def _with_words(
        self,
        aligner: Aligner,
        chunks: list[AudioChunk],
        parsed: list[ParsedTranscript],
        transcript: Transcript,
        *,
        required: bool,
    ) -> Transcript:
        """The transcript with its word timestamps. When they are only wanted for subtitle timing
        (`required` false), an alignment failure leaves the transcript without them (logged)."""
        try:
            words, skipped = await self._align(aligner, chunks, parsed, transcript)
        except AlignerError as exc:
            if required:
                raise
            log.warning("subtitles.align_failed", error=str(exc))
            return transcript
        return dataclasses.replace(transcript, words=words, unaligned_languages=skipped)

    async def _align(
        self, aligner: Aligner, chunks: list[AudioChunk], parsed: list[ParsedTranscript], transcript: Transcript
    ) -> tuple[list[TranscriptWord] | None, tuple[str, ...]]:
        """Word (CJK: character) timestamps: every chunk's text aligned against its audio, all chunks at once
        (off the event loop in the aligner), then placed on the recording's time line, inside its duration,
        non-decreasing and none of zero length (`aligner.base.merge_chunks`).

        A chunk whose language the aligner does not support (`aligner.base.ALIGNER_LANGUAGES`) is not
        aligned: its words are left out and its language is returned in the second value. The words are
        None when no chunk with text could be aligned."""
        started = time.perf_counter()
        skipped: list[str] = []

        async def align_chunk(chunk: AudioChunk, result: ParsedTranscript) -> AlignedChunk:
            seconds = (chunk.end_sample - chunk.start_sample) / SAMPLE_RATE
            text = result.text.strip()
            language = result.language or transcript.language
            if text and not aligner_supports(language):
                skipped.append(language or "unknown")
                text = ""
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
        unaligned = tuple(dict.fromkeys(skipped))
        with_text = sum(1 for result in parsed if result.text.strip())
        if unaligned and len(skipped) == with_text:
            log.info("align.unsupported_language", languages=list(unaligned))
            return None, unaligned
        units = merge_chunks(aligned, transcript.duration)
        return [TranscriptWord(word=unit.text, start=unit.start, end=unit.end) for unit in units], unaligned

    async def _transcribe_chunks(
        self, engine: Engine, chunks: list[AudioChunk], options: TranscribeOptions, request_id: str
    ) -> list[EngineOutput]:
        """Every chunk through the engine at once, within `REQUEST_TIMEOUT_SECONDS` (TimeoutError); a dead
        engine is reported to the supervisor before its EngineDeadError propagates."""
        try:
            async with asyncio.timeout(self._settings.request_timeout_seconds):
                return await self._run_chunks(engine, chunks, options, request_id)
        except EngineDeadError as exc:
            await self._guard_engine(engine, exc)
            raise

    async def _run_chunks(
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
            chunks = self._chunks(samples)
            outputs = await self._transcribe_chunks(engine, chunks, options, request_id)
        parsed = [parse_output(o.raw_text, options.language, options.context) for o in outputs]
        languages = spoken_languages(parsed, chunks, options.language)
        text = join_texts([r.text for r in parsed])
        transcript = Transcript(
            text=text,
            language=languages[0] if languages else "",
            duration=len(samples) / SAMPLE_RATE,
            languages=languages,
        )
        return transcript, sum(o.output_tokens for o in outputs)

    async def stream(
        self, request: TranscriptionRequest, request_id: str, stats: RequestStats
    ) -> AsyncIterator[StreamEvent]:
        """Transcribe, yielding text deltas in audio order as the engine produces them, then the result.

        All chunks run at once (so the engine batches them); deltas of a later chunk are held back
        until every earlier chunk has finished. Each chunk's output goes through one `OutputParser`, which
        releases only text no later token can change (control tokens, headers, loops and context echoes
        are handled as the text streams) and, when the chunk finishes, the held-back tail: the text
        `parse_output` gives for the same output. The transcript's text in `StreamDone` is the joined
        deltas themselves, so a client that shows deltas and one that reads the final text see the same.
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
            outputs: list[EngineOutput] = []
            parsed: list[ParsedTranscript] = []
            emitted = ""
            try:
                async with asyncio.timeout(self._settings.request_timeout_seconds):
                    for index in range(len(chunks)):
                        parser = OutputParser(request.language, request.prompt)
                        while True:
                            item = await queues[index].get()
                            if isinstance(item, BaseException):
                                if isinstance(item, EngineDeadError):
                                    await self._guard_engine(engine, item)
                                raise item
                            partial = parser.finish(item.raw_text) if item.finished else parser.feed(item.raw_text)
                            text = join_texts([*(p.text for p in parsed), partial.text])
                            if text.startswith(emitted) and len(text) > len(emitted):
                                yield StreamDelta(text[len(emitted) :])
                                emitted = text
                            if item.finished:
                                if parser.diverged:
                                    log.warning("stream.output_not_cumulative", chunk=index)
                                outputs.append(item)
                                parsed.append(partial)
                                break
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            stats.engine_seconds = time.perf_counter() - engine_started
            self._metrics.stage_duration.labels(stage="engine").observe(stats.engine_seconds)
            if join_texts([p.text for p in parsed]) != emitted:
                # Each chunk's text only grows and the join only appends, so this cannot happen; if a change
                # to either ever breaks that, the deltas the client has shown stay the transcript.
                log.error("stream.deltas_differ_from_text", emitted_chars=len(emitted))
            transcript = self._finish(decoded, chunks, outputs, parsed, request, stats, text=emitted)
        self._observe_success(stats, started)
        yield StreamDone(transcript)
