"""Uploaded bytes -> 16 kHz mono float32 samples.

Two decoders, tried in an order picked from the file's first bytes (and its name as a hint):

* libsndfile (`soundfile`) for the formats whose length it knows exactly from the header: WAV,
  FLAC, AIFF, CAF, W64, AU...
* FFmpeg (`av`) for everything else: MP3, Ogg (Vorbis, Opus), MP4/M4A (AAC), WebM, MPEG, ADTS.
  libsndfile can read MP3 and Ogg, but it stops at the length it computed when it opened the file,
  which is only an estimate for an MP3 without a Xing header and covers only the first stream of a
  chained Ogg: it silently drops the rest. FFmpeg reads to the end and decodes these as fast or
  faster.

Decoding is incremental: blocks are downmixed, cleaned (NaN/Inf -> 0) and resampled by a streaming
soxr resampler into one growing buffer, so no full-length copy of the source signal ever exists, and
decoding stops as soon as the decoded duration passes the limit (a decompression bomb or a header that
lies costs at most `max_seconds` of work).

Loud input is scaled, not clipped: a signal whose peak passes full scale (float WAV/FLAC over 1.0, a
codec's decoded overs, the resampler's overshoot) is divided by its peak once it is complete
(`peak_normalize`), as qwen-asr's `float_range_normalize` does, so its waveform keeps its shape
instead of being flattened at +-1.

Everything here is synchronous, allocation-bounded CPU work with no shared state: the server runs
it in decode worker processes (`workers.py`); `segmented.py` splits one long file across them.
"""

from __future__ import annotations

import io
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Final, Literal

import av
import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from qwenasr_appliance.audio.ogg import ogg_links
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray

__all__ = [
    "ADDITIONAL_FORMATS",
    "SUPPORTED_FORMATS",
    "AudioError",
    "AudioErrorCode",
    "AudioTooLongError",
    "DecodedAudio",
    "decode_audio",
    "probe_duration",
]

logger = logging.getLogger(__name__)

DecoderName = Literal["soundfile", "pyav"]
AudioErrorCode = Literal[
    "empty_file",  # zero bytes uploaded
    "unsupported_format",  # no decoder recognises the bytes as audio
    "invalid_audio",  # recognised, but corrupt, without an audio track, or with absurd parameters
    "empty_audio",  # a valid file that holds no samples
    "audio_too_long",  # longer than the caller's limit
    "decode_failed",  # the server could not finish (out of memory); not the client's fault
]

RESAMPLE_QUALITY: Final = "HQ"  # soxr's; the streaming and the segmented decoders must agree
# What OpenAI's transcription endpoint documents; the message for unreadable files lists these.
SUPPORTED_FORMATS: Final = ("flac", "mp3", "mp4", "mpeg", "mpga", "m4a", "ogg", "wav", "webm")
# Also decoded (content is sniffed; names are only hints), but not advertised.
ADDITIONAL_FORMATS: Final = ("opus", "oga", "aac", "aiff", "aif", "caf", "w64", "mkv", "mka", "wma")

MIN_SOURCE_SAMPLE_RATE: Final = 1_000
MAX_SOURCE_SAMPLE_RATE: Final = 768_000
# Decoded audio may run this much past `max_seconds` (container rounding, codec padding).
DURATION_TOLERANCE_SECONDS: Final = 0.5
# A container's duration (FFmpeg) can be an estimate from the bit rate; reject up front only when
# it is clearly over, the incremental check catches the rest.
_ESTIMATE_SLACK: Final = 1.10

# libsndfile's SF_ERR_MALFORMED_FILE and SF_ERR_UNSUPPORTED_ENCODING: it knows the format, the file
# is bad. Any other open error (unrecognised format, "system" errors on garbage) means "not mine".
_SF_MALFORMED_FILE: Final = 3
_SF_UNSUPPORTED_ENCODING: Final = 4
_SF_UNKNOWN_FRAMES: Final = 2**62  # libsndfile reports SF_COUNT_MAX when it does not know the length
# libsndfile formats whose frame count may be an estimate (see the module docstring).
SF_ESTIMATED_LENGTH_FORMATS: Final = frozenset({"MP3", "OGG"})
_SF_BLOCK_SAMPLES: Final = 1 << 18  # per read, all channels together
_RESAMPLE_BATCH: Final = 1 << 16  # source samples collected before one soxr call
_INITIAL_CAPACITY_SECONDS: Final = 60.0  # output buffer when the length is unknown; it grows
_MAX_PREALLOCATED_SECONDS: Final = 4 * 3600.0
_MAX_CONSECUTIVE_PACKET_ERRORS: Final = 64
_PYAV_MAX_SAFE_PLANAR_CHANNELS: Final = 8  # see Interleaver

