"""`api/multipart.py` in process: what the audio form's parser makes of parts of any shape (issue 12, K1).
The corpus (`test_bad_input_corpus.py`) sends the same shapes through a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from litestar.datastructures import UploadFile

from qwenasr_appliance.api.errors import APIError
from qwenasr_appliance.api.multipart import parse_form_data


async def _chunks(body: bytes, size: int) -> AsyncGenerator[bytes, None]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def parse(body: bytes, size: int = 7) -> dict[str, Any]:
    return asyncio.run(parse_form_data(_chunks(body, size), b"b", part_limit=64))


def part(disposition: bytes, value: bytes, *headers: bytes) -> bytes:
    head = b"".join(header + b"\r\n" for header in headers)
    return b"--b\r\nContent-Disposition: form-data; " + disposition + b"\r\n" + head + b"\r\n" + value + b"\r\n"


END = b"--b--\r\n"


@pytest.mark.parametrize(
    ("disposition", "filename"),
    [
        (b'name="file"', ""),
        (b'name="file"; filename=""', ""),
        (b"name=\"file\"; filename*=UTF-8''%E4%BC%9A%E8%AE%AE.wav", "会议.wav"),
        (b"name=\"file\"; filename*=x-unknown''%41.wav", "A.wav"),
        (b'name="file"; filename*=bare.wav', "bare.wav"),
        (b'name="file"; filename="a%0D%0AX-Injected: 1.wav"', "aX-Injected: 1.wav"),
        (b'name="file"; filename="r\xc3\xa9union.wav"', "réunion.wav"),
        (b'name="file"; filename="r\xe9union.wav"', "r\xe9union.wav"),
        (b'name="file"; filename="' + b"n" * 1000 + b'.wav"', "n" * 255),
    ],
)
def test_the_file_part_is_the_upload_whatever_its_filename(disposition: bytes, filename: str) -> None:
    form = parse(part(disposition, b"\xff\xfeRIFF audio bytes") + part(b'name="model"', b"m") + END)
    upload = form["file"]
    assert isinstance(upload, UploadFile) and upload.filename == filename
    assert asyncio.run(upload.read()) == b"\xff\xfeRIFF audio bytes"
    assert form["model"] == "m"


def test_text_fields_decode_in_their_charset_or_name_the_field() -> None:
    utf16 = part(b'name="model"', "Qwen".encode("utf-16"), b"Content-Type: text/plain; charset=utf-16")
    assert parse(utf16 + END)["model"] == "Qwen"
    with pytest.raises(APIError) as binary:
        parse(part(b'name="prompt"', b"\x80\xff") + END)
    assert (binary.value.status_code, binary.value.param, binary.value.code) == (400, "prompt", "invalid_value")
    with pytest.raises(APIError) as unknown:
        parse(part(b'name="model"', b"m", b"Content-Type: text/plain; charset=x-nope") + END)
    assert (unknown.value.status_code, unknown.value.param) == (400, "model")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (part(b'name="file"; filename="a\r\nb.wav"', b"x") + END, 400, "invalid_request"),
        (part(b'name="model"', b"m"), 400, "invalid_request"),  # no closing boundary
        (b"--b\r\nContent-Disposition: attachment\r\n\r\nx\r\n" + END, 400, "invalid_request"),
        (b"".join(part(b'name="x%d"' % i, b"y") for i in range(65)) + END, 413, "multipart_limit"),
        (part(b'name="file"; filename="' + b"n" * 5000 + b'"', b"x") + END, 413, "multipart_limit"),
    ],
    ids=["crlf-in-filename", "no-closing-boundary", "not-form-data", "too-many-parts", "header-line-over-4k"],
)
def test_malformed_forms_are_client_errors(body: bytes, status: int, code: str) -> None:
    with pytest.raises(APIError) as refused:
        parse(body)
    assert (refused.value.status_code, refused.value.code) == (status, code)


def test_an_empty_body_is_an_empty_form() -> None:
    assert parse(b"") == {}
