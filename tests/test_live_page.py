"""The built-in try-it page (`/live`, LIVE_PAGE=true) in headless Chromium, driven over the DevTools
protocol: a fake microphone fed from a WAV file of real speech, and a file chosen in the page; the text
arrives from the test double engine ("w1 w2 ... wK" for K = 2 x the turn's seconds).

Needs Debian's `chromium` (`apt-get install -y chromium`); skipped with that message where it is missing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
import websockets

from tests.realtime_support import silence, speech
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

KEY = "browser-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
TRANSCRIPT = re.compile(r"^w1( w\d+)*$")


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"LIVE_PAGE": "true", "API_KEYS": KEY, "DOUBLE_WORDS_PER_SECOND": "2", "DECODE_WORKERS": "1"}
    process = ServerProcess.with_test_double(env, tmp_path_factory.mktemp("page") / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JFK's sentence then 2 s of silence (so server VAD ends the turn), 48 kHz 16-bit as a microphone gives."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    samples = np.concatenate([silence(0.5, 48_000), speech("sb_spk1_snt1.wav", 48_000), silence(2.0, 48_000)])
    sf.write(path, samples, 48_000, subtype="PCM_16")
    return path


class DevTools:
    """The smallest DevTools-protocol client: one page target, commands awaited by id."""

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self._socket.recv(), 30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")


def launch(user_data: Path, wav: Path) -> tuple[subprocess.Popen[bytes], int]:
    assert CHROMIUM is not None
    argv = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        "--remote-debugging-port=0", f"--user-data-dir={user_data}", "about:blank",
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = user_data / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("Chromium did not start its DevTools endpoint")
        time.sleep(0.1)
    return process, int(port_file.read_text().split()[0])


async def finals(devtools: DevTools, timeout: float) -> list[str]:  # noqa: ASYNC109
    """The page's final transcripts once at least one has arrived (or [] after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = await devtools.evaluate("[...document.querySelectorAll('#transcript p.final')].map(p => p.textContent)")
        if texts:
            return list(texts)
        await asyncio.sleep(0.25)
    return []


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)")
def test_the_page_transcribes_a_microphone_and_a_file(
    page_server: ServerProcess, speech_wav: Path, tmp_path: Path
) -> None:
    assert httpx.get(page_server.url + "/live", timeout=10).headers["content-type"].startswith("text/html")
    browser, port = launch(tmp_path / "profile", speech_wav)
    try:
        target = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page_url = next(t["webSocketDebuggerUrl"] for t in target if t["type"] == "page")

        async def scenario() -> tuple[list[str], list[str], str]:
            async with websockets.connect(page_url, max_size=None) as socket:
                devtools = DevTools(socket)
                await devtools.call("Page.enable")
                await devtools.call("Runtime.enable")
                # Microphone: the key goes in through the page, as a person types it.
                await devtools.call("Page.navigate", url=page_server.url + "/live")
                await asyncio.sleep(1.0)
                await devtools.evaluate(
                    f"document.getElementById('key').value = '{KEY}'; document.getElementById('mic').click(); true"
                )
                heard = await finals(devtools, 40)
                status = str(
                    await devtools.evaluate(
                        "document.getElementById('status').textContent + ' ' + document.getElementById('log').textContent"
                    )
                )
                # A file chosen in the page, streamed in real time.
                await devtools.call("Page.navigate", url=page_server.url + "/live")
                await asyncio.sleep(1.0)
                await devtools.evaluate(f"document.getElementById('key').value = '{KEY}'; true")
                document = await devtools.call("DOM.getDocument")
                node = await devtools.call("DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#file")
                await devtools.call("DOM.setFileInputFiles", files=[str(speech_wav)], nodeId=node["nodeId"])
                played = await finals(devtools, 40)
                return heard, played, status

        heard, played, status = asyncio.run(scenario())
    finally:
        browser.kill()
        browser.wait(10)
    assert heard, f"no transcript from the microphone; page status: {status}"
    assert all(TRANSCRIPT.match(text) for text in heard), heard
    assert played and all(TRANSCRIPT.match(text) for text in played), played
    # JFK's 2.9 s sentence: a turn of about 3-4 s with padding and the silence rule, so w1 ... w6-w8.
    assert any(5 <= len(text.split()) <= 9 for text in played), played


def test_the_page_is_off_by_default(tmp_path: Path) -> None:
    process = ServerProcess.with_test_double({"DECODE_WORKERS": "1"}, tmp_path / "server.log")
    try:
        process.wait_until("/ready", timeout=60)
        assert httpx.get(process.url + "/live", timeout=10).status_code == 404
    finally:
        process.stop()
