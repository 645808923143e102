"""Fuzzing the raw multipart body and the request headers (issue 12), not only the schema's fields:
hypothesis builds requests byte by byte (part headers of any shape: no, empty or RFC 5987 filenames,
CR/LF/NUL and non-UTF-8 bytes, odd charsets and content types, nested multipart; binary text fields;
duplicate, missing and reordered parts; boundary and Content-Type variants; then byte flips, insertions,
deletions and cuts of the whole body) and sends them over a raw socket to a real server process (the
appliance's granian configuration around the test double engine) on 127.0.0.1.

Property: every request gets a whole HTTP/1.1 answer below 500; a 4xx is an OpenAI-shaped error; a 200
holds a transcript. Afterwards the server still serves, and its log holds no traceback, no unhandled
error and no byte of any request body (every body carries a marker). Bounded: FUZZ_MULTIPART_EXAMPLES
derandomized examples (default 300, about 10 s on 2 cores), no deadline, connection and read timeouts.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening import ERROR_FIELDS, MODEL, TRANSCRIPTIONS, assert_still_serves, tone_wav
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FUZZ_MULTIPART_EXAMPLES", "300"))
MARKER = b"FUZZ-BODY-MARKER"
WAV = tone_wav(0.5)
STATUSES: Counter[int] = Counter()
CODES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz-multipart") / "server.log"
    env = {"MAX_CONCURRENT_REQUESTS": "4", "LOG_LEVEL": "info", "MAX_UPLOAD_BYTES": str(1024 * 1024)}
    process = ServerProcess.product_with_test_double(env, log)
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        assert process.stop() == 0
        logs = process.logs()
        assert "Traceback" not in logs
        assert "request.unhandled_error" not in logs
        assert MARKER.decode() not in logs, "a request body reached the log"


# --------------------------------------------------------------------------- request strategies

_nasty_text = st.sampled_from(
    [b"", b"a.wav", b"\xe9t\xe9.wav", b"a\r\nb.wav", b"a\rb", b"a\nb", b"a\x00b.wav", b'a"b.wav', b"a\\b.wav",
     b"%0D%0A.wav", b"../../etc/passwd", b"x" * 5000, b"\xff\xfe\xfd", "会议.wav".encode()]
)  # fmt: skip
_charsets = st.sampled_from([b"utf-8", b"utf-16", b"latin-1", b"x-unknown", b"", b'"utf-8"', b"ascii", b"utf-32"])
_content_types = st.sampled_from(
    [
        None,
        b"audio/wav",
        b"application/octet-stream",
        b"text/plain",
        b"multipart/mixed; boundary=inner",
        b"\xff/\xfe",
        b"",
    ]
)


@st.composite
def _disposition(draw: st.DrawFn, name: bytes) -> bytes:
    params = [b'name="' + name + b'"']
    kind = draw(st.sampled_from(["none"] * 4 + ["plain", "empty", "star", "both", "raw"]))
    value = draw(_nasty_text)
    if kind in ("plain", "both"):
        params.append(b'filename="' + value + b'"')
    if kind == "empty":
        params.append(b'filename=""')
    if kind in ("star", "both"):
        params.append(b"filename*=UTF-8''" + value.replace(b" ", b"%20"))
    if kind == "raw":
        params.append(b"filename=" + value)
    if draw(st.booleans()):
        params = draw(st.permutations(params))
    disposition = draw(st.sampled_from([b"form-data"] * 15 + [b"attachment", b"FORM-DATA", b""]))
    return disposition + b"; " + b"; ".join(params)


@st.composite
def _part(draw: st.DrawFn, name: bytes, value: bytes) -> bytes:
    headers = [b"Content-Disposition: " + draw(_disposition(name))]
    content_type = draw(_content_types)
    if content_type is not None:
        charset = draw(st.one_of(st.none(), _charsets))
        headers.append(b"Content-Type: " + content_type + (b"; charset=" + charset if charset is not None else b""))
    headers += draw(
        st.lists(st.sampled_from([b"X-A: \xff\xfe", b"Content-Transfer-Encoding: base64", b"X-B: 1"]), max_size=3)
    )
    return b"\r\n".join(headers) + b"\r\n\r\n" + value


@st.composite
def _body(draw: st.DrawFn, boundary: bytes) -> bytes:
    model = draw(st.sampled_from([MODEL.encode()] * 4 + [MODEL.encode("utf-16"), b"\xff" + MARKER, b""]))
    audio = draw(
        st.sampled_from([WAV] * 3 + [WAV[: len(WAV) // 2], MARKER * 20, b"", b"--" + boundary + b"\r\n" + WAV])
    )
    parts = [draw(_part(b"model", model)), draw(_part(b"file", audio))]
    extra = draw(st.lists(st.tuples(st.sampled_from([b"language", b"prompt", b"stream", b"blob", b"file", b"\xff"]),
                                    st.binary(max_size=64).map(lambda b: b + MARKER)), max_size=3))  # fmt: skip
    parts += [draw(_part(name, value)) for name, value in extra]
    parts = draw(st.permutations(parts))
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):  # byte-level damage
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        if action == "flip":
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
        elif action == "insert":
            body = body[:at] + draw(st.sampled_from([b"\r\n", b"--", b"\x00", boundary, b'"', b";"])) + body[at:]
        elif action == "delete":
            body = body[:at] + body[at + draw(st.integers(1, 16)) :]
        else:
            body = body[:at]
    return body


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    boundary = draw(st.sampled_from([b"fuzz"] * 4 + [b"a" * 70, b"a" * 2000, b"--", b"x y", b"\xe9"]))
    body = draw(_body(boundary))
    quoted = draw(st.booleans())
    shown = b'"' + boundary + b'"' if quoted else boundary
    content_type = draw(
        st.sampled_from(
            [b"multipart/form-data; boundary=" + shown] * 4 + [b"Multipart/Form-Data;boundary=" + shown,
             b"multipart/form-data; charset=x-unknown; boundary=" + shown, b"multipart/form-data",
             b"multipart/form-data; boundary=" + shown + b"; boundary=other", b"multipart/mixed; boundary=" + shown]
        )
    )  # fmt: skip
    headers = [b"Host: 127.0.0.1", b"Connection: close", b"Content-Type: " + content_type]
    headers += draw(
        st.lists(
            st.sampled_from([b"X-Request-ID: \xff\xfe", b"X-Request-ID: " + b"r" * 300, b"Accept-Charset: x-unknown",
                             b"Content-Type: text/plain", b"Accept: */*", b"Expect: 100-continue", b"X-\xff: 1"]),
            max_size=3,
        )
    )  # fmt: skip
    headers.append(b"Content-Length: %d" % len(body))
    return b"POST " + TRANSCRIPTIONS.encode() + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body


def exchange(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send `request` and read the whole answer (the server closes: `Connection: close`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the final one follows
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 "), answer[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        assert len(body) == int(headers[b"content-length"]), "a truncated answer"
    return int(lines[0].split()[1]), headers, body


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _valid_head(head: bytes) -> bool:
    return all(_TOKEN.fullmatch(line.partition(b":")[0]) for line in head.split(b"\r\n")[1:])


@given(request=requests())
@settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_raw_multipart_requests_never_get_a_5xx(server: ServerProcess, request: bytes) -> None:
    status, headers, body = exchange(server.port, request)
    STATUSES[status] += 1
    head = request.partition(b"\r\n\r\n")[0]
    assert status < 500, (head[:1000], body[:500])
    if status == 200:
        assert json.loads(body)["text"].startswith("chunk of")
    elif status == 400 and not _valid_head(head):
        assert body == b""  # granian refuses a head that is not HTTP (a header name that is not a token)
    else:
        assert headers.get(b"content-type", b"").startswith(b"application/json"), (status, headers, head[:1000])
        error = json.loads(body)["error"]
        assert set(error) == ERROR_FIELDS and error["message"], body[:500]
        assert body.count(MARKER) <= 1, "an answer echoed more than a clipped field value"
        CODES[f"{status} {error['code']}"] += 1


def test_the_server_still_serves_after_the_fuzzing(server: ServerProcess) -> None:
    print(f"raw multipart fuzzing: {sum(STATUSES.values())} requests, statuses {dict(sorted(STATUSES.items()))}")
    print(f"error codes: {dict(CODES.most_common())}")
    assert 200 in STATUSES and 400 in STATUSES, STATUSES  # the fuzzing reached both the decoder and the checks
    assert_still_serves(server.url)
