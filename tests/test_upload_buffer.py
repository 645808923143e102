"""UPLOAD_BUFFER_BYTES: the bytes of uploads the server holds at once are bounded, and an upload that
does not fit is refused with 429 and Retry-After before its body is read (api/upload_buffer.py).

Against a real server (the appliance's granian configuration around the test double engine): two slow
transcriptions hold most of the budget; a third upload is refused at once whether it states its length
or arrives chunked; once the two are done the bytes are given back and uploads are served again. The
automatic limit and the memory readings behind it are unit-tested below."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from qwenasr_appliance.config import ConfigError, load_settings, upload_buffer_limit
from qwenasr_appliance.memory import cgroup_memory_limit
from tests.hardening import MODEL, TRANSCRIPTIONS, metric_value, multipart, read_until_closed, tone_wav

BUFFER = 250_000
CLIP = tone_wav(3.0)  # about 96 kB: two fit in BUFFER, three do not
TOKEN_DELAY = 1.0  # the double's few tokens for a 3 s clip take about 4-5 s: the refusals all come well within


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.servers import ServerProcess

    env = {
        "MAX_UPLOAD_BYTES": "200000",
        "UPLOAD_BUFFER_BYTES": str(BUFFER),
        "DOUBLE_TOKEN_DELAY": str(TOKEN_DELAY),
        "MAX_CONCURRENT_REQUESTS": "4",
        "LOG_LEVEL": "info",
    }
    process = ServerProcess.product_with_test_double(env, tmp_path_factory.mktemp("upload-buffer") / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        assert process.stop() == 0


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=5).text


def _head(length: int | None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST {TRANSCRIPTIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=hardening-boundary\r\n" + size + "\r\n"
    ).encode()


@pytest.mark.slow
def test_uploads_past_the_buffer_get_429_before_their_body_then_are_served_again(server: object) -> None:
    url: str = server.url  # type: ignore[attr-defined]
    port: int = server.port  # type: ignore[attr-defined]
    body = multipart([("model", None, MODEL.encode()), ("file", "a.wav", CLIP)])

    async def scenario() -> dict[str, object]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            holding = [
                asyncio.create_task(client.post(TRANSCRIPTIONS, files={"file": ("a.wav", CLIP)}, data={"model": MODEL}))
                for _ in range(2)
            ]
            deadline = time.monotonic() + 10
            while metric_value(await asyncio.to_thread(_metrics, url), "qwenasr_upload_buffer_bytes") < 2 * len(CLIP):
                assert time.monotonic() < deadline, "the two uploads were never held"
                await asyncio.sleep(0.05)
            # The refused body is read and dropped (a client still sending would otherwise see a reset),
            # and the connection stays usable.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(_head(len(body)) + body)
                stated, _ = await asyncio.to_thread(read_until_closed, sock, 1)
            stated_client = await client.post(TRANSCRIPTIONS, files={"file": ("a.wav", CLIP)}, data={"model": MODEL})

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(body), 16_384):
                    yield body[start : start + 16_384]
                    await asyncio.sleep(0.01)

            chunked = await client.post(
                TRANSCRIPTIONS,
                content=chunks(),
                headers={"Content-Type": "multipart/form-data; boundary=hardening-boundary"},
            )
            during = await asyncio.to_thread(_metrics, url)
            held = await asyncio.gather(*holding)
            after = await client.post(TRANSCRIPTIONS, files={"file": ("a.wav", CLIP)}, data={"model": MODEL})
        return {
            "stated": stated,
            "stated_client": stated_client,
            "chunked": chunked,
            "held": held,
            "after": after,
            "during": during,
        }

    result = asyncio.run(scenario())
    stated = result["stated"]
    assert isinstance(stated, bytes) and stated.startswith(b"HTTP/1.1 429"), stated[:300]
    assert b"retry-after: 5" in stated.lower() and b'"code":"server_overloaded"' in stated
    assert b"connection: close" not in stated.lower()  # the body was read: the connection can go on
    stated_client = result["stated_client"]
    assert isinstance(stated_client, httpx.Response) and stated_client.status_code == 429, stated_client.text
    chunked = result["chunked"]
    assert isinstance(chunked, httpx.Response) and chunked.status_code == 429, chunked.text
    assert chunked.json()["error"]["type"] == "rate_limit_error" and chunked.headers["retry-after"] == "5"
    for response in result["held"]:  # type: ignore[attr-defined]
        assert response.status_code == 200, response.text
    after = result["after"]
    assert isinstance(after, httpx.Response) and after.status_code == 200, after.text
    during = str(result["during"])
    assert metric_value(during, 'qwenasr_requests_rejected_total{reason="upload_buffer_full"}') == 3
    assert metric_value(during, "qwenasr_upload_buffer_limit_bytes") == BUFFER
    final = _metrics(url)
    assert metric_value(final, "qwenasr_upload_buffer_bytes") == 0  # every byte given back
    assert metric_value(final, 'qwenasr_transcriptions_total{outcome="rejected"}') >= 3


def test_the_automatic_limit_is_a_quarter_of_memory_with_room_for_four_uploads() -> None:
    settings = load_settings({"MAX_UPLOAD_BYTES": "26214400"})
    assert upload_buffer_limit(settings, 24 * 2**30) == 6 * 2**30
    assert upload_buffer_limit(settings, 2**28) == 4 * 26214400  # small container: four largest uploads
    assert upload_buffer_limit(settings, None) == 4 * 26214400
    explicit = load_settings({"UPLOAD_BUFFER_BYTES": "30000000"})
    assert upload_buffer_limit(explicit, 24 * 2**30) == 30_000_000


def test_a_buffer_smaller_than_the_largest_upload_is_refused() -> None:
    with pytest.raises(ConfigError, match="UPLOAD_BUFFER_BYTES"):
        load_settings({"MAX_UPLOAD_BYTES": "2000000", "UPLOAD_BUFFER_BYTES": "1000000"})


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "own", "expected"),
    [
        ({"cgroup.controllers": "memory", "memory.max": "max"}, "/", None),
        ({"cgroup.controllers": "memory", "memory.max": "25769803776\n"}, "/", 24 * 2**30),
        # The smallest limit from the process' own cgroup up to the root applies.
        (
            {"cgroup.controllers": "", "memory.max": "max", "pod/memory.max": "8589934592", "pod/c/memory.max": "max"},
            "/pod/c",
            8 * 2**30,
        ),
        ({"cgroup.controllers": "", "memory.max": "garbage"}, "/", None),
        ({"memory/memory.limit_in_bytes": "9223372036854771712"}, "/", None),  # v1: no limit
        ({"memory/memory.limit_in_bytes": "4294967296"}, "/", 4 * 2**30),
        ({}, "/", None),
    ],
    ids=["v2-max", "v2-limit", "v2-ancestor", "v2-malformed", "v1-unlimited", "v1-limit", "none"],
)
def test_the_cgroup_memory_limit_is_read_like_the_cpu_quota(
    tmp_path: Path, files: dict[str, str], own: str, expected: int | None
) -> None:
    assert cgroup_memory_limit(_cgroup(tmp_path, files), own) == expected
