"""The events of OpenAI's Realtime API that a transcription session exchanges, as msgspec structs.

Followed: the `openai` Python SDK's `openai.types.realtime` (GA interface): client events
`session.update` (`SessionUpdateEvent` with a `RealtimeTranscriptionSessionCreateRequest`),
`input_audio_buffer.append` / `.commit` / `.clear`; server events `session.created` / `session.updated`,
`input_audio_buffer.speech_started` / `.speech_stopped` / `.committed` / `.cleared`,
`conversation.item.input_audio_transcription.delta` / `.completed` / `.failed` and `error`
(`RealtimeErrorEvent`). The beta interface's `transcription_session.update` is accepted too (answered with
`transcription_session.updated`, whose session has the beta field names).

Parsing is transport-free: `parse_client_event` takes one WebSocket text message and returns a typed
event or raises `ClientEventError`, which the session turns into an `error` event (the session goes on).
Unknown fields are ignored, as everywhere in this API.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

CLIENT_EVENT_TYPES: Final = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)

ErrorType = Literal["invalid_request_error", "server_error"]


class ClientEventError(Exception):
    """A client event that cannot be applied; becomes an `error` event in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_value",
        param: str | None = None,
        event_id: str | None = None,
        error_type: ErrorType = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.event_id = event_id
        self.error_type: ErrorType = error_type


# -- client events: session.update ----------------------------------------------------------------------


class AudioFormatParam(Struct, kw_only=True):
    """`RealtimeAudioFormats`: `{"type": "audio/pcm", "rate": 24000}`, `{"type": "audio/pcmu"}`, `{"type": "audio/pcma"}`."""

    type: str | None = None
    rate: int | None = None


class TranscriptionParam(Struct, kw_only=True):
    """`AudioTranscription` (fields other than these three are ignored)."""

    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class TurnDetectionParam(Struct, kw_only=True):
    """`ServerVad` (`semantic_vad` is refused); the response-related fields are ignored."""

    type: str | None = None
    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None


class AudioInputParam(Struct, kw_only=True):
    format: AudioFormatParam | UnsetType = UNSET
    transcription: TranscriptionParam | UnsetType | None = UNSET
    # None (JSON null) turns server VAD off: the client commits turns itself.
    turn_detection: TurnDetectionParam | UnsetType | None = UNSET


class AudioParam(Struct, kw_only=True):
    input: AudioInputParam | None = None


class TranscriptionSessionParam(Struct, kw_only=True):
    """`RealtimeTranscriptionSessionCreateRequest`."""

    type: str | UnsetType = UNSET
    audio: AudioParam | None = None
    include: list[str] | None = None


class LegacyTranscriptionSessionParam(Struct, kw_only=True):
    """The beta `transcription_session.update` session: `input_audio_format` is `pcm16`, `g711_ulaw` or `g711_alaw`."""

    input_audio_format: str | UnsetType = UNSET
    input_audio_transcription: TranscriptionParam | UnsetType | None = UNSET
    turn_detection: TurnDetectionParam | UnsetType | None = UNSET


@dataclass(frozen=True)
class SessionUpdate:
    """`session.update`, or the beta `transcription_session.update` translated (`legacy=True`)."""

    event_id: str | None
    audio_format: AudioFormatParam | UnsetType
    transcription: TranscriptionParam | UnsetType | None
    turn_detection: TurnDetectionParam | UnsetType | None
    legacy: bool = False


@dataclass(frozen=True)
class AudioAppend:
    """`input_audio_buffer.append`: the decoded bytes of its base64 `audio`."""

    event_id: str | None
    audio: bytes


@dataclass(frozen=True)
class AudioCommit:
    event_id: str | None


@dataclass(frozen=True)
class AudioClear:
    event_id: str | None


ClientEvent = SessionUpdate | AudioAppend | AudioCommit | AudioClear

LEGACY_FORMATS: Final = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


def _convert(value: Any, kind: type[Any], param: str, event_id: str | None) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        # msgspec says where: "Expected `int`, got `str` - at `$.audio.input.turn_detection.threshold`".
        message, _, where = str(exc).partition(" - at `$")
        path = param + where.rstrip("`") if where else param
        raise ClientEventError(f"Invalid value at '{path}': {message}", param=path, event_id=event_id) from None


def _event_id(raw: dict[str, Any]) -> str | None:
    value = raw.get("event_id")
    return value[:128] if isinstance(value, str) else None