# FFmpeg demuxers allowed to open an upload. Others (concat, HLS, image and subtitle formats...)
# are never probed: some open further files or URLs named inside the upload.
_PYAV_FORMAT_WHITELIST: Final = "aac,ac3,aiff,amr,asf,au,caf,eac3,flac,loas,matroska,mov,mp3,mpeg,mpegts,ogg,w64,wav,wv"
# The upload is read through Python file I/O; no protocol is needed, so none is allowed ("none" is
# not a protocol name). This stops any demuxer from opening files or URLs it finds in the data.
_PYAV_PROTOCOL_WHITELIST: Final = "none"

# PyAV before 19 fails on undecodable metadata strings unless told to ignore them; 19 dropped the option
# (it raises TypeError on it).
_PYAV_OPEN_EXTRA: Final[dict[str, str]] = (
    {"metadata_errors": "ignore"} if int(av.__version__.split(".")[0]) < 19 else {}
)
_PYAV_ERRORS: Final = (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError)
SF_READ_ERRORS: Final = (sf.SoundFileError, RuntimeError, ValueError, TypeError)

# Content magic of the formats that libsndfile reads completely; anything else that looks like
# audio goes to FFmpeg first.
_SF_MAGIC: Final = (b"RIFF", b"RIFX", b"RF64", b"FORM", b"fLaC", b".snd", b"caff", b"riff")
_FFMPEG_MAGIC: Final = (
    b"ID3",  # MP3 with an ID3v2 tag
    b"OggS",
    b"\x1a\x45\xdf\xa3",  # EBML: WebM, Matroska
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"\x30\x26\xb2\x75",  # ASF (WMA)
    b"#!AMR",
)
_FFMPEG_EXTENSIONS: Final = frozenset(
    {
        "mp3",
        "mpga",
        "mp2",
        "m4a",
        "m4b",
        "mp4",
        "mov",
        "3gp",
        "aac",
        "adts",
        "webm",
        "weba",
        "mkv",
        "mka",
        "mpeg",
        "mpg",
        "ogg",
        "oga",
        "opus",
        "wma",
        "asf",
        "amr",
        "ts",
    }
)


