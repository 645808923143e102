"""What crosses the boundary between the serving process and the decode workers, and how.

A result returned from a worker process is pickled: the serving process briefly holds the pickled
bytes and the unpickled array, two copies of the signal (measured: +0.95 GB for a 2-hour file). A long
signal is instead written to a file in shared memory (`/dev/shm`, else the temporary directory) and
mapped read-only by the server; the file is unlinked at once, so its memory goes with the mapping.

A file long enough to split (`segmented.py`) goes the same way in pieces: the worker that planned it
leaves the upload in a shared file for the others, each piece is written into one shared output
file at its own offset, and the server maps the result without copying it.

No file outlives its owner for long. Each name carries the identity of the process that created it
(`qwenasr-<kind>-o<pid>.<start time>-<random>`: the pid and its start time in clock ticks, so a reused
pid is not taken for the owner), and `sweep_orphaned_files` removes the files of owners that are gone.
The decoder runs it at start-up (a server killed mid-decode left 3.8 MB per crash in /dev/shm before)
and a few seconds after it replaces a dead or hung worker. Tests find a server's own files by the pids
of its processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from qwenasr_appliance.audio.decode import DecodedAudio, decode_audio, peak_normalize
from qwenasr_appliance.audio.samples import AudioArray
from qwenasr_appliance.audio.segmented import DecodedSegment, NotSplittable, SegmentPlan, decode_segment, plan_segments

# Above this (about 16 s of 16 kHz float32) a result goes through a file: a pickled one is read by the
# server in pieces, each a wait for the interpreter lock under load (bench/worker_roundtrip.py).
SPILL_ABOVE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SpilledSamples:
    path: str
    length: int


def _spill_directory() -> str:
    shm = Path("/dev/shm")  # noqa: S108 - a tmpfs: the file never touches a disk
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else tempfile.gettempdir()


_OWNED_NAME: Final = re.compile(r"^qwenasr-[a-z]+-o(\d+)\.(\d+)-")


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), None when it is gone
    or a zombie (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def owner_tag(pid: int | None = None) -> str:
    """`o<pid>.<start time>` of a process (this one by default): part of the name of each shared file."""
    pid = os.getpid() if pid is None else pid
    return f"o{pid}.{_start_time(pid) or 0}"


def _new_shared_file(kind: str, suffix: str) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=f"qwenasr-{kind}-{owner_tag()}-", suffix=suffix, dir=_spill_directory())


def sweep_orphaned_files(directory: str | None = None) -> int:
    """Remove the shared files in `directory` (the spill directory by default) whose owner process is
    gone (a server or worker killed before it could unlink them); returns how many. Files of living
    owners, and names of another form, are left alone."""
    directory = directory or _spill_directory()
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _OWNED_NAME.match(entry.name)
            if match is None:
                continue
            pid, started = int(match.group(1)), int(match.group(2))
            if _start_time(pid) == started or (started == 0 and _start_time(pid) is not None):
                continue  # its owner still runs
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed


def _unlink(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def decode_for_transfer(
    data: bytes, filename: str | None, *, max_seconds: float
) -> tuple[DecodedAudio, SpilledSamples | None]:
    """Runs in a worker: decode, and move a long signal into a file the server maps."""
    decoded = decode_audio(data, filename, max_seconds=max_seconds)
    samples = decoded.samples
    if samples.nbytes < SPILL_ABOVE_BYTES:
        return decoded, None
    path: str | None = None
    try:
        fd, path = _new_shared_file("audio", ".f32")
        with os.fdopen(fd, "wb") as handle:
            samples.tofile(handle)
    except OSError:  # no room in /dev/shm: fall back to pickling
        _unlink(path)
        return decoded, None
    empty = np.zeros(0, dtype=np.float32)
    return dataclasses.replace(decoded, samples=empty), SpilledSamples(path, int(samples.size))


def discard(result: object) -> None:
    """Runs in the server: drop a worker's result that nobody will receive (its request was cancelled)."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], SpilledSamples):
        _unlink(result[1].path)


def receive(result: tuple[DecodedAudio, SpilledSamples | None]) -> DecodedAudio:
    """Runs in the server: map a spilled signal (read-only) and unlink its file."""
    decoded, spilled = result
    if spilled is None:
        return decoded
    try:
        samples = np.memmap(spilled.path, dtype=np.float32, mode="r", shape=(spilled.length,))
    finally:
        _unlink(spilled.path)
    return dataclasses.replace(decoded, samples=samples)


# --------------------------------------------------------------------------- a file in pieces


@dataclass(frozen=True)
class SharedFiles:
    """The upload and the output of a job in pieces. The server creates them before the job and
    removes them after it, whatever happens: a worker only ever opens them, never creates them, so
    nothing is left behind when a request is cancelled half-way."""

    upload_path: str
    output_path: str

    @classmethod
    def create(cls) -> SharedFiles | None:
        """None when shared memory has no room (the upload is then decoded in one pass)."""
        paths: list[str] = []
        try:
            for kind, suffix in (("upload", ".bin"), ("audio", ".f32")):
                fd, path = _new_shared_file(kind, suffix)
                os.close(fd)
                paths.append(path)
        except OSError:
            for path in paths:
                _unlink(path)
            return None
        return cls(paths[0], paths[1])

    def discard(self) -> None:
        _unlink(self.upload_path)
        _unlink(self.output_path)


