"""msgspec schemas of the HTTP API (requests and responses), in OpenAI's shapes where OpenAI has one."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec
from litestar.datastructures import UploadFile

from qwenasr_appliance.supervisor.status import AlignerStatus, SupervisorStatus

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = get_args(ResponseFormat)
TIMESTAMP_GRANULARITIES: tuple[str, ...] = ("segment", "word")


class TranscriptionForm(msgspec.Struct, kw_only=True):
    """The multipart form of `POST /v1/audio/transcriptions` (OpenAI's field set).

    Values arrive as text parts; `TranscriptionRequest` is the validated form the service uses.
    """

    file: UploadFile
    model: str
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    temperature: str | None = None
    timestamp_granularities: list[str] | str | None = msgspec.field(default=None, name="timestamp_granularities[]")
    stream: str | None = None
    include: list[str] | str | None = msgspec.field(default=None, name="include[]")


class DurationUsage(msgspec.Struct, kw_only=True):
    type: Literal["duration"] = "duration"
    seconds: float


class Logprob(msgspec.Struct, kw_only=True):
    """OpenAI's `logprobs` item: a token, its log-probability and its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class TranscriptionJSON(msgspec.Struct, kw_only=True):
    text: str
    logprobs: list[Logprob] | msgspec.UnsetType = msgspec.UNSET  # only with include[]=logprobs
    usage: DurationUsage


class Segment(msgspec.Struct, kw_only=True):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float | None  # null: not computed (see docs/accuracy.md, Confidence)
    compression_ratio: float
    no_speech_prob: float | None  # null: the engine could not tell
    truncated: bool | msgspec.UnsetType = msgspec.UNSET  # present (true) when the chunk hit MAX_NEW_TOKENS


class Word(msgspec.Struct, kw_only=True):
    word: str
    start: float
    end: float


class TranscriptionVerboseJSON(msgspec.Struct, kw_only=True):
    task: Literal["transcribe"] = "transcribe"
    language: str
    duration: float
    text: str
    segments: list[Segment] = msgspec.field(default_factory=list)
    words: list[Word] | msgspec.UnsetType = msgspec.UNSET  # present only when word timestamps were asked for
    usage: DurationUsage


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    max_audio_seconds: float
    languages: list[str]


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: Literal["ok", "failed"]
    reason: str | None = None  # with `failed`: why the engine failed for good


class ReadyResponse(msgspec.Struct, kw_only=True):
    ready: bool
    state: str
    reason: str | None = None
    permanent: bool = False  # true when the engine failed for good: restart the server after fixing the cause


class QueueStatus(msgspec.Struct, kw_only=True):
    in_flight: int
    queued: int
    max_concurrent_requests: int
    max_queue_size: int


class LimitsStatus(msgspec.Struct, kw_only=True):
    max_upload_bytes: int
    max_audio_seconds: float
    chunk_seconds: float


class StatusResponse(msgspec.Struct, kw_only=True):
    version: str
    model: str
    served_model_name: str
    uptime_seconds: float
    ready: bool
    engine: SupervisorStatus
    aligner: AlignerStatus  # the optional forced aligner (state "disabled" without ALIGNER_MODEL_ID)
    queue: QueueStatus
    limits: LimitsStatus