class AudioError(ValueError):
    """The upload cannot be turned into audio; `code` is machine-readable, the message is for users."""

    def __init__(self, code: AudioErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: AudioErrorCode = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Decoding runs in worker processes: the error must survive pickling with its code.
        return (AudioError, (self.code, self.message))


class AudioTooLongError(AudioError):
    """The audio is longer than `max_seconds`.

    `duration_seconds` is the length found: the header's (or container's estimate) when rejected
    before decoding, otherwise how far decoding got before it stopped (`at_least` is then True).
    """

    def __init__(self, duration_seconds: float, max_seconds: float, *, at_least: bool) -> None:
        if at_least:
            detail = f"it is longer than the maximum of {max_seconds:g} seconds"
        else:
            detail = f"it is {duration_seconds:.1f} seconds long, the maximum is {max_seconds:g} seconds"
        super().__init__("audio_too_long", f"The audio is too long: {detail}.")
        self.duration_seconds = duration_seconds
        self.max_seconds = max_seconds
        self.at_least = at_least

    def __reduce__(self) -> tuple[Any, ...]:
        return (_too_long, (self.duration_seconds, self.max_seconds, self.at_least))


def _too_long(duration_seconds: float, max_seconds: float, at_least: bool) -> AudioTooLongError:
    return AudioTooLongError(duration_seconds, max_seconds, at_least=at_least)


@dataclass(frozen=True, slots=True, eq=False)
class DecodedAudio:
    samples: AudioArray  # 1-D, SAMPLE_RATE, float32 in [-1, 1], finite
    duration_seconds: float  # of the decoded source audio
    source_sample_rate: int
    source_channels: int
    container: str  # "wav", "flac" (libsndfile) or FFmpeg's demuxer name ("mp3", "matroska,webm")
    codec: str  # "pcm_16", "flac" (libsndfile subtype) or FFmpeg's decoder name ("aac", "opus")
    decoder: DecoderName
    truncated: bool = False  # the data ended early or broke off; what decoded before is kept


def _unsupported() -> AudioError:
    names = ", ".join(SUPPORTED_FORMATS)
    return AudioError(
        "unsupported_format",
        f"The audio file could not be decoded: it is not a supported audio format ({names}).",
    )


def _invalid(reason: str) -> AudioError:
    return AudioError("invalid_audio", f"The audio file could not be decoded: {reason}.")


def _empty_audio() -> AudioError:
    return AudioError("empty_audio", "The audio file contains no audio samples.")


class _NotRecognised(Exception):
    """This decoder does not read these bytes; try the next one."""


class _Delegated(_NotRecognised):
    """libsndfile recognised the format but should not decode it (see the module docstring)."""


# --------------------------------------------------------------------------- public functions


def probe_duration(data: bytes, filename: str | None) -> float | None:
    """Duration in seconds from the headers only, or None when unknown or unreadable.

    A cheap check before any heavy work; for MP3 and Ogg it may be an estimate.
    """
    if not data:
        return None
    probes: list[Callable[[bytes], float | None]] = (
        [_probe_pyav, _probe_soundfile] if prefers_ffmpeg(data, filename) else [_probe_soundfile, _probe_pyav]
    )
    for probe in probes:
        try:
            duration = probe(data)
        except Exception:  # best effort: decode_audio reports the real problem
            logger.debug("duration probe %s failed", probe.__name__, exc_info=True)
            continue
        if duration is not None and math.isfinite(duration) and duration >= 0:
            return duration
    return None


def decode_audio(data: bytes, filename: str | None, *, max_seconds: float) -> DecodedAudio:
    """Decode an upload to 16 kHz mono float32, or raise `AudioError` (and nothing else).

    `filename` only steers which decoder is tried first; the content decides. `max_seconds` may be
    `math.inf`; audio longer than it (plus `DURATION_TOLERANCE_SECONDS`) raises `AudioTooLongError`,
    from the header when it tells, else as soon as decoding gets there. Error codes: see
    `AudioErrorCode`. Only a non-positive `max_seconds` (a programming error) raises plain ValueError.
    """
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive, not {max_seconds!r}")
    if not data:
        raise AudioError("empty_file", "The uploaded audio file is empty.")

    attempts: list[tuple[DecoderName, Callable[[bytes, float], DecodedAudio]]]
    if prefers_ffmpeg(data, filename):
        attempts = [("pyav", _decode_pyav), ("soundfile", _decode_soundfile_any)]
    else:
        attempts = [("soundfile", _decode_soundfile), ("pyav", _decode_pyav)]
    errors: list[AudioError] = []
    pending = deque(attempts)
    while pending:
        name, attempt = pending.popleft()
        try:
            return attempt(data, max_seconds)
        except AudioTooLongError:
            raise
        except _Delegated:
            # libsndfile knows the format but FFmpeg reads it better; keep libsndfile as a last resort.
            pending.append(("soundfile", _decode_soundfile_any))
        except _NotRecognised:
            continue
        except AudioError as exc:
            errors.append(exc)
        except MemoryError as exc:
            raise AudioError("decode_failed", "The server ran out of memory while decoding the audio file.") from exc
        except Exception as exc:  # a decoder bug or an exotic failure: still the file's problem
            logger.warning("audio decoder %s failed unexpectedly", name, exc_info=True)
            errors.append(_invalid(f"the file is damaged ({type(exc).__name__})"))
    if errors:
        raise errors[0]  # from the first decoder that recognised the format
    if data.startswith(_SF_MAGIC + _FFMPEG_MAGIC) or data[4:8] == b"ftyp":
        raise _invalid("it looks like an audio file but is damaged or uses an unsupported encoding")
    raise _unsupported()


# --------------------------------------------------------------------------- decoder choice


def prefers_ffmpeg(data: bytes, filename: str | None) -> bool:
    head = data[:16]
    if head.startswith(_SF_MAGIC):
        return False
    if head.startswith(_FFMPEG_MAGIC) or head[4:8] == b"ftyp":  # ftyp: MP4, M4A, MOV, 3GP
        return True
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio or ADTS sync
        return True
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:  # MPEG transport stream
        return True
    if filename:
        return PurePath(filename).suffix.lower().lstrip(".") in _FFMPEG_EXTENSIONS
    return False


# --------------------------------------------------------------------------- libsndfile


class _ClampedBytesIO(io.BytesIO):
    """libsndfile may seek before the start of a malformed file. BytesIO raises ValueError, which
    soundfile's cffi callback can only print ("Exception ignored") before returning position 0;
    go to position 0 quietly instead.
    """

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        try:
            return super().seek(offset, whence)
        except ValueError:
            return super().seek(0)


def open_soundfile(data: bytes) -> sf.SoundFile:
    try:
        return sf.SoundFile(_ClampedBytesIO(data))
    except sf.LibsndfileError as exc:
        if exc.code == _SF_MALFORMED_FILE:
            raise _invalid("the file is damaged") from exc
        if exc.code == _SF_UNSUPPORTED_ENCODING:
            raise _invalid("it uses an unsupported audio encoding") from exc
        raise _NotRecognised(exc.error_string) from exc
    except SF_READ_ERRORS as exc:
        raise _NotRecognised(str(exc)) from exc


def known_frames(sound_file: sf.SoundFile) -> int | None:
    frames = int(sound_file.frames)
    return frames if 0 <= frames < _SF_UNKNOWN_FRAMES else None


def _probe_soundfile(data: bytes) -> float | None:
    with open_soundfile(data) as sound_file:
        frames = known_frames(sound_file)
        rate = int(sound_file.samplerate)
        return frames / rate if frames is not None and rate > 0 else None


def _decode_soundfile(data: bytes, max_seconds: float) -> DecodedAudio:
    return _decode_with_soundfile(data, max_seconds, allow_estimated_length=False)


def _decode_soundfile_any(data: bytes, max_seconds: float) -> DecodedAudio:
    return _decode_with_soundfile(data, max_seconds, allow_estimated_length=True)


def _decode_with_soundfile(data: bytes, max_seconds: float, *, allow_estimated_length: bool) -> DecodedAudio:
    with open_soundfile(data) as sound_file:
        container = str(sound_file.format)
        estimated = container in SF_ESTIMATED_LENGTH_FORMATS
        if estimated and not allow_estimated_length:
            raise _Delegated(container)
        frames = known_frames(sound_file)
        if frames is None:
            # soundfile seeks after every read, which fails when libsndfile does not know the
            # length (e.g. a FLAC stream without a sample count); FFmpeg reads these fine.
            raise _NotRecognised("unknown length")
        rate = int(sound_file.samplerate)
        channels = int(sound_file.channels)
        if channels < 1:
            raise _invalid("it declares no audio channels")
        check_sample_rate(rate)
        header_seconds = frames / rate
        check_header_duration(header_seconds, max_seconds, exact=not estimated)
        pipeline = _Pipeline(rate, max_seconds, expected_seconds=header_seconds)

        block_frames = max(1024, min(1 << 16, _SF_BLOCK_SAMPLES // channels))
        buffer = np.empty((block_frames, channels), dtype=np.float32)
        truncated = False
        while True:
            try:
                block = sound_file.read(block_frames, dtype="float32", always_2d=True, out=buffer)
            except SF_READ_ERRORS as exc:
                if pipeline.source_frames == 0:
                    raise _invalid("the audio data is damaged") from exc
                truncated = True
                break
            if block.shape[0] == 0:
                break
            pipeline.push(average_channels(block.T))
        subtype = str(sound_file.subtype)

    return _finish(
        pipeline,
        channels=channels,
        container=container.lower(),
        codec=subtype.lower(),
        decoder="soundfile",
        # A stream that ends short of the frame count its header states (a FLAC cut at a frame boundary
        # reads to its end without an error), like a cut data chunk, is a cut file.
        truncated=truncated or data_chunk_cut(data) or (not estimated and pipeline.source_frames < frames),
    )


def data_chunk_cut(data: bytes) -> bool:
    """True when a WAV (RIFF `data` chunk) or AIFF (FORM `SSND` chunk) upload ends before the sample data
    its header declares: libsndfile then reads the bytes that are there without a word, so a cut file
    would pass as whole. Chunk layout: RIFF (Microsoft, little-endian sizes) and EA IFF 85 (AIFF,
    big-endian); a size of 0 or 0xFFFFFFFF (streams written before their length was known) declares
    nothing."""
    order: Literal["little", "big"]
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        wanted, order = b"data", "little"
    elif data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        wanted, order = b"SSND", "big"
    else:
        return False
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], order)
        if chunk == wanted:
            return 0 < size < 0xFFFFFFFF and offset + 8 + size > len(data)
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    return False


# --------------------------------------------------------------------------- FFmpeg


def open_pyav(data: bytes) -> Any:
    open_container: Callable[..., Any] = av.open  # its overloads cannot type the version-dependent keywords
    try:
        return open_container(
            io.BytesIO(data),
            mode="r",
            options={
                "format_whitelist": _PYAV_FORMAT_WHITELIST,
                "protocol_whitelist": _PYAV_PROTOCOL_WHITELIST,
            },
            **_PYAV_OPEN_EXTRA,
        )
    except _PYAV_ERRORS as exc:
        raise _NotRecognised(str(exc)) from exc


def pyav_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / av.time_base
    return None


def _probe_pyav(data: bytes) -> float | None:
    with open_pyav(data) as container:
        if not container.streams.audio:
            return None
        return pyav_duration(container, container.streams.audio[0])


@dataclass
class _PyavDecoding:
    """What decoding the links of one upload has produced so far (one link unless chained Ogg)."""

    max_seconds: float
    estimate: float | None = None
    pipeline: _Pipeline | None = None
    channels: int = 0
    container: str = ""
    codec: str = ""
    truncated: bool = False
    packet_errors: int = 0

    def push(self, blocks: list[MonoBlock]) -> None:
        for block in blocks:
            if self.pipeline is None:
                self.pipeline = _Pipeline(block.rate, self.max_seconds, expected_seconds=self.estimate)
            else:
                self.pipeline.set_source_rate(block.rate)
            self.pipeline.push(block.samples)


def _decode_pyav(data: bytes, max_seconds: float) -> DecodedAudio:
    """FFmpeg's decode of every link of the upload (`ogg.ogg_links`: a chained Ogg is decoded link by
    link, into one signal; anything else is one link)."""
    decoding = _PyavDecoding(max_seconds)
    links = ogg_links(data)
    for index, link in enumerate(links):
        try:
            _decode_pyav_link(link, decoding)
        except AudioTooLongError:
            raise
        except (_NotRecognised, AudioError):
            if index == 0:
                raise
            decoding.truncated = True  # a later link that does not decode: what came before is kept
            break
    pipeline = decoding.pipeline
    if pipeline is None or pipeline.source_frames == 0:
        if decoding.truncated or decoding.packet_errors:
            raise _invalid("the audio data is damaged")
        raise _empty_audio()
    return _finish(
        pipeline,
        channels=decoding.channels,
        container=decoding.container,
        codec=decoding.codec,
        decoder="pyav",
        truncated=decoding.truncated,
    )


def _decode_pyav_link(data: bytes, decoding: _PyavDecoding) -> None:
    with open_pyav(data) as container:
        if not container.streams.audio:
            raise _invalid("it contains no audio track")
        stream = container.streams.audio[0]
        if stream.codec_context is None:  # FFmpeg has no decoder for this codec
            raise _invalid("it uses an unsupported audio encoding")
        if stream.codec_context.sample_rate:  # 0 when only the decoder will tell
            check_sample_rate(int(stream.codec_context.sample_rate))
        estimate = pyav_duration(container, stream)
        if estimate is not None:
            check_header_duration(estimate, decoding.max_seconds, exact=False)
        first_link = decoding.pipeline is None
        if first_link:
            decoding.estimate = estimate
            decoding.channels = int(stream.codec_context.layout.nb_channels)
        interleaver = Interleaver()
        batcher = FrameBatcher()
        decoding.packet_errors = 0
        seconds_before = decoding.pipeline.source_seconds if decoding.pipeline is not None else 0.0

        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except _PYAV_ERRORS:
                decoding.truncated = True
                break
            try:
                frames = packet.decode()
            except _PYAV_ERRORS:
                # Skip a damaged packet as FFmpeg's command line does; give up on a run of them.
                decoding.packet_errors += 1
                if decoding.packet_errors >= _MAX_CONSECUTIVE_PACKET_ERRORS:
                    decoding.truncated = True
                    break
                continue
            decoding.packet_errors = 0
            for frame in frames:
                if frame.samples == 0:
                    continue
                if decoding.pipeline is None and batcher.empty:
                    decoding.channels = int(frame.layout.nb_channels)
                for safe_frame in interleaver.make_safe(frame):
                    decoding.push(batcher.add(safe_frame))
        decoding.push(batcher.flush())
        if first_link:
            decoding.container = str(container.format.name)
            decoding.codec = str(stream.codec_context.name)
        if _ended_before_its_declared_length(container, estimate, decoding, seconds_before):
            decoding.truncated = True


# Containers whose header states the exact length (WAV/AIFF data size, FLAC STREAMINFO total samples):
# decoding that ends well short of it means the file was cut. Others (MP3, Ogg, MP4...) only estimate it.
_EXACT_LENGTH_CONTAINERS: Final = frozenset({"wav", "w64", "aiff", "flac", "caf"})
_CUT_TOLERANCE_SECONDS: Final = 0.05


def _ended_before_its_declared_length(
    container: Any, declared_seconds: float | None, decoding: _PyavDecoding, seconds_before: float
) -> bool:
    """True when a link of an exact-length container decoded more than `_CUT_TOLERANCE_SECONDS` short of
    the length its header declares (FFmpeg decodes a cut WAV or FLAC without an error)."""
    pipeline = decoding.pipeline
    names = set(str(container.format.name).split(","))
    if declared_seconds is None or pipeline is None or not names & _EXACT_LENGTH_CONTAINERS:
        return False
    return pipeline.source_seconds - seconds_before < declared_seconds - _CUT_TOLERANCE_SECONDS


class Interleaver:
    """Works around a PyAV 18 crash: for a planar frame with 8 or more channels, `planes` and
    `to_ndarray()` read one data pointer past the end and segfault (a 7.1 AAC upload would kill the
    server). Such frames are converted to the packed (one-plane) sample format by swresample first;
    the rate and layout stay as they are, so no samples are delayed.
    """

    def __init__(self) -> None:
        self._resampler: Any = None
        self._key: tuple[str, str, int] | None = None

    def make_safe(self, frame: Any) -> list[Any]:
        if not frame.format.is_planar or frame.layout.nb_channels < _PYAV_MAX_SAFE_PLANAR_CHANNELS:
            return [frame]
        key = (str(frame.format.name), str(frame.layout.name), int(frame.sample_rate))
        if key != self._key:
            self._resampler = av.AudioResampler(format=frame.format.packed, layout=frame.layout, rate=frame.sample_rate)
            self._key = key
        return list(self._resampler.resample(frame))


@dataclass(frozen=True, slots=True)
class MonoBlock:
    samples: AudioArray
    rate: int


_PLANAR_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "u8p": np.dtype(np.uint8),
    "s16p": np.dtype(np.int16),
    "s32p": np.dtype(np.int32),
    "s64p": np.dtype(np.int64),
    "fltp": np.dtype(np.float32),
    "dblp": np.dtype(np.float64),
}


