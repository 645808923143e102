"""Helpers shared by the hardening tests (bad input, fuzzing, overload, faults, slow clients)."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf

MODEL = "Qwen/Qwen3-ASR-1.7B"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
ERROR_FIELDS = {"message", "type", "param", "code"}


def tone_wav(seconds: float = 1.0, rate: int = 16_000, channels: int = 1) -> bytes:
    """A PCM-16 WAV of a modulated tone (not silent, so it reaches the engine)."""
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    data = np.stack([signal] * channels, axis=1) if channels > 1 else signal
    out = io.BytesIO()
    sf.write(out, data.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def error_of(response: httpx.Response) -> dict[str, object]:
    """The `error` object of an OpenAI-shaped error response (asserting the shape)."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_FIELDS, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert error["code"] is None or isinstance(error["code"], str), body
    assert len(error["message"]) < 2000, "error messages must not echo unbounded input"
    return dict(error)


def transcribe(url: str, audio: bytes | None = None, *, timeout: float = 30.0, **fields: str) -> httpx.Response:
    files = {"file": ("clip.wav", tone_wav() if audio is None else audio, "audio/wav")}
    return httpx.post(url + TRANSCRIPTIONS, files=files, data={"model": MODEL, **fields}, timeout=timeout)


def assert_still_serves(url: str) -> None:
    """The server answers a good transcription after whatever came before."""
    response = transcribe(url)
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("chunk of 1.0 seconds")


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hardening-boundary") -> bytes:
    """A multipart/form-data body from (name, filename or None, value) parts."""
    out = bytearray()
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def worker_pids(server_pid: int) -> list[int]:
    """The granian worker processes of a server (its children), from /proc."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def rss_bytes(pid: int) -> int:
    """VmRSS of a process from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Read until the peer closes the connection (or `within` seconds pass); returns (data, seconds)."""
    started = time.monotonic()
    data = b""
    sock.settimeout(0.25)
    while time.monotonic() - started < within:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - started


def metric_value(text: str, sample: str) -> float:
    """The value of one Prometheus sample line (`name{labels}`), 0 when absent."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
