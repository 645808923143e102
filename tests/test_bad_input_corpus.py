"""The bad-input corpus, end to end: every case goes through a real server process (the appliance's
own granian configuration, cli.build_server, around the test double engine) and must get the right
status and an error in OpenAI's shape, after which a good request still succeeds.

Decisions recorded here (and in docs/reliability.md):
* Unknown form fields are accepted and ignored, as OpenAI's API and other compatible servers do.
* The file's name and its part's content type are hints only: the content decides what it is.
* A truncated file decodes what is there (200), like FFmpeg; a file with nothing decodable is a 400.
"""

from __future__ import annotations

import functools
import math
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from tests.audio_fixtures import encode, flac_with_total_samples, float_wav, pcm16, silent_flac, speech_like, wav_bytes
from tests.hardening import (
    MODEL,
    TRANSCRIPTIONS,
    assert_still_serves,
    error_of,
    multipart,
    rss_bytes,
    tone_wav,
    worker_pids,
)
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MAX_UPLOAD = 2 * 1024 * 1024
MAX_AUDIO_SECONDS = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("corpus") / "server.log"
    env = {
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
        "MAX_CONCURRENT_REQUESTS": "4",
        "LOG_LEVEL": "info",
    }
    process = ServerProcess.product_with_test_double(env, log)
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        assert process.stop() == 0
        assert "Traceback" not in process.logs(), "the server logged a traceback"
        assert "request.unhandled_error" not in process.logs()


# --------------------------------------------------------------------------- audio payloads


@functools.cache
def clip(fmt: str, seconds: float = 2.0) -> bytes:
    return encode(speech_like(seconds, 16_000, seed=3), 16_000, fmt)


def stereo_ogg() -> bytes:
    signal = speech_like(1.0, 16_000, seed=4)
    return encode(np.stack([signal, signal], axis=1), 16_000, "ogg")


def ogg_at(rate: int) -> bytes:
    return encode(speech_like(1.0, rate, seed=5), rate, "ogg")


def truncated(fmt: str, share: float) -> bytes:
    data = clip(fmt)
    return data[: int(len(data) * share)]


@functools.cache
def bomb(known_length: bool) -> bytes:
    """Three hours of silent FLAC: a few hundred kilobytes that decode to 690 MB of samples."""
    data = silent_flac(3 * 3600)
    return data if known_length else flac_with_total_samples(data, 0)


def nan_inf_wav() -> bytes:
    signal = speech_like(1.0, 16_000)
    signal[::7] = np.nan
    signal[1::11] = np.inf
    signal[2::13] = -np.inf
    return float_wav(signal, 16_000)


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    """One bad (or odd) request and what the server must answer."""

    status: int
    code: str | None = None
    param: str | None = None
    # A multipart request built by httpx (files, data) or a raw body with headers.
    files: Callable[[], list[tuple[str, tuple[str | None, bytes | str, str | None]]]] | None = None
    data: dict[str, str] = field(default_factory=lambda: {"model": MODEL})
    raw: Callable[[], tuple[bytes, dict[str, str]]] | None = None
    text: str = "chunk of"  # the start of the transcript of a 200
    truncated: bool | None = None  # a 200 must (True) or must not (False) say X-Audio-Truncated: true

    def send(self, url: str) -> httpx.Response:
        if self.raw is not None:
            body, headers = self.raw()
            return httpx.post(url + TRANSCRIPTIONS, content=body, headers=headers, timeout=60)
        files = self.files() if self.files is not None else []
        return httpx.post(url + TRANSCRIPTIONS, files=files, data=self.data, timeout=60)  # type: ignore[arg-type]


def upload(
    name: str | None, payload: Callable[[], bytes], content_type: str | None = "audio/wav"
) -> Callable[..., list]:  # type: ignore[type-arg]
    return lambda: [("file", (name, payload(), content_type))]


def fields(**values: str) -> dict[str, str]:
    return {"model": MODEL, **values}


def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "hardening-boundary") -> bytes:
    return multipart(parts, boundary)


GOOD_PARTS: list[tuple[str, str | None, bytes]] = [("model", None, MODEL.encode()), ("file", "a.wav", b"")]