class FrameBatcher:
    """Decoded frames -> mono blocks of many frames each.

    Per-frame numpy work (downmix, cleaning, resampler calls) cost more than decoding a 1,152-sample
    MP3 frame: batching it took a 488 s mp3 from 0.62 s to 0.43 s on one core (a 30 s clip: 37 -> 28 ms).
    Planar frames (MP3, AAC, Opus decoders) are read plane by plane in place, because PyAV's
    `to_ndarray` stacks the planes of every frame (28 -> 24 ms for the clip, 0.43 -> 0.38 s for 488 s).
    A block ends early where the sample format, layout or rate changes.
    """

    def __init__(self, block_samples: int = 1 << 15) -> None:
        self._block_samples = block_samples
        self._frames: list[Any] = []  # planar: a list of channel arrays per frame; packed: one array
        self._samples = 0
        self._key: tuple[str, bool, int, int] | None = None

    @property
    def empty(self) -> bool:
        return not self._frames

    def add(self, frame: Any) -> list[MonoBlock]:
        """Take a frame (as made safe by `Interleaver`); returns the blocks that are complete."""
        sample_format = frame.format
        name = str(sample_format.name)
        key = (name, bool(sample_format.is_planar), int(frame.layout.nb_channels), int(frame.sample_rate))
        done = self.flush() if key != self._key else []
        self._key = key
        samples = int(frame.samples)
        dtype = _PLANAR_DTYPES.get(name) if key[1] else None
        if dtype is not None:
            self._frames.append([np.frombuffer(plane, dtype=dtype, count=samples) for plane in frame.planes])
        else:
            self._frames.append(frame.to_ndarray())
        self._samples += samples
        if self._samples >= self._block_samples:
            done += self.flush()
        return done

    def flush(self) -> list[MonoBlock]:
        if not self._frames or self._key is None:
            return []
        name, planar, channels, rate = self._key
        frames, self._frames, total = self._frames, [], self._samples
        self._samples = 0
        if planar and name in _PLANAR_DTYPES:
            planes = np.empty((channels, total), dtype=_PLANAR_DTYPES[name])
            for channel in range(channels):
                np.concatenate([frame[channel] for frame in frames], out=planes[channel])
        else:
            planes = np.concatenate(frames, axis=1) if len(frames) > 1 else frames[0]
            if not planar:  # interleaved: one row of samples * channels
                planes = planes.reshape(-1, channels).T
        return [MonoBlock(average_channels(planes), rate)]