def parse_client_event(message: str | bytes, *, max_audio_bytes: int) -> ClientEvent:
    """One client event from one WebSocket message.

    `max_audio_bytes` bounds an append's decoded audio (`append_too_large` beyond). Raises ClientEventError.
    """
    try:
        raw = msgspec.json.decode(message)
    except msgspec.DecodeError:
        raise ClientEventError(
            "The message is not valid JSON: every client event is one JSON object.", code="invalid_json"
        ) from None
    if not isinstance(raw, dict):
        raise ClientEventError("A client event must be a JSON object.", code="invalid_json")
    event_id = _event_id(raw)
    kind = raw.get("type")
    if not isinstance(kind, str) or not kind:
        raise ClientEventError(
            "The event has no 'type'.", code="missing_required_parameter", param="type", event_id=event_id
        )
    if kind == "input_audio_buffer.append":
        return AudioAppend(event_id, _audio(raw, max_audio_bytes, event_id))
    if kind == "input_audio_buffer.commit":
        return AudioCommit(event_id)
    if kind == "input_audio_buffer.clear":
        return AudioClear(event_id)
    if kind == "session.update":
        session = _convert(raw.get("session"), TranscriptionSessionParam, "session", event_id)
        if session.type is not UNSET and session.type != "transcription":
            raise ClientEventError(
                f"Invalid value: '{str(session.type)[:40]}'. This server runs transcription sessions only: "
                "'session.type' must be 'transcription'.",
                param="session.type",
                event_id=event_id,
            )
        audio_input = session.audio.input if session.audio and session.audio.input else AudioInputParam()
        return SessionUpdate(event_id, audio_input.format, audio_input.transcription, audio_input.turn_detection)
    if kind == "transcription_session.update":
        legacy = _convert(raw.get("session"), LegacyTranscriptionSessionParam, "session", event_id)
        audio_format: AudioFormatParam | UnsetType = UNSET
        if legacy.input_audio_format is not UNSET:
            name = LEGACY_FORMATS.get(legacy.input_audio_format)
            if name is None:
                raise ClientEventError(
                    f"Invalid value: '{legacy.input_audio_format[:40]}'. Supported values are: "
                    "'pcm16', 'g711_ulaw' and 'g711_alaw'.",
                    param="session.input_audio_format",
                    event_id=event_id,
                )
            audio_format = AudioFormatParam(type=name)
        return SessionUpdate(
            event_id, audio_format, legacy.input_audio_transcription, legacy.turn_detection, legacy=True
        )
    supported = ", ".join(f"'{name}'" for name in CLIENT_EVENT_TYPES)
    raise ClientEventError(
        f"Invalid value: '{kind[:60]}'. Supported values are: {supported}.", param="type", event_id=event_id
    )


def _audio(raw: dict[str, Any], max_audio_bytes: int, event_id: str | None) -> bytes:
    encoded = raw.get("audio")
    if not isinstance(encoded, str):
        raise ClientEventError(
            "'audio' must be a base64 string.", code="missing_required_parameter", param="audio", event_id=event_id
        )
    too_large = ClientEventError(
        f"The appended audio is larger than the limit of {max_audio_bytes} bytes per event: send smaller pieces.",
        code="append_too_large",
        param="audio",
        event_id=event_id,
    )
    # A cheap bound before decoding (4 base64 characters per 3 bytes), the exact one after it.
    if len(encoded) > (max_audio_bytes + 2) // 3 * 4 + 4:
        raise too_large
    try:
        audio = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ClientEventError(
            "'audio' is not valid base64.", code="invalid_base64", param="audio", event_id=event_id
        ) from None
    if len(audio) > max_audio_bytes:
        raise too_large
    return audio


# -- server events --------------------------------------------------------------------------------------

_EVENT_COUNTER = itertools.count(1)
_EVENT_PREFIX = secrets.token_hex(4)


def new_event_id() -> str:
    """`event_...`: unique within the process, cheap (no randomness per event)."""
    return f"event_{_EVENT_PREFIX}{next(_EVENT_COUNTER):012d}"


def new_id(prefix: Literal["sess", "item"]) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class ServerEvent(Struct, kw_only=True, tag_field="type"):
    event_id: str = msgspec.field(default_factory=new_event_id)


class SessionCreated(ServerEvent, tag="session.created"):
    session: dict[str, Any]


class SessionUpdated(ServerEvent, tag="session.updated"):
    session: dict[str, Any]


class TranscriptionSessionUpdated(ServerEvent, tag="transcription_session.updated"):
    session: dict[str, Any]


class SpeechStarted(ServerEvent, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str


class Committed(ServerEvent, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None


class Cleared(ServerEvent, tag="input_audio_buffer.cleared"):
    pass


class TranscriptionDelta(ServerEvent, tag="conversation.item.input_audio_transcription.delta"):
    item_id: str
    delta: str
    content_index: int = 0


class DurationUsage(Struct, kw_only=True, tag_field="type", tag="duration"):
    """`UsageTranscriptTextUsageDuration`: seconds of audio transcribed."""

    seconds: float


class TranscriptionCompleted(ServerEvent, tag="conversation.item.input_audio_transcription.completed"):
    item_id: str
    transcript: str
    usage: DurationUsage
    content_index: int = 0


class ErrorDetail(Struct, kw_only=True):
    """`RealtimeError` (and the `error` of `...input_audio_transcription.failed`)."""

    type: str
    code: str | None
    message: str
    param: str | None
    event_id: str | None = None


class TranscriptionFailed(ServerEvent, tag="conversation.item.input_audio_transcription.failed"):
    item_id: str
    error: ErrorDetail
    content_index: int = 0


class ErrorEvent(ServerEvent, tag="error"):
    error: ErrorDetail


AnyServerEvent = (
    SessionCreated
    | SessionUpdated
    | TranscriptionSessionUpdated
    | SpeechStarted
    | SpeechStopped
    | Committed
    | Cleared
    | TranscriptionDelta
    | TranscriptionCompleted
    | TranscriptionFailed
    | ErrorEvent
)

_ENCODER = msgspec.json.Encoder()


def encode_server_event(event: ServerEvent) -> str:
    """The JSON text of one server event."""
    return _ENCODER.encode(event).decode()


def error_event(error: ClientEventError) -> ErrorEvent:
    return ErrorEvent(
        error=ErrorDetail(
            type=error.error_type, code=error.code, message=error.message, param=error.param, event_id=error.event_id
        )
    )
