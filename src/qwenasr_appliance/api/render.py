"""Turn a finished transcript into each of OpenAI's response formats."""

from __future__ import annotations

import msgspec

from qwenasr_appliance.api.schemas import (
    DurationUsage,
    Logprob,
    ResponseFormat,
    Segment,
    TranscriptionJSON,
    TranscriptionVerboseJSON,
    Word,
)
from qwenasr_appliance.transcription.types import Transcript, TranscriptSegment

CONTENT_TYPES: dict[ResponseFormat, str] = {
    "json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "verbose_json": "application/json",
    "vtt": "text/vtt; charset=utf-8",
}


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(transcript: Transcript) -> list[TranscriptSegment]:
    return [s for s in transcript.segments if s.text.strip()]


def to_srt(transcript: Transcript) -> str:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    blocks = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in _cues(transcript)]
    return "WEBVTT\n\n" + "\n".join(blocks)


def to_verbose_json(transcript: Transcript) -> TranscriptionVerboseJSON:
    segments = [
        Segment(
            id=i,
            seek=round(s.start * 100),
            start=round(s.start, 3),
            end=round(s.end, 3),
            text=s.text,
            tokens=[],
            temperature=0.0,
            avg_logprob=None if s.avg_logprob is None else round(s.avg_logprob, 6),
            compression_ratio=round(s.compression_ratio, 6),
            no_speech_prob=None if s.no_speech_prob is None else round(s.no_speech_prob, 6),
            truncated=True if s.truncated else msgspec.UNSET,
        )
        for i, s in enumerate(_cues(transcript))
    ]
    words = (
        [Word(word=w.word, start=round(w.start, 3), end=round(w.end, 3)) for w in transcript.words]
        if transcript.words is not None
        else msgspec.UNSET
    )
    return TranscriptionVerboseJSON(
        language=transcript.language.lower(),
        duration=round(transcript.duration, 3),
        text=transcript.text,
        segments=segments,
        words=words,
        usage=DurationUsage(seconds=round(transcript.duration, 3)),
    )


def to_logprobs(transcript: Transcript) -> list[Logprob]:
    """The transcript's tokens in OpenAI's `logprobs` shape."""
    return [
        Logprob(token=t.token, logprob=round(t.logprob, 6), bytes=list(t.token.encode("utf-8")))
        for t in transcript.logprobs
    ]


def render(transcript: Transcript, response_format: ResponseFormat, *, logprobs: bool = False) -> tuple[bytes, str]:
    """The response body and its content type; `logprobs` adds them to `json` (include[]=logprobs)."""
    body: bytes
    if response_format == "text":
        body = (transcript.text + "\n").encode()
    elif response_format == "srt":
        body = to_srt(transcript).encode()
    elif response_format == "vtt":
        body = to_vtt(transcript).encode()
    elif response_format == "verbose_json":
        body = msgspec.json.encode(to_verbose_json(transcript))
    else:
        payload = TranscriptionJSON(
            text=transcript.text,
            logprobs=to_logprobs(transcript) if logprobs else msgspec.UNSET,
            usage=DurationUsage(seconds=round(transcript.duration, 3)),
        )
        body = msgspec.json.encode(payload)
    return body, CONTENT_TYPES[response_format]