# --------------------------------------------------------------------------- shared pipeline


def average_channels(planes: npt.NDArray[Any]) -> AudioArray:
    """(channels, n) samples of any PCM dtype -> a new mono float32 array in [-1, 1] scale."""
    channels = planes.shape[0]
    kind = planes.dtype.kind
    mono: AudioArray = planes.sum(axis=0, dtype=np.float32) if channels > 1 else planes[0].astype(np.float32, copy=True)
    scale = 1.0 / channels
    if kind == "u":  # unsigned PCM is centred on half its range
        half = float(2 ** (planes.dtype.itemsize * 8 - 1))
        mono -= half * channels
        scale /= half
    elif kind == "i":
        scale /= float(2 ** (planes.dtype.itemsize * 8 - 1))
    if scale != 1.0:
        mono *= np.float32(scale)
    return mono


def clean_in_place(block: AudioArray) -> None:
    """NaN and infinities become silence. Levels are left alone: `peak_normalize` scales the whole signal."""
    np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def peak(samples: AudioArray) -> float:
    """The largest absolute sample value (0.0 for no samples)."""
    return float(np.max(np.abs(samples))) if samples.size else 0.0


def peak_normalize(samples: AudioArray, peak_value: float | None = None) -> None:
    """Scale `samples` in place into [-1, 1] when their peak (`peak_value`, or measured) passes 1.0.

    qwen-asr's `float_range_normalize` (`qwen_asr/inference/utils.py`): a signal over full scale is
    divided by its peak, then clipped to [-1, 1] (which then only catches float rounding); a signal
    within full scale is left exactly as it is.
    """
    top = peak(samples) if peak_value is None else peak_value
    if top > 1.0:
        np.multiply(samples, np.float32(1.0 / top), out=samples)
        np.clip(samples, -1.0, 1.0, out=samples)