def good_form(boundary: str = "hardening-boundary") -> bytes:
    return form([("model", None, MODEL.encode()), ("file", "a.wav", tone_wav())], boundary)


def part_form(disposition: bytes, value: bytes, content_type: bytes | None = None) -> bytes:
    """A form of `model` and one more part with the given Content-Disposition parameters (after
    `form-data; `) and, optionally, content type."""
    head = b"--hardening-boundary\r\nContent-Disposition: form-data; " + disposition + b"\r\n"
    if content_type is not None:
        head += b"Content-Type: " + content_type + b"\r\n"
    return (
        head + b"\r\n" + value + b"\r\n"
        b'--hardening-boundary\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + MODEL.encode() + b"\r\n"
        b"--hardening-boundary--\r\n"
    )


def model_part(value: bytes, charset: bytes) -> bytes:
    """A form of a WAV file and `model` as text in the given charset."""
    return form([("file", "a.wav", tone_wav())])[: -len(b"--hardening-boundary--\r\n")] + (
        b'--hardening-boundary\r\nContent-Disposition: form-data; name="model"\r\n'
        b"Content-Type: text/plain; charset=" + charset + b"\r\n\r\n" + value + b"\r\n--hardening-boundary--\r\n"
    )


def as_multipart(body: bytes, boundary: str = "hardening-boundary") -> tuple[bytes, dict[str, str]]:
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


WAV = upload("a.wav", tone_wav)
TWICE = {
    "language": (b"en", b"de"),
    "temperature": (b"0", b"0.2"),
    "model": (MODEL.encode(),) * 2,
    "stream": (b"true",) * 2,
}


def sent_twice(name: str) -> tuple[bytes, dict[str, str]]:
    """A good form with the text field `name` sent twice."""
    parts = [] if name == "model" else [("model", None, MODEL.encode())]
    parts += [("file", "a.wav", tone_wav()), *((name, None, value) for value in TWICE[name])]
    return as_multipart(form(parts))


