"""Live sessions without a socket: client event parsing, session configuration updates, and the partial
transcript stabilizer (Qwen3-ASR's prefix-and-roll-back method)."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.realtime import RealtimeServerEvent
from pydantic import TypeAdapter

from qwenasr_appliance.transcription.live.events import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    ClientEventError,
    Committed,
    DurationUsage,
    ErrorDetail,
    SessionUpdate,
    SpeechStarted,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
    encode_server_event,
    error_event,
    parse_client_event,
)
from qwenasr_appliance.transcription.live.session_config import (
    LiveSessionConfig,
    ServerVAD,
    apply_update,
    legacy_session_view,
    session_view,
)
from qwenasr_appliance.transcription.live.stabilizer import UNFIXED_DECODES, PartialStabilizer, rollback

LIMIT = 1024
MODELS = frozenset({"qwen3-asr", "Qwen/Qwen3-ASR-1.7B"})


def parse(event: dict[str, Any]) -> Any:
    return parse_client_event(json.dumps(event), max_audio_bytes=LIMIT)


def update(session: dict[str, Any], config: LiveSessionConfig | None = None) -> LiveSessionConfig:
    event = parse({"type": "session.update", "session": {"type": "transcription", **session}})
    return apply_update(
        config or LiveSessionConfig(model="qwen3-asr"), event, accepted_models=MODELS, max_prompt_chars=50
    )


def test_client_events_parse() -> None:
    audio = bytes(range(200))
    append = parse({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode(), "event_id": "a"})
    assert append == AudioAppend("a", audio)
    assert parse({"type": "input_audio_buffer.commit"}) == AudioCommit(None)
    assert parse({"type": "input_audio_buffer.clear", "event_id": "c"}) == AudioClear("c")
    assert isinstance(parse({"type": "session.update", "session": {"type": "transcription"}}), SessionUpdate)


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        (b"\xff\xfe", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ('{"event_id": "x"}', "missing_required_parameter", "type"),
        ('{"type": "conversation.item.create"}', "invalid_value", "type"),
        ('{"type": "input_audio_buffer.append", "audio": 5}', "missing_required_parameter", "audio"),
        ('{"type": "input_audio_buffer.append", "audio": "abc"}', "invalid_base64", "audio"),
        ('{"type": "input_audio_buffer.append", "audio": "' + "A" * 2000 + '"}', "append_too_large", "audio"),
        ('{"type": "session.update", "session": {"type": "realtime"}}', "invalid_value", "session.type"),
        ('{"type": "session.update", "session": 7}', "invalid_value", "session"),
        (
            '{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": "high"}}}}}',
            "invalid_value",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            '{"type": "transcription_session.update", "session": {"input_audio_format": "opus"}}',
            "invalid_value",
            "session.input_audio_format",
        ),
    ],
)
def test_bad_client_events(message: str | bytes, code: str, param: str | None) -> None:
    with pytest.raises(ClientEventError) as raised:
        parse_client_event(message, max_audio_bytes=LIMIT)
    assert (raised.value.code, raised.value.param) == (code, param)


@pytest.mark.parametrize("over", [1, 2])
def test_an_append_just_over_the_limit_is_refused_and_one_at_it_accepted(over: int) -> None:
    """base64 pads to whole 4-character groups, so the length before decoding only bounds the audio
    roughly: a byte or two over the limit is caught after decoding (found by an adversarial pass)."""
    at_limit = base64.b64encode(b"\x00" * LIMIT).decode()
    assert parse_client_event(
        json.dumps({"type": "input_audio_buffer.append", "audio": at_limit}), max_audio_bytes=LIMIT
    ) == AudioAppend(None, b"\x00" * LIMIT)
    over_limit = base64.b64encode(b"\x00" * (LIMIT + over)).decode()
    with pytest.raises(ClientEventError) as raised:
        parse_client_event(
            json.dumps({"type": "input_audio_buffer.append", "audio": over_limit}), max_audio_bytes=LIMIT
        )
    assert raised.value.code == "append_too_large"


def test_error_events_carry_the_client_event_id_and_no_payload() -> None:
    secret_audio = base64.b64encode(b"\x01" * 2000).decode()
    with pytest.raises(ClientEventError) as raised:
        parse_client_event(
            json.dumps({"type": "input_audio_buffer.append", "audio": secret_audio, "event_id": "e7"}),
            max_audio_bytes=LIMIT,
        )
    text = encode_server_event(error_event(raised.value))
    event = json.loads(text)
    assert event["type"] == "error" and event["error"]["event_id"] == "e7" and event["event_id"].startswith("event_")
    assert secret_audio[:40] not in text


def test_server_events_match_the_sdk_types() -> None:
    adapter = TypeAdapter(RealtimeServerEvent)
    config = LiveSessionConfig(model="qwen3-asr")
    events = [
        SpeechStarted(audio_start_ms=100, item_id="item_1"),
        Committed(item_id="item_1", previous_item_id=None),
        TranscriptionDelta(item_id="item_1", delta="Hel"),
        TranscriptionCompleted(item_id="item_1", transcript="Hello", usage=DurationUsage(seconds=1.5)),
        TranscriptionFailed(
            item_id="item_1", error=ErrorDetail(type="server_error", code="engine_error", message="x", param=None)
        ),
        error_event(ClientEventError("bad", param="type")),
    ]
    for event in events:
        parsed = adapter.validate_python(json.loads(encode_server_event(event)))
        assert parsed.type == json.loads(encode_server_event(event))["type"]
    created = json.loads(encode_server_event(msgspec.convert({"session": session_view(config, "sess_1")}, dict)))
    adapter.validate_python({"type": "session.created", "event_id": "event_1", **created})


def test_session_update_changes_only_what_it_names() -> None:
    config = update(
        {
            "audio": {
                "input": {
                    "format": {"type": "audio/pcmu"},
                    "transcription": {"language": "de", "prompt": "Namen: Jörg"},
                }
            }
        }
    )
    assert (config.audio_format, config.language, config.language_name, config.prompt) == (
        "audio/pcmu",
        "de",
        "German",
        "Namen: Jörg",
    )
    assert config.turn_detection == ServerVAD()  # untouched: the default server VAD
    config = update(
        {"audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 900}}}}, config
    )
    assert config.turn_detection == ServerVAD(silence_duration_ms=900)
    assert config.language == "de" and config.audio_format == "audio/pcmu"
    config = update({"audio": {"input": {"turn_detection": None}}}, config)
    assert config.turn_detection is None
    config = update({"audio": {"input": {"transcription": {"language": ""}}}}, config)
    assert config.language is None and config.language_name is None and config.prompt == "Namen: Jörg"
    view = session_view(config, "sess_x")["audio"]["input"]
    assert view["format"] == {"type": "audio/pcmu"} and view["turn_detection"] is None
    assert legacy_session_view(config, "sess_x")["input_audio_format"] == "g711_ulaw"


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}, "session.audio.input.turn_detection.type"),
        (
            {"audio": {"input": {"turn_detection": {"silence_duration_ms": 5}}}},
            "session.audio.input.turn_detection.silence_duration_ms",
        ),
        (
            {"audio": {"input": {"turn_detection": {"prefix_padding_ms": -1}}}},
            "session.audio.input.turn_detection.prefix_padding_ms",
        ),
        ({"audio": {"input": {"transcription": {"prompt": "x" * 51}}}}, "session.audio.input.transcription.prompt"),
        (
            {"audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}},
            "session.audio.input.transcription.model",
        ),
    ],
)
def test_a_refused_update_changes_nothing(session: dict[str, Any], param: str) -> None:
    before = LiveSessionConfig(model="qwen3-asr", language="en", language_name="English")
    with pytest.raises(ClientEventError) as raised:
        update(session, before)
    assert raised.value.param == param


def test_legacy_update_maps_formats_and_fields() -> None:
    event = parse(
        {
            "type": "transcription_session.update",
            "session": {"input_audio_format": "g711_alaw", "input_audio_transcription": {"language": "fr"}},
        }
    )
    config = apply_update(LiveSessionConfig(model="m"), event, accepted_models=frozenset({"m"}), max_prompt_chars=10)
    assert config.audio_format == "audio/pcma" and config.language_name == "French"


def test_rollback_counts_estimated_tokens() -> None:
    assert rollback("one two three four five six seven") == "one two three"  # 4 words >= 5 tokens
    assert rollback("short") == ""
    assert rollback("今天天气很好我们去公园") == "今天天气很好"  # 5 characters
    assert rollback("Hello, world.  ", tokens=1.0) == "Hello,"


def test_stabilizer_follows_qwen_asr_streaming() -> None:
    stabilizer = PartialStabilizer(forced_language=None)
    assert stabilizer.prefix() == ""
    meta = "language English<asr_text>"
    outputs = [
        meta + "and so my",
        meta + "and so my fellow Americans ask",
        " my fellow Americans ask not what your country can do",  # continues the prefix of this decode
    ]
    deltas = [stabilizer.update("", outputs[0])]
    deltas.append(stabilizer.update("", outputs[1]))
    assert stabilizer.decodes == UNFIXED_DECODES
    prefix = stabilizer.prefix()
    assert prefix == meta + "and so"  # the stable text so far, after the model's own metadata
    deltas.append(stabilizer.update(prefix, outputs[2]))
    assert deltas == ["", "and so", " my fellow Americans ask not what"]  # each rolled back by 4 words
    assert "".join(deltas) == stabilizer.emitted
    assert stabilizer.prefix() == meta + stabilizer.emitted
    assert stabilizer.remainder("and so my fellow Americans ask not what your country can do") == " your country can do"
    assert stabilizer.remainder("a different final text") == ""


def test_stabilizer_with_a_forced_language_and_silence() -> None:
    forced = PartialStabilizer(forced_language="English")
    forced.update("", "one two three four five six")
    forced.update("", "one two three four five six seven")
    assert forced.prefix() == "one two three"
    silent = PartialStabilizer(forced_language=None)
    assert silent.update("", "language None<asr_text>") == "" and silent.emitted == ""


words = st.lists(st.sampled_from(["a", "bb", "ccc", "dd", "e", "ff", "好", "天"]), max_size=12)


@given(st.lists(st.tuples(words, st.booleans()), min_size=1, max_size=8))
def test_deltas_only_ever_append(decodes: list[tuple[list[str], bool]]) -> None:
    """Whatever the model writes, the text sent grows by appending and the prefix keeps it."""
    stabilizer = PartialStabilizer(forced_language="English")
    sent = ""
    for output_words, continues in decodes:
        prefix = stabilizer.prefix()
        generated = " ".join(output_words)
        if continues and prefix:
            generated = " " + generated
        delta = stabilizer.update(prefix, generated)
        sent += delta
        assert sent == stabilizer.emitted
        assert stabilizer.prefix().startswith(stabilizer.emitted) or stabilizer.decodes < UNFIXED_DECODES
