"""The form of `POST /v1/audio/transcriptions`, validated once into a typed request.

Every field but the file is checked here (OpenAI's rules where OpenAI has them, ours where the model
needs them); `TranscriptionParams.to_request` adds the upload and gives the pipeline its request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from qwenasr_appliance.aligner.base import ALIGNER_LANGUAGES, aligner_supports
from qwenasr_appliance.api.errors import bad_request, clip, model_not_found
from qwenasr_appliance.api.schemas import RESPONSE_FORMATS, TIMESTAMP_GRANULARITIES, ResponseFormat, TranscriptionForm
from qwenasr_appliance.config import Settings
from qwenasr_appliance.languages import UnsupportedLanguageError, resolve_language
from qwenasr_appliance.transcription.types import TranscriptionRequest

_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off", ""})
# The formats that have a streamed form (Server-Sent Events of text deltas).
STREAMABLE_FORMATS: Final = frozenset({"json", "text"})


@dataclass(frozen=True)
class TranscriptionParams:
    """The validated fields of one transcription form (everything but the file)."""

    response_format: ResponseFormat
    language: str | None  # canonical model language name, None to detect
    prompt: str
    temperature: float
    stream: bool
    word_timestamps: bool
    subtitles: bool = False  # srt or vtt
    logprobs: bool = False  # include[]=logprobs
    confidence: bool = False  # ask the engine for token log-probabilities

    def to_request(self, audio: bytes, filename: str | None) -> TranscriptionRequest:
        return TranscriptionRequest(
            audio=audio,
            filename=filename,
            language=self.language,
            prompt=self.prompt,
            temperature=self.temperature,
            stream=self.stream,
            word_timestamps=self.word_timestamps,
            subtitles=self.subtitles,
            confidence=self.confidence,
        )


def _parse_bool(value: str | None, param: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise bad_request(f"'{param}' must be true or false.", param=param)


def _parse_temperature(value: str | None) -> float:
    if value is None or not value.strip():
        return 0.0
    try:
        temperature = float(value)
    except ValueError:
        raise bad_request("'temperature' must be a number between 0 and 1.", param="temperature") from None
    if not math.isfinite(temperature) or not 0.0 <= temperature <= 1.0:
        raise bad_request("'temperature' must be a number between 0 and 1.", param="temperature")
    return temperature


def _granularities(value: list[str] | str | None) -> set[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    granularities = {item.strip().lower() for item in items if item.strip()}
    unknown = granularities - set(TIMESTAMP_GRANULARITIES)
    if unknown:
        raise bad_request(
            f"Unsupported timestamp granularity {clip(sorted(unknown)[0])!r}; use 'segment' or 'word'.",
            param="timestamp_granularities[]",
        )
    return granularities


def _include(value: list[str] | str | None) -> set[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    included = {item.strip().lower() for item in items if item.strip()}
    unknown = included - {"logprobs"}
    if unknown:
        raise bad_request(f"Unsupported include value {clip(sorted(unknown)[0])!r}; use 'logprobs'.", param="include[]")
    return included


def _response_format(value: str) -> ResponseFormat:
    wanted = value.strip().lower()
    for known in RESPONSE_FORMATS:
        if wanted == known:
            return known
    raise bad_request(
        f"Unsupported response_format {clip(value)!r}; use one of {', '.join(RESPONSE_FORMATS)}.",
        param="response_format",
    )


def parse_form(form: TranscriptionForm, settings: Settings) -> TranscriptionParams:
    """Check every field except the file. Raises `APIError` (404 for an unknown model, else 400)."""
    if form.model.strip() not in settings.accepted_model_names:
        raise model_not_found(form.model, settings.accepted_model_names)
    response_format = _response_format(form.response_format)
    language: str | None = None
    if form.language and form.language.strip():
        try:
            language = resolve_language(form.language)
        except UnsupportedLanguageError as exc:
            raise bad_request(str(exc), param="language", code="unsupported_language") from None
    prompt = form.prompt or ""
    if len(prompt) > settings.max_prompt_chars:
        raise bad_request(
            f"'prompt' is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}.",
            param="prompt",
        )
    temperature = _parse_temperature(form.temperature)
    granularities = _granularities(form.timestamp_granularities)
    if granularities and response_format != "verbose_json":
        raise bad_request(
            "'timestamp_granularities[]' requires response_format 'verbose_json'.",
            param="timestamp_granularities[]",
        )
    if "word" in granularities and not settings.aligner_model_id:
        raise bad_request(
            "Word timestamps need the forced aligner, which this server does not load: its operator can "
            "enable them with ALIGNER_MODEL_ID=Qwen/Qwen3-ForcedAligner-0.6B. Segment timestamps are "
            "available ('timestamp_granularities[]=segment').",
            param="timestamp_granularities[]",
            code="word_timestamps_unavailable",
        )
    if "word" in granularities and language is not None and not aligner_supports(language):
        raise bad_request(
            f"Word timestamps are not available for {language}: the forced aligner supports "
            f"{', '.join(sorted(ALIGNER_LANGUAGES))}. Segment timestamps are available "
            "('timestamp_granularities[]=segment').",
            param="language",
            code="word_timestamps_unsupported_language",
        )
    # OpenAI ignores `stream` where it cannot stream (whisper-1): the formats that have no streamed form
    # here (srt, vtt, verbose_json) get their usual answer. LiteLLM sends verbose_json on every call.
    stream = _parse_bool(form.stream, "stream") and response_format in STREAMABLE_FORMATS
    logprobs = "logprobs" in _include(form.include)
    if logprobs and response_format != "json":  # OpenAI's rule; with stream=true the done event has them
        raise bad_request("'include[]=logprobs' requires response_format 'json'.", param="include[]")
    return TranscriptionParams(
        logprobs=logprobs,
        confidence=logprobs or (response_format == "verbose_json" and settings.verbose_json_confidence),
        response_format=response_format,
        language=language,
        prompt=prompt,
        temperature=temperature,
        stream=stream,
        word_timestamps="word" in granularities,
        subtitles=response_format in {"srt", "vtt"},
    )
