"""`helm test` check: transcribe the bundled clip through the Service and check the answer's shape.

Standard library only (it runs in a stock python:alpine image). Environment: BASE_URL, API_KEY (the
first of a comma-separated list is used; empty = no auth), EXPECT_SUBSTRING, TIMEOUT_SECONDS, CLIP.
"""

# ruff: noqa: S310 - the URLs are the in-cluster Service (http), built from BASE_URL

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import NoReturn

BASE_URL = os.environ["BASE_URL"].rstrip("/")
API_KEY = os.environ.get("API_KEY", "").split(",")[0].strip()
EXPECT = os.environ.get("EXPECT_SUBSTRING", "").strip().lower()
TIMEOUT = float(os.environ.get("TIMEOUT_SECONDS", "120"))
CLIP = os.environ.get("CLIP", "/test/test-clip.wav")
AUTH = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}


def fail(message: str) -> NoReturn:
    print(f"FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def call(request: urllib.request.Request, deadline: float) -> tuple[int, bytes]:
    """Send the request, retrying while the server says it is busy or still loading (429/503)."""
    while True:
        try:
            with urllib.request.urlopen(request, timeout=max(1.0, deadline - time.monotonic())) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            if error.code in (429, 503) and time.monotonic() + 5 < deadline:
                print(f"{request.full_url}: {error.code}, retrying", flush=True)
                time.sleep(5)
                continue
            return error.code, error.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if time.monotonic() + 5 < deadline:
                print(f"{request.full_url}: {error}, retrying", flush=True)
                time.sleep(5)
                continue
            fail(f"{request.full_url}: {error}")


def multipart(fields: dict[str, str], file_field: str, filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def main() -> None:
    deadline = time.monotonic() + TIMEOUT

    status, body = call(urllib.request.Request(f"{BASE_URL}/v1/models", headers=AUTH), deadline)
    if status != 200:
        fail(f"GET /v1/models answered {status}: {body[:500]!r}")
    models = json.loads(body)
    if models.get("object") != "list" or not models.get("data"):
        fail(f"GET /v1/models: unexpected body {models!r}")
    model = models["data"][0]["id"]
    print(f"model: {model}", flush=True)

    with open(CLIP, "rb") as clip:
        audio = clip.read()
    data, content_type = multipart({"model": model, "response_format": "json"}, "file", "test-clip.wav", audio)
    request = urllib.request.Request(
        f"{BASE_URL}/v1/audio/transcriptions",
        data=data,
        headers={**AUTH, "Content-Type": content_type},
        method="POST",
    )
    status, body = call(request, deadline)
    if status != 200:
        fail(f"POST /v1/audio/transcriptions answered {status}: {body[:500]!r}")
    answer = json.loads(body)
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
        fail(f"the answer has no string 'text': {answer!r}")
    text = answer["text"].strip()
    if not text:
        fail("the transcript is empty")
    if EXPECT and EXPECT not in text.lower():
        fail(f"the transcript {text!r} does not contain {EXPECT!r}")
    print(f"ok: {text!r}", flush=True)


if __name__ == "__main__":
    main()