def check_sample_rate(rate: int) -> None:
    if rate < MIN_SOURCE_SAMPLE_RATE:
        raise _invalid(f"its sample rate of {rate} Hz is not supported (the minimum is {MIN_SOURCE_SAMPLE_RATE} Hz)")
    if rate > MAX_SOURCE_SAMPLE_RATE:
        raise _invalid(f"its sample rate of {rate} Hz is not supported (the maximum is {MAX_SOURCE_SAMPLE_RATE} Hz)")


def check_header_duration(seconds: float, max_seconds: float, *, exact: bool) -> None:
    limit = max_seconds * (1.0 if exact else _ESTIMATE_SLACK) + DURATION_TOLERANCE_SECONDS
    if seconds > limit:
        raise AudioTooLongError(seconds, max_seconds, at_least=False)


def _finish(
    pipeline: _Pipeline,
    *,
    channels: int,
    container: str,
    codec: str,
    decoder: DecoderName,
    truncated: bool,
) -> DecodedAudio:
    samples = pipeline.finish()
    if samples.shape[0] == 0:
        raise _empty_audio()
    peak_normalize(samples)
    if truncated:
        logger.info("audio data broke off after %.2f s; decoded what was there", pipeline.source_seconds)
    return DecodedAudio(
        samples=samples,
        duration_seconds=pipeline.source_seconds,
        source_sample_rate=pipeline.first_rate,
        source_channels=channels,
        container=container,
        codec=codec,
        decoder=decoder,
        truncated=truncated,
    )


