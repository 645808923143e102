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
from qwenasr_appliance.languages import iso_code
from qwenasr_appliance.transcription.subtitles import build_cues
from qwenasr_appliance.transcription.types import Transcript, TranscriptSegment

# Litestar appends `; charset=utf-8` to every `text/*` media type itself: written here too, the header
# would carry the parameter twice. The bodies are UTF-8 in every format.
CONTENT_TYPES: dict[ResponseFormat, str] = {
    "json": "application/json",
    "text": "text/plain",
    "srt": "application/x-subrip; charset=utf-8",
    "verbose_json": "application/json",
    "vtt": "text/vtt",
}


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _cues(transcript: Transcript) -> list[TranscriptSegment]:
    return [s for s in transcript.segments if s.text.strip()]


def _vtt_text(text: str) -> str:
    """WebVTT cue text: `&`, `<` and `>` as character references (the `-->` arrow cannot occur then)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_srt(transcript: Transcript) -> str:
    """SubRip: numbered cues from `transcription.subtitles.build_cues`, times as HH:MM:SS,mmm."""
    blocks = [
        f"{i}\n{_clock(c.start, ',')} --> {_clock(c.end, ',')}\n{c.text.replace('-->', '->')}\n"
        for i, c in enumerate(build_cues(transcript), start=1)
    ]
    return "\n".join(blocks)


def to_vtt(transcript: Transcript) -> str:
    """WebVTT: the same cues as `to_srt`, times as HH:MM:SS.mmm."""
    blocks = [f"{_clock(c.start, '.')} --> {_clock(c.end, '.')}\n{_vtt_text(c.text)}\n" for c in build_cues(transcript)]
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
    return [Logprob(token=t.token, logprob=round(t.logprob, 6), bytes=list(t.raw)) for t in transcript.logprobs]


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


def _language_tags(languages: tuple[str, ...]) -> str:
    return ", ".join(dict.fromkeys(tag for tag in (iso_code(name) for name in languages) if tag))


def transcript_headers(transcript: Transcript) -> dict[str, str]:
    """Response headers describing a finished transcript.

    * `X-Audio-Duration`: seconds of decoded audio.
    * `Content-Language`: every language spoken, as ISO 639 primary tags (RFC 9110 8.5 allows a list),
      the one spoken longest first (`en, de`); absent when nothing was recognised. verbose_json's
      `language` carries only the first, as OpenAI's one-string field.
    * `X-Unaligned-Languages`: the tags of languages whose chunks got no word timestamps because the
      forced aligner does not support them (`words` then holds the other chunks' words, or is left out
      when no chunk was aligned); absent when every chunk was aligned.
    """
    headers = {"X-Audio-Duration": f"{transcript.duration:.3f}"}
    languages = transcript.languages or ((transcript.language,) if transcript.language else ())
    if tags := _language_tags(languages):
        headers["Content-Language"] = tags
    if transcript.unaligned_languages and (tags := _language_tags(transcript.unaligned_languages)):
        headers["X-Unaligned-Languages"] = tags
    return headers
