"""A live session's effective configuration: defaults, `session.update` applied field by field, and the
session object shown in `session.created` / `session.updated`.

Defaults follow OpenAI's transcription sessions: `audio/pcm` at 24 kHz, server VAD with threshold 0.5,
300 ms prefix padding and 500 ms silence (`openai.types.realtime.realtime_transcription_session_audio_input_turn_detection`).
Only the fields present in an update change; `turn_detection: null` switches to manual commits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

from msgspec import UNSET

from qwenasr_appliance.audio.live_formats import LIVE_AUDIO_FORMATS, LiveAudioFormat
from qwenasr_appliance.languages import UnsupportedLanguageError, resolve_language
from qwenasr_appliance.transcription.live.events import (
    LEGACY_FORMATS,
    ClientEventError,
    SessionUpdate,
    TranscriptionParam,
    TurnDetectionParam,
)

MAX_PREFIX_PADDING_MS: Final = 5_000
MIN_SILENCE_MS: Final = 100
MAX_SILENCE_MS: Final = 10_000


@dataclass(frozen=True)
class ServerVAD:
    """`server_vad` turn detection."""

    threshold: float = 0.5  # 0.0-1.0, see audio/vad.py for how it maps onto the detector
    prefix_padding_ms: int = 300  # audio kept before the detected start of speech
    silence_duration_ms: int = 500  # silence that ends a turn


@dataclass(frozen=True)
class LiveSessionConfig:
    model: str
    audio_format: LiveAudioFormat = "audio/pcm"
    language: str | None = None  # as the client gave it ("en"), shown back in session.updated
    language_name: str | None = None  # canonical model name ("English"); None lets the model detect it
    prompt: str = ""
    turn_detection: ServerVAD | None = ServerVAD()  # None: the client commits turns


def _apply_transcription(
    config: LiveSessionConfig, param: TranscriptionParam | None, *, accepted_models: frozenset[str], max_prompt_chars: int,
    where: str, event_id: str | None,
) -> LiveSessionConfig:  # fmt: skip
    if param is None:  # `transcription: null`: back to the defaults
        return dataclasses.replace(config, language=None, language_name=None, prompt="")
    if param.model is not None and param.model.strip() not in accepted_models:
        raise ClientEventError(
            f"The model '{param.model[:64]}' does not exist; this server serves '{config.model}'.",
            code="model_not_found",
            param=f"{where}.model",
            event_id=event_id,
        )
    language, language_name = config.language, config.language_name
    if param.language is not None:
        if param.language.strip():
            try:
                language_name = resolve_language(param.language)
            except UnsupportedLanguageError as exc:
                raise ClientEventError(
                    str(exc), code="unsupported_language", param=f"{where}.language", event_id=event_id
                ) from None
            language = param.language.strip()
        else:
            language, language_name = None, None
    prompt = config.prompt
    if param.prompt is not None:
        if len(param.prompt) > max_prompt_chars:
            raise ClientEventError(
                f"'prompt' is {len(param.prompt)} characters long; the limit is {max_prompt_chars}.",
                param=f"{where}.prompt",
                event_id=event_id,
            )
        prompt = param.prompt
    return dataclasses.replace(config, language=language, language_name=language_name, prompt=prompt)


def _turn_detection(
    current: ServerVAD | None, param: TurnDetectionParam, where: str, event_id: str | None
) -> ServerVAD:
    if param.type not in (None, "server_vad"):
        raise ClientEventError(
            f"Invalid value: '{str(param.type)[:40]}'. Supported values are: 'server_vad' (or turn_detection null "
            "for manual commits).",
            param=f"{where}.type",
            event_id=event_id,
        )
    base = current or ServerVAD()
    threshold = base.threshold if param.threshold is None else param.threshold
    padding = base.prefix_padding_ms if param.prefix_padding_ms is None else param.prefix_padding_ms
    silence = base.silence_duration_ms if param.silence_duration_ms is None else param.silence_duration_ms
    checks = (
        ("threshold", 0.0 <= threshold <= 1.0, "between 0.0 and 1.0"),
        ("prefix_padding_ms", 0 <= padding <= MAX_PREFIX_PADDING_MS, f"between 0 and {MAX_PREFIX_PADDING_MS}"),
        ("silence_duration_ms", MIN_SILENCE_MS <= silence <= MAX_SILENCE_MS, f"between {MIN_SILENCE_MS} and {MAX_SILENCE_MS}"),
    )  # fmt: skip
    for name, ok, allowed in checks:
        if not ok:
            raise ClientEventError(f"'{name}' must be {allowed}.", param=f"{where}.{name}", event_id=event_id)
    return ServerVAD(threshold=threshold, prefix_padding_ms=padding, silence_duration_ms=silence)


def apply_update(
    config: LiveSessionConfig, update: SessionUpdate, *, accepted_models: frozenset[str], max_prompt_chars: int
) -> LiveSessionConfig:
    """The configuration after `update`; raises ClientEventError and then changes nothing."""
    root = "session" if update.legacy else "session.audio.input"
    audio_format = config.audio_format
    if update.audio_format is not UNSET:
        kind = update.audio_format.type or "audio/pcm"
        where = "session.input_audio_format" if update.legacy else f"{root}.format"
        if kind not in LIVE_AUDIO_FORMATS:
            raise ClientEventError(
                f"Invalid value: '{kind[:40]}'. Supported values are: 'audio/pcm', 'audio/pcmu' and 'audio/pcma'.",
                param=f"{where}.type",
                event_id=update.event_id,
            )
        if kind == "audio/pcm" and update.audio_format.rate not in (None, 24_000):
            raise ClientEventError(
                f"'audio/pcm' is 24000 Hz only (OpenAI's rule), not {update.audio_format.rate}.",
                param=f"{where}.rate",
                event_id=update.event_id,
            )
        audio_format = kind
    config = dataclasses.replace(config, audio_format=audio_format)
    if update.transcription is not UNSET:
        where = "session.input_audio_transcription" if update.legacy else f"{root}.transcription"
        config = _apply_transcription(
            config, update.transcription, accepted_models=accepted_models, max_prompt_chars=max_prompt_chars,
            where=where, event_id=update.event_id,
        )  # fmt: skip
    if update.turn_detection is not UNSET:
        where = "session.turn_detection" if update.legacy else f"{root}.turn_detection"
        detection = update.turn_detection
        turn = None if detection is None else _turn_detection(config.turn_detection, detection, where, update.event_id)
        config = dataclasses.replace(config, turn_detection=turn)
    return config


def _turn_detection_view(config: LiveSessionConfig) -> dict[str, Any] | None:
    if config.turn_detection is None:
        return None
    vad = config.turn_detection
    return {
        "type": "server_vad",
        "threshold": vad.threshold,
        "prefix_padding_ms": vad.prefix_padding_ms,
        "silence_duration_ms": vad.silence_duration_ms,
    }


def session_view(config: LiveSessionConfig, session_id: str) -> dict[str, Any]:
    """The effective session, shaped as `RealtimeTranscriptionSessionCreateResponse` (GA)."""
    audio_format: dict[str, Any] = {"type": config.audio_format}
    if config.audio_format == "audio/pcm":
        audio_format["rate"] = 24_000
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": session_id,
        "audio": {
            "input": {
                "format": audio_format,
                "transcription": {"model": config.model, "language": config.language, "prompt": config.prompt},
                "turn_detection": _turn_detection_view(config),
                "noise_reduction": None,
            }
        },
        "include": None,
    }


def legacy_session_view(config: LiveSessionConfig, session_id: str) -> dict[str, Any]:
    """The effective session with the beta field names (answer to `transcription_session.update`)."""
    legacy_format = next(name for name, kind in LEGACY_FORMATS.items() if kind == config.audio_format)
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "input_audio_format": legacy_format,
        "input_audio_transcription": {"model": config.model, "language": config.language, "prompt": config.prompt},
        "turn_detection": _turn_detection_view(config),
        "input_audio_noise_reduction": None,
        "include": None,
    }