CORPUS: dict[str, Case] = {
    # --- the file itself
    "empty file": Case(400, "empty_file", "file", files=upload("empty.wav", lambda: b"")),
    "zero-length wav": Case(
        400, "empty_audio", "file", files=upload("zero.wav", lambda: wav_bytes(b"", sample_rate=16_000))
    ),
    "10 ms of audio": Case(200, files=upload("short.wav", lambda: tone_wav(0.01))),
    "one sample": Case(200, files=upload("one.wav", lambda: wav_bytes(pcm16(np.array([0.5])), sample_rate=16_000))),
    "text named .mp3": Case(400, "unsupported_format", "file", files=upload("n.mp3", lambda: b"not audio " * 100)),
    "png named .wav": Case(
        400, "unsupported_format", "file", files=upload("x.wav", lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    ),
    "zip named .flac": Case(
        400, "unsupported_format", "file", files=upload("x.flac", lambda: b"PK\x03\x04" + b"\0" * 2000)
    ),
    "random bytes named .m4a": Case(
        400,
        "unsupported_format",
        "file",
        files=upload("x.m4a", lambda: np.random.default_rng(1).bytes(4096)),
    ),
    "wav header only (truncated to 20 bytes)": Case(
        400, "invalid_audio", "file", files=upload("t.wav", lambda: clip("wav")[:20])
    ),
    "wav truncated mid-data": Case(200, files=upload("t.wav", lambda: truncated("wav", 0.6))),
    "flac truncated mid-stream": Case(200, files=upload("t.flac", lambda: truncated("flac", 0.6))),
    "mp3 truncated mid-stream": Case(200, files=upload("t.mp3", lambda: truncated("mp3", 0.6))),
    "flac truncated to its header": Case(
        400, "invalid_audio", "file", files=upload("t.flac", lambda: clip("flac")[:30])
    ),
    "mp3 content named .wav": Case(200, files=upload("really-mp3.wav", lambda: clip("mp3"))),
    # libsndfile measures the data against the file's size: the lie costs nothing, the real 0.5 s is served.
    "wav header claiming hours": Case(
        200,
        text="chunk of 0.5 seconds",
        files=upload(
            "liar.wav",
            lambda: wav_bytes(pcm16(speech_like(0.5, 16_000)), sample_rate=16_000, declared_data_bytes=2**32 - 64),
        ),
    ),
    "decompression bomb, length in header": Case(
        400, "audio_too_long", "file", files=upload("bomb.flac", lambda: bomb(True))
    ),
    "decompression bomb, length unknown": Case(
        400, "audio_too_long", "file", files=upload("bomb.flac", lambda: bomb(False))
    ),
    "NaN and Inf samples": Case(200, files=upload("nan.wav", nan_inf_wav)),
    "1 Hz sample rate": Case(
        400, "invalid_audio", "file", files=upload("slow.wav", lambda: wav_bytes(b"\0\1" * 100, sample_rate=1))
    ),
    "384 kHz": Case(200, files=upload("fast.wav", lambda: tone_wav(1.0, rate=384_000))),
    "8 channels": Case(200, files=upload("71.wav", lambda: tone_wav(1.0, channels=8))),
    "file just over the size limit": Case(
        413, "file_too_large", "file", files=upload("big.wav", lambda: b"\0" * (MAX_UPLOAD + 1))
    ),
    "ffconcat playlist naming a local file": Case(
        400,
        "unsupported_format",
        "file",
        files=upload("x.wav", lambda: b"ffconcat version 1.0\nfile /etc/passwd\nfile /proc/self/environ\n"),
    ),
    # --- names and part content types are hints only
    "unicode filename": Case(200, files=upload("réunion 会议 🎤.wav", tone_wav)),
    "path-like filename": Case(200, files=upload("../../../../etc/passwd", tone_wav)),
    "filename without extension": Case(200, files=upload("recording", tone_wav)),
    "text/plain part content type": Case(200, files=upload("a.wav", tone_wav, "text/plain")),
    "filename* (RFC 5987) in the part header": Case(
        200,
        raw=lambda: as_multipart(
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + MODEL.encode() + b"\r\n"
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"; '
            b"filename*=UTF-8''%E4%BC%9A%E8%AE%AE.wav\r\n\r\n" + tone_wav() + b"\r\n--b--\r\n",
            "b",
        ),
    ),
    # --- the request's content type
    "JSON body": Case(
        415,
        "unsupported_media_type",
        None,
        raw=lambda: (b'{"model": "x", "file": "/etc/passwd"}', {"content-type": "application/json"}),
    ),
    "urlencoded body naming a local file": Case(
        415,
        "unsupported_media_type",
        None,
        raw=lambda: (b"model=x&file=%2Fetc%2Fpasswd", {"content-type": "application/x-www-form-urlencoded"}),
    ),
    "raw audio body": Case(
        415, "unsupported_media_type", None, raw=lambda: (tone_wav(), {"content-type": "audio/wav"})
    ),
    "no content type": Case(415, "unsupported_media_type", None, raw=lambda: (good_form(), {})),
    "multipart without a boundary": Case(
        400, "invalid_request", raw=lambda: (good_form(), {"content-type": "multipart/form-data"})
    ),
    # --- malformed multipart
    "boundary that does not match": Case(400, "invalid_request", raw=lambda: as_multipart(good_form("one"), "other")),
    "body truncated mid-file": Case(
        400, "invalid_request", raw=lambda: as_multipart(good_form()[: len(good_form()) // 2])
    ),
    "no closing boundary": Case(
        400, "invalid_request", raw=lambda: as_multipart(good_form()[: -len(b"--hardening-boundary--\r\n")])
    ),
    "part headers never end": Case(
        400,
        "invalid_request",
        raw=lambda: as_multipart(b'--hardening-boundary\r\nContent-Disposition: form-data; name="file"'),
    ),
    "binary garbage": Case(400, "invalid_request", raw=lambda: as_multipart(bytes(range(256)) * 40)),
    "empty body": Case(400, "invalid_request", "file", raw=lambda: as_multipart(b"")),
    "only the closing boundary": Case(
        400, "invalid_request", "file", raw=lambda: as_multipart(b"--hardening-boundary--\r\n")
    ),
    "too many parts": Case(
        413,
        "multipart_limit",
        None,
        raw=lambda: as_multipart(form([(f"x{i}", None, b"y") for i in range(200)] + [("model", None, MODEL.encode())])),
    ),
    "part header of 100 kB": Case(
        413,
        "multipart_limit",
        raw=lambda: as_multipart(form([("model", None, MODEL.encode()), ("file", "n" * 100_000 + ".wav", tone_wav())])),
    ),
    "50 headers in one part": Case(
        413,
        "multipart_limit",
        raw=lambda: as_multipart(
            b"--hardening-boundary\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(50))
            + b'Content-Disposition: form-data; name="model"\r\n\r\n'
            + MODEL.encode()
            + b"\r\n--hardening-boundary--\r\n"
        ),
    ),
    # --- fields
    "missing file": Case(400, "invalid_request", "file", files=lambda: [("model", (None, MODEL, None))], data={}),
    "missing model": Case(400, "invalid_request", "model", files=WAV, data={}),
    "two files": Case(400, "invalid_request", "file", files=lambda: [WAV()[0], WAV()[0]]),
    "file sent as a text field": Case(
        400, "unsupported_format", "file", files=lambda: [("file", (None, "/etc/passwd", None))]
    ),
    "model sent as a file": Case(
        400,
        "invalid_request",
        "model",
        files=lambda: [WAV()[0], ("model", ("m.txt", MODEL.encode(), "text/plain"))],
        data={},
    ),
    "unknown fields are ignored": Case(200, files=WAV, data=fields(foo="bar", n="1", **{"weird[]": "x", "ünï": "ç"})),
    # --- K1: multipart parts of any shape (issue 12): the audio is used, or a 400 naming the field
    "file part without a filename (curl -F 'file=<a.wav')": Case(
        200, raw=lambda: as_multipart(part_form(b'name="file"', tone_wav()))
    ),
    "file part without a filename (OpenAI SDK file=(None, data))": Case(
        200, files=lambda: [("file", (None, tone_wav(), None))]
    ),
    'file part with filename=""': Case(
        200, raw=lambda: as_multipart(part_form(b'name="file"; filename=""', tone_wav()))
    ),
    "file part with only filename*": Case(
        200, raw=lambda: as_multipart(part_form(b"name=\"file\"; filename*=UTF-8''%E4%BC%9A.wav", tone_wav()))
    ),
    "file part with a bare filename*": Case(
        200, raw=lambda: as_multipart(part_form(b'name="file"; filename*=a.wav', tone_wav()))
    ),
    "CRLF inside a quoted filename": Case(
        400, "invalid_request", raw=lambda: as_multipart(part_form(b'name="file"; filename="a\r\nb.wav"', tone_wav()))
    ),
    "percent-encoded CRLF in a filename": Case(
        200, raw=lambda: as_multipart(part_form(b'name="file"; filename="a%0D%0AX-Injected: 1.wav"', tone_wav()))
    ),
    "Latin-1 bytes in a filename": Case(
        200, raw=lambda: as_multipart(part_form(b'name="file"; filename="r\xe9union.wav"', tone_wav()))
    ),
    "nested multipart/mixed as the file": Case(
        400,
        "unsupported_format",
        "file",
        raw=lambda: as_multipart(
            part_form(
                b'name="file"',
                b'--inner\r\nContent-Disposition: attachment; filename="a.wav"\r\n\r\n' + tone_wav() + b"\r\n--inner--",
                b"multipart/mixed; boundary=inner",
            )
        ),
    ),
    "file part without a filename holding text": Case(
        400, "unsupported_format", "file", raw=lambda: as_multipart(part_form(b'name="file"', b"hello " * 200))
    ),
    "binary bytes in the model field": Case(
        400,
        "invalid_value",
        "model",
        raw=lambda: as_multipart(
            form([("model", None, b"\xff\xfe\x00" + bytes(range(128, 256))), ("file", "a.wav", tone_wav())])
        ),
    ),
    "unknown charset on a text field": Case(
        400, "invalid_value", "model", raw=lambda: as_multipart(model_part(MODEL.encode(), b"x-no-such-charset"))
    ),
    "UTF-16 text field with its charset": Case(
        200, raw=lambda: as_multipart(model_part(MODEL.encode("utf-16"), b"utf-16"))
    ),
    "binary bytes in an unknown field": Case(
        400,
        "invalid_value",
        "blob",
        raw=lambda: as_multipart(
            form([*GOOD_PARTS[:1], ("blob", None, b"\x80\xff" * 50), ("file", "a.wav", tone_wav())])
        ),
    ),
    "non-UTF-8 bytes in a part header's value": Case(
        200,
        raw=lambda: as_multipart(
            b"--hardening-boundary\r\nX-Note: \xff\xfe\xc3\x28\r\n"
            + part_form(b'name="file"; filename="a.wav"', tone_wav())[len(b"--hardening-boundary\r\n") :]
        ),
    ),
    "non-UTF-8 bytes in a part header's name": Case(
        400,
        "invalid_request",
        raw=lambda: as_multipart(
            b"--hardening-boundary\r\nX-\xff\xfe: 1\r\n"
            + part_form(b'name="file"; filename="a.wav"', tone_wav())[len(b"--hardening-boundary\r\n") :]
        ),
    ),
    "boundary of 2000 characters": Case(200, raw=lambda: as_multipart(good_form("b" * 2000), "b" * 2000)),
    "boundary of Latin-1 characters (not a token: no boundary)": Case(
        400,
        "invalid_request",
        raw=lambda: (
            good_form("\xe9t\xe9"),
            {"content-type": "multipart/form-data; boundary=\xe9t\xe9".encode("latin-1")},
        ),  # type: ignore[dict-item]
    ),
    # --- K8: OpenAI's statuses and headers (issue 12)
    "stream=true with verbose_json is ignored (LiteLLM)": Case(
        200, files=WAV, data=fields(stream="true", response_format="verbose_json")
    ),
    "stream=true with srt is ignored": Case(
        200, text="1\n", files=WAV, data=fields(stream="true", response_format="srt")
    ),
    "body over the form limit by Content-Length": Case(
        413,
        "file_too_large",
        "file",
        raw=lambda: as_multipart(
            form([("model", None, MODEL.encode()), ("file", "a.wav", b"\0" * (MAX_UPLOAD + 2 * 1024 * 1024))])
        ),
    ),
    # --- K7: no silent truncation (issue 12): every link of a chained Ogg, or the answer says it broke off
    "chained Ogg, mono then stereo": Case(
        200, text="chunk of 2.0", truncated=False, files=upload("c.ogg", lambda: clip("ogg", 1.0) + stereo_ogg())
    ),
    "chained Ogg, 48 kHz then 8 kHz": Case(
        200, text="chunk of 2.0", truncated=False, files=upload("c.ogg", lambda: ogg_at(48_000) + ogg_at(8_000))
    ),
    "chained Ogg, Vorbis then Opus": Case(
        200, text="chunk of 2.0", truncated=False, files=upload("c.ogg", lambda: clip("ogg", 1.0) + clip("opus", 1.0))
    ),
    "Ogg whose second link is cut": Case(
        200,
        text="chunk of 1.0",
        truncated=True,
        files=upload("c.ogg", lambda: clip("ogg", 1.0) + b"OggS\x00\x02" + bytes(100)),
    ),
    "unknown model": Case(404, "model_not_found", "model", files=WAV, data={"model": "whisper-1"}),
    "100 kB model name": Case(404, "model_not_found", "model", files=WAV, data={"model": "m" * 100_000}),
    "temperature inf": Case(400, "invalid_value", "temperature", files=WAV, data=fields(temperature="1e309")),
    "temperature NaN": Case(400, "invalid_value", "temperature", files=WAV, data=fields(temperature="NaN")),
    "temperature negative": Case(400, "invalid_value", "temperature", files=WAV, data=fields(temperature="-0.1")),
    "temperature hex": Case(400, "invalid_value", "temperature", files=WAV, data=fields(temperature="0x1")),
    "temperature empty is the default": Case(200, files=WAV, data=fields(temperature="")),
    "language unknown": Case(400, "unsupported_language", "language", files=WAV, data=fields(language="xx")),
    "language 100 kB": Case(400, "unsupported_language", "language", files=WAV, data=fields(language="x" * 100_000)),
    "language path": Case(400, "unsupported_language", "language", files=WAV, data=fields(language="../../etc/passwd")),
    "language with region is accepted": Case(200, files=WAV, data=fields(language="en-US")),
    "response_format unknown": Case(
        400, "invalid_value", "response_format", files=WAV, data=fields(response_format="xml")
    ),
    "response_format empty": Case(400, "invalid_value", "response_format", files=WAV, data=fields(response_format="")),
    "response_format 100 kB": Case(
        400, "invalid_value", "response_format", files=WAV, data=fields(response_format="j" * 100_000)
    ),
    "response_format in capitals is accepted": Case(200, files=WAV, data=fields(response_format="JSON")),
    "timestamp granularity unknown": Case(
        400,
        "invalid_value",
        "timestamp_granularities[]",
        files=WAV,
        data=fields(response_format="verbose_json", **{"timestamp_granularities[]": "phoneme"}),
    ),
    "timestamp granularity without verbose_json": Case(
        400,
        "invalid_value",
        "timestamp_granularities[]",
        files=WAV,
        data=fields(**{"timestamp_granularities[]": "segment"}),
    ),
    # The SDKs send `include[]` and `timestamp_granularities[]`; curl users type them without `[]`, and
    # qs-style encoders as `[0]`: each form names the same field (it was silently ignored).
    "timestamp granularity unknown, no []": Case(
        400,
        "invalid_value",
        "timestamp_granularities[]",
        files=WAV,
        data=fields(response_format="verbose_json", timestamp_granularities="phoneme"),
    ),
    "include logprobs with text, no []": Case(
        400, "invalid_value", "include[]", files=WAV, data=fields(response_format="text", include="logprobs")
    ),
    "include logprobs with text, [0]": Case(
        400, "invalid_value", "include[]", files=WAV, data=fields(response_format="text", **{"include[0]": "logprobs"})
    ),
    # A scalar field sent twice: a 400 that says so (it was msgspec's "Expected `str | null`, got `array`").
    **{
        f"{name} sent twice": Case(400, "invalid_request", name, raw=functools.partial(sent_twice, name))
        for name in TWICE
    },
    "stream not a boolean": Case(400, "invalid_value", "stream", files=WAV, data=fields(stream="maybe")),
    "prompt over the limit": Case(400, "invalid_value", "prompt", files=WAV, data=fields(prompt="p" * 2001)),
    "prompt of 1 MB": Case(400, "invalid_value", "prompt", files=WAV, data=fields(prompt="p" * 1_000_000)),
    "prompt at the limit with unicode": Case(200, files=WAV, data=fields(prompt="会議 🎤 " * 400)),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_gets_a_clear_answer_and_the_server_keeps_serving(server: ServerProcess, name: str) -> None:
    case = CORPUS[name]
    response = case.send(server.url)
    assert response.status_code == case.status, f"{name}: {response.status_code} {response.text[:500]}"
    if case.status >= 400:
        error = error_of(response)
        if case.code is not None:
            assert error["code"] == case.code, error
        assert error["param"] == case.param, error
    if case.truncated is not None:
        assert (response.headers.get("x-audio-truncated") == "true") is case.truncated, response.headers
    if case.status >= 400:
        pass
    elif response.headers["content-type"].startswith("application/json"):
        assert response.json()["text"].startswith(case.text), response.text
    else:
        assert response.text.startswith(case.text), response.text
    assert_still_serves(server.url)


def test_corpus_covers_the_issue(server: ServerProcess) -> None:
    """Every kind of bad input the issue lists is in the corpus (a guard against losing cases)."""
    kinds = " ".join(CORPUS).lower()
    for needed in (
        "empty file", "zero-length", "10 ms", "named .mp3", "truncated", "content type", "hours", "bomb",
        "size limit", "multipart", "missing file", "unknown fields", "temperature", "language",
        "response_format", "timestamp", "prompt", "unicode filename", "nan", "1 hz", "384 khz", "8 channels",
        # issue 12
        "without a filename", "filename=", "only filename*", "crlf", "nested multipart", "binary bytes",
        "unknown charset", "chained ogg", "cut", "stream=true", "over the form limit",
    ):  # fmt: skip
        assert needed in kinds, needed


# --------------------------------------------------------------------------- huge uploads


def _stream_upload(port: int, total: int, *, chunked: bool) -> tuple[int, bytes]:
    """Send a `total`-byte multipart upload as fast as possible, stopping as soon as the server answers.

    Returns (bytes sent, the response's first bytes).
    """
    head = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + MODEL.encode() + b"\r\n"
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="huge.wav"\r\n\r\n'
    )
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {total}\r\n".encode()
    block = b"\0" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST " + TRANSCRIPTIONS.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n" + framing + b"\r\n"
        )
        answer = bytearray()

        def read() -> None:
            try:
                while chunk := sock.recv(65536):
                    answer.extend(chunk)
            except OSError:
                pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        payload = head
        while sent < total and not answer:
            data = payload or block
            payload = b""
            try:
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
            except OSError:  # the server answered and closed its side
                break
            sent += len(data)
        reader.join(10)
    return sent, bytes(answer)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_huge_upload_is_refused_while_streaming_without_buffering_it(server: ServerProcess, chunked: bool) -> None:
    total = 200 * 1024 * 1024
    (worker,) = worker_pids(server.process.pid)
    before = rss_bytes(worker)
    sent, answer = _stream_upload(server.port, total, chunked=chunked)
    after = rss_bytes(worker)
    print(
        f"413 after {sent / 2**20:.1f} MiB of {total / 2**20:.0f} MiB; worker RSS {(after - before) / 2**20:+.1f} MiB"
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 32 * 1024 * 1024, f"the server answered only after {sent} bytes"
    assert after - before < 32 * 1024 * 1024, f"worker RSS grew by {(after - before) / 2**20:.1f} MiB"
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert b'"error"' in body and b'"message"' in body
    assert f"at most {MAX_UPLOAD} bytes".encode() in body  # the limit, as the handler's own 413 names it
    assert_still_serves(server.url)


def test_a_field_sent_twice_is_named_in_plain_words(server: ServerProcess) -> None:
    body, headers = sent_twice("language")
    answer = httpx.post(server.url + TRANSCRIPTIONS, content=body, headers=headers, timeout=30)
    assert answer.status_code == 400
    assert error_of(answer)["message"] == "'language' was sent more than once; send each parameter once."


def test_upload_bytes_arriving_after_a_small_content_length_are_not_a_new_request(server: ServerProcess) -> None:
    """A body longer than its Content-Length: the excess must not be parsed as a second request."""
    body = good_form()
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST " + TRANSCRIPTIONS.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=hardening-boundary\r\n"
            + f"Content-Length: {len(body) // 2}\r\n\r\n".encode()
            + body
            + smuggled
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, "bytes after the body were answered as a second request"
    assert_still_serves(server.url)


def test_no_input_makes_the_server_fetch_a_url(server: ServerProcess) -> None:
    """Playlists and references inside uploads are never followed: a listener named in them sees nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    payloads = {
        "list.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10.0,\n{url}.ts\n#EXT-X-ENDLIST\n".encode(),
        "concat.wav": f"ffconcat version 1.0\nfile {url}.wav\n".encode(),
        "ref.mp4": b"\0\0\0\x18ftypmp42" + url.encode() * 4,
        "sdp.wav": f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=audio {port} RTP/AVP 0\n".encode(),
    }
    try:
        for name, payload in payloads.items():
            response = httpx.post(
                server.url + TRANSCRIPTIONS, files={"file": (name, payload, "audio/wav")}, data={"model": MODEL}
            )
            assert response.status_code in (400, 415), (name, response.text)
            error_of(response)
            # A URL as the `file` text field is a missing upload, not something to fetch.
            response = httpx.post(server.url + TRANSCRIPTIONS, files={"file": (None, url, None)}, data={"model": MODEL})
            assert response.status_code == 400 and error_of(response)["param"] == "file"
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    assert_still_serves(server.url)


def test_error_messages_do_not_echo_huge_values(server: ServerProcess) -> None:
    response = httpx.post(
        server.url + TRANSCRIPTIONS,
        content=good_form(),
        headers={"content-type": "text/" + "x" * 10_000},
        timeout=30,
    )
    assert response.status_code == 415
    assert len(error_of(response)["message"]) < 300  # type: ignore[arg-type]
    assert math.isfinite(len(response.content))


# --------------------------------------------------------------------------- issue 12: logs, labels, protocols

MARKER = b"QWENASR-BODY-MARKER-"


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        sock.settimeout(10)
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def test_no_request_body_reaches_the_log(server: ServerProcess) -> None:
    """K1: hostile parts of 1.5 MB (file without a filename, binary and odd-charset fields, a huge name
    and path) leave no byte of themselves in the log, which grows by a few lines per request."""
    payload = MARKER * (1_500_000 // len(MARKER))
    before = len(server.logs())
    bodies = [
        part_form(b'name="file"', payload),
        part_form(b'name="file"; filename=""', b"\xff" + payload),
        form([("model", None, b"\xff" + payload), ("file", "a.wav", tone_wav())]),
        model_part(payload, b"x-unknown"),
        form([("model", None, MODEL.encode()), ("file", "a.wav", tone_wav()), ("blob", None, b"\x80" + payload)]),
    ]
    for body in bodies:
        response = httpx.post(server.url + TRANSCRIPTIONS, content=body, headers=as_multipart(b"")[1], timeout=60)
        assert 400 <= response.status_code < 500, response.text[:300]
        assert MARKER.decode() not in response.text
    response = httpx.get(server.url + "/v1/" + "p" * 300 + MARKER.decode() * 100, timeout=10)
    assert response.status_code == 404
    assert_still_serves(server.url)
    grown = server.logs()[before:]
    print(
        f"log growth for {len(bodies) + 2} requests ({len(bodies) * 1.5:.1f} MB of hostile parts): {len(grown)} bytes"
    )
    assert MARKER.decode() not in grown
    assert len(grown) < 16 * 1024


def test_made_up_methods_do_not_grow_the_metrics(server: ServerProcess) -> None:
    """K2: 300 requests with made-up HTTP methods are counted as method="other"; /metrics keeps its size."""
    before = httpx.get(server.url + "/metrics", timeout=10).text
    for i in range(300):
        answer = _raw_request(
            server.port, b"M%05dXXXXXXXXXXXX /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i
        )
        assert answer.startswith((b"HTTP/1.1 405", b"HTTP/1.1 400")), answer[:100]
    after = httpx.get(server.url + "/metrics", timeout=10).text
    print(f"/metrics {len(before)} -> {len(after)} bytes after 300 made-up methods")
    assert "M00001" not in after
    assert 'method="other"' in after
    assert len(after) - len(before) < 4096
    assert_still_serves(server.url)


def test_plain_http2_is_not_served(server: ServerProcess) -> None:
    """K3: the HTTP/2 connection preface (h2c with prior knowledge) gets no HTTP/2 answer: HTTP/1.1 only,
    where the head cap and timeouts apply."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
    answer = _raw_request(server.port, preface)
    # An HTTP/2 server answers with its own SETTINGS frame (type 4), never with an HTTP/1 status line.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
    assert_still_serves(server.url)


def test_text_formats_carry_one_charset(server: ServerProcess) -> None:
    """K8: Content-Type of text and vtt answers names its charset once."""
    for response_format, media_type in (("text", "text/plain"), ("vtt", "text/vtt"), ("srt", "application/x-subrip")):
        response = httpx.post(
            server.url + TRANSCRIPTIONS,
            files={"file": ("a.wav", tone_wav(), "audio/wav")},
            data={"model": MODEL, "response_format": response_format},
            timeout=30,
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == f"{media_type}; charset=utf-8"