class _SampleBuffer:
    """A float32 array that grows in place (realloc), so the result is never copied again."""

    def __init__(self, capacity: int) -> None:
        self._data: AudioArray = np.empty(max(capacity, 1), dtype=np.float32)
        self._size = 0

    def append(self, block: AudioArray) -> None:
        end = self._size + block.shape[0]
        if end > self._data.shape[0]:
            # No view of the private array exists yet, so skipping numpy's reference check is safe.
            self._data.resize(max(end, self._data.shape[0] * 3 // 2), refcheck=False)
        self._data[self._size : end] = block
        self._size = end

    def finish(self) -> AudioArray:
        self._data.resize(self._size, refcheck=False)
        return self._data


class _Pipeline:
    """Mono blocks at the source rate -> limit check, cleaning, streaming resampling, one buffer."""

    def __init__(self, rate: int, max_seconds: float, *, expected_seconds: float | None) -> None:
        check_sample_rate(rate)
        self.first_rate = rate
        self.source_frames = 0
        self._seconds_before_rate = 0.0  # decoded at earlier sample rates
        self._frames_at_rate = 0
        self._rate = rate
        self._max_seconds = max_seconds
        self._limit_seconds = max_seconds + DURATION_TOLERANCE_SECONDS
        self._resampler = self._new_resampler(rate)
        self._pending: list[AudioArray] = []
        self._pending_frames = 0
        capacity_seconds = min(
            expected_seconds if expected_seconds is not None else _INITIAL_CAPACITY_SECONDS,
            self._limit_seconds,
            _MAX_PREALLOCATED_SECONDS,
        )
        self._output = _SampleBuffer(int(capacity_seconds * SAMPLE_RATE) + 1024)

    @property
    def source_seconds(self) -> float:
        return self._seconds_before_rate + self._frames_at_rate / self._rate

    @staticmethod
    def _new_resampler(rate: int) -> Any:
        if rate == SAMPLE_RATE:
            return None
        return soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def push(self, block: AudioArray) -> None:
        """Take ownership of `block` (mono float32 at the current source rate); may modify it."""
        frames = block.shape[0]
        if frames == 0:
            return
        self.source_frames += frames
        self._frames_at_rate += frames
        if self.source_seconds > self._limit_seconds:
            raise AudioTooLongError(self.source_seconds, self._max_seconds, at_least=True)
        clean_in_place(block)
        self._pending.append(block)
        self._pending_frames += frames
        if self._pending_frames >= _RESAMPLE_BATCH:
            self._drain(last=False)

    def set_source_rate(self, rate: int) -> None:
        """Some streams (MP3, ADTS, chained Ogg) change sample rate midway."""
        if rate == self._rate:
            return
        check_sample_rate(rate)
        self._drain(last=True)
        self._seconds_before_rate = self.source_seconds
        self._frames_at_rate = 0
        self._rate = rate
        self._resampler = self._new_resampler(rate)

    def finish(self) -> AudioArray:
        self._drain(last=True)
        return self._output.finish()

    def _drain(self, *, last: bool) -> None:
        if len(self._pending) == 1:
            block = self._pending[0]
        elif self._pending:
            block = np.concatenate(self._pending)
        else:
            block = np.empty(0, dtype=np.float32)
        self._pending = []
        self._pending_frames = 0
        if self._resampler is not None:
            block = self._resampler.resample_chunk(block, last=last)  # may overshoot: see peak_normalize
        self._output.append(block)
