"""Decoding uploads in the decode worker processes: a short one in one task, a long one in pieces
across all of them (`audio/segmented.py`), so a long file's decode time shrinks with the cores.

Measured on one core: a 488 s mp3 takes 0.38-0.47 s in one pass; in 16 pieces the slowest takes 0.05 s.
On a 16-core H100 host the whole decode step went from 0.64-1.00 s to 0.19-0.22 s.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final

import structlog

from qwenasr_appliance.audio.decode import AudioError, DecodedAudio
from qwenasr_appliance.audio.segmented import NotSplittable
from qwenasr_appliance.audio.transfer import (
    SegmentJob,
    SharedFiles,
    assemble,
    decode_for_transfer,
    decode_or_plan,
    decode_piece,
    discard,
    normalize_pieces,
    receive,
    scale_piece,
    sweep_orphaned_files,
)
from qwenasr_appliance.metrics import METRICS
from qwenasr_appliance.workers import WorkerCrashedError, WorkerPool

log = structlog.get_logger(__name__)

# After a worker is replaced, its shared files are swept this much later (a reply it sent just before
# it died is received, and its file unlinked, long before).
SWEEP_DELAY_SECONDS: Final = 5.0
# A piece shorter than this is not worth a task of its own (each piece re-reads the container).
MIN_PIECE_SECONDS: Final = 30.0
# Smaller uploads are too short to split whatever their format (a minute of 16 kbit/s Opus is 120 KB).
MIN_SPLIT_BYTES: Final = 100_000


@dataclass(frozen=True)
class DecodeResult:
    audio: DecodedAudio
    pieces: int  # 1: decoded in one pass


class AudioDecoder:
    """Decoding in `processes` worker processes; each worker task may take `job_timeout` seconds."""

    def __init__(self, processes: int, *, max_seconds: float, job_timeout: float | None = None) -> None:
        self._pool = WorkerPool(processes, "decode", job_timeout=job_timeout, on_replaced=self._replaced)
        self._max_seconds = max_seconds
        self._count_replacement = METRICS.worker_replaced("decode")

    async def warm_up(self) -> None:
        swept = await asyncio.to_thread(sweep_orphaned_files)
        if swept:
            log.warning("decode.orphaned_files_removed", files=swept)
        await self._pool.warm_up()

    def _replaced(self, reason: str) -> None:
        """A worker was replaced: count it, and a little later (once any reply it sent has been taken)
        remove the shared files it may have left half-written."""
        self._count_replacement(reason)
        loop = asyncio.get_running_loop()
        loop.call_later(SWEEP_DELAY_SECONDS, lambda: loop.run_in_executor(None, sweep_orphaned_files))

    def close(self) -> None:
        self._pool.close()

    async def decode(self, data: bytes, filename: str | None) -> DecodeResult:
        """Raises AudioError, or `WorkerTimeoutError` (a TimeoutError) when a worker task passed its deadline.

        A worker that dies during the decode (the OOM killer, an operator, a crash) costs one retry on
        a fresh worker. If that one dies too: `invalid_audio` when both crashed by themselves (a
        segfault or abort on these bytes: the file's fault), else `decode_failed` (the server's: the
        API answers 503 with Retry-After), never blaming the client for a killed worker.
        """
        try:
            return await self._decode_once(data, filename)
        except WorkerCrashedError as first:
            log.warning("decode.retry_after_worker_death", reason=str(first))
            try:
                return await self._decode_once(data, filename)
            except WorkerCrashedError as second:
                if first.crashed_by_itself and second.crashed_by_itself:
                    raise AudioError(
                        "invalid_audio", "The audio file could not be decoded: the decoder crashed on it."
                    ) from None
                raise AudioError(
                    "decode_failed",
                    f"A decoding worker process of the server stopped while decoding the file ({second}); "
                    "retry the request.",
                ) from None

    async def _decode_once(self, data: bytes, filename: str | None) -> DecodeResult:
        files = SharedFiles.create() if self._pool.processes > 1 and len(data) >= MIN_SPLIT_BYTES else None
        try:
            first = await self._pool.run_with_cleanup(
                discard,
                decode_or_plan,
                data,
                filename,
                files,
                max_seconds=self._max_seconds,
                max_segments=self._pool.processes,
                min_segment_seconds=MIN_PIECE_SECONDS,
            )
            if not isinstance(first, SegmentJob):
                return DecodeResult(receive(first), 1)
            try:
                return DecodeResult(await self._decode_pieces(first), first.plan.segments)
            except NotSplittable as exc:
                log.info("decode.one_pass_fallback", reason=str(exc))
                result = await self._pool.run_with_cleanup(
                    discard, decode_for_transfer, data, filename, max_seconds=self._max_seconds
                )
                return DecodeResult(receive(result), 1)
        finally:
            if files is not None:
                files.discard()

    async def _decode_pieces(self, job: SegmentJob) -> DecodedAudio:
        tasks = [asyncio.ensure_future(self._pool.run(decode_piece, job, i)) for i in range(job.plan.segments)]
        try:
            pieces = await asyncio.gather(*tasks)
            top, to_scale = normalize_pieces(pieces)
            if to_scale:  # louder than full scale: every piece by the whole signal's peak
                lengths = {piece.segment.index: piece.length for piece in pieces}
                scaling: list[asyncio.Future[None]] = [
                    asyncio.ensure_future(self._pool.run(scale_piece, job, i, lengths[i], top)) for i in to_scale
                ]
                try:
                    await asyncio.gather(*scaling)
                finally:
                    for pending in scaling:
                        pending.cancel()
                    await asyncio.gather(*scaling, return_exceptions=True)
            return assemble(job, pieces)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