@dataclass(frozen=True)
class SegmentJob:
    """A long upload to decode in pieces: the plan, and the files that the upload and pieces go to."""

    plan: SegmentPlan
    files: SharedFiles


@dataclass(frozen=True)
class PieceResult:
    segment: DecodedSegment  # its samples are empty when `written`
    length: int  # 16 kHz samples in the piece
    written: bool  # the samples are in the job's output file at the piece's offset


def decode_or_plan(
    data: bytes,
    filename: str | None,
    files: SharedFiles | None,
    *,
    max_seconds: float,
    max_segments: int,
    min_segment_seconds: float,
) -> tuple[DecodedAudio, SpilledSamples | None] | SegmentJob:
    """Runs in a worker: a job when the upload is long enough to split (the upload is then in
    `files.upload_path` for the other workers), else the whole decode at once (`decode_for_transfer`),
    so a short upload costs no extra round trip."""
    if files is not None:
        plan = plan_segments(
            data, filename, max_seconds=max_seconds, max_segments=max_segments, min_segment_seconds=min_segment_seconds
        )
        if plan is not None and _share_upload(files.upload_path, data):
            return SegmentJob(plan, files)
    return decode_for_transfer(data, filename, max_seconds=max_seconds)


def _share_upload(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)  # never O_CREAT: see SharedFiles
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError:  # no room, or the request is gone: one pass
        return False
    return True


def decode_piece(job: SegmentJob, index: int) -> PieceResult:
    """Runs in a worker: decode piece `index` and write it into the output file at its offset."""
    with open(job.files.upload_path, "rb") as handle:
        data = handle.read()
    segment = decode_segment(data, job.plan, index)
    samples = segment.samples
    length = int(samples.size)
    if length == 0:
        return PieceResult(segment, length, written=False)
    try:
        fd = os.open(job.files.output_path, os.O_WRONLY)
        try:
            offset = job.plan.output_offset(index) * samples.itemsize
            view = samples.data.cast("B")
            while view:
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done
        finally:
            os.close(fd)
    except OSError:  # no room in /dev/shm: the samples travel pickled instead
        return PieceResult(segment, length, written=False)
    empty = np.zeros(0, dtype=np.float32)
    return PieceResult(dataclasses.replace(segment, samples=empty), length, written=True)


def scale_piece(job: SegmentJob, index: int, length: int, peak: float) -> None:
    """Runs in a worker: scale piece `index` (`length` samples, written to the output file) by the whole
    signal's `peak` (`decode.peak_normalize`), in place in the shared file."""
    offset = job.plan.output_offset(index) * np.dtype(np.float32).itemsize
    view = np.memmap(job.files.output_path, dtype=np.float32, mode="r+", offset=offset, shape=(length,))
    peak_normalize(view, peak)
    view.flush()


def normalize_pieces(pieces: list[PieceResult]) -> tuple[float, list[int]]:
    """The whole signal's peak and, when it passes full scale, the indexes of the written pieces a worker
    must scale (`scale_piece`); pieces that came pickled are scaled here, in place."""
    top = max((piece.segment.peak for piece in pieces), default=0.0)
    if top <= 1.0:
        return top, []
    for piece in pieces:
        if not piece.written and piece.length:
            peak_normalize(piece.segment.samples, top)
    return top, [piece.segment.index for piece in pieces if piece.written and piece.length]


def assemble(job: SegmentJob, pieces: list[PieceResult]) -> DecodedAudio:
    """Runs in the server: the pieces of `job` as one decoded signal. Raises NotSplittable when they
    do not fit together (the caller then decodes in one pass)."""
    plan = job.plan
    pieces = sorted(pieces, key=lambda piece: piece.segment.index)
    if [piece.segment.index for piece in pieces] != list(range(plan.segments)):
        raise NotSplittable("pieces are missing")
    last = next((i for i, piece in enumerate(pieces) if piece.segment.reached_end), None)
    if last is None or any(piece.length for piece in pieces[last + 1 :]):
        raise NotSplittable("pieces past the end of the stream hold audio")
    for i, piece in enumerate(pieces[:last]):
        if piece.length != plan.output_offset(i + 1) - plan.output_offset(i):
            raise NotSplittable("a piece does not fill its range")
    source_end = pieces[last].segment.source_end
    total = plan.output_offset(last) + pieces[last].length
    if total <= 0:
        raise NotSplittable("no audio")  # the one-pass decoder reports it properly
    stored = os.path.getsize(job.files.output_path) // np.dtype(np.float32).itemsize
    if all(piece.written for piece in pieces[: last + 1]) and stored == total:
        samples: AudioArray = np.memmap(job.files.output_path, dtype=np.float32, mode="r", shape=(total,))
    else:  # some pieces came pickled (no room in /dev/shm)
        mapped = np.memmap(job.files.output_path, dtype=np.float32, mode="r", shape=(stored,)) if stored else None
        samples = np.empty(total, dtype=np.float32)
        for i, piece in enumerate(pieces[: last + 1]):
            start = plan.output_offset(i)
            end = start + piece.length
            samples[start:end] = mapped[start:end] if piece.written and mapped is not None else piece.segment.samples
    return DecodedAudio(
        samples=samples,
        duration_seconds=(source_end - plan.origin) / plan.rate,
        source_sample_rate=plan.rate,
        source_channels=plan.channels,
        container=plan.container,
        codec=plan.codec,
        decoder=plan.decoder,
        truncated=plan.declared_end is not None and source_end < plan.declared_end,
    )
