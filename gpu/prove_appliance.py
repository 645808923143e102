"""Prove the appliance on the lent GPU: supervisor plans, OpenAI client, disconnect abort, 429 under a burst.

Each scenario starts the real server (`python3 -m qwenasr_appliance serve`, ENGINE=vllm, dummy weights),
waits until the supervisor settles (ready, degraded or failed), records `/status` (every plan attempt with
its error), NVML VRAM, and the scenario's checks, then stops the server with SIGTERM and records its exit.

  bf16      1.7B (or --size) bf16: OpenAI client json/text, a client that disconnects mid-request
            (vLLM's running requests must drop back to 0), and a burst above the queue limit (429s with
            Retry-After, every accepted request completes, no 5xx)
  bnb       QUANT_MODE=bnb-4bit with dummy weights: vLLM's bitsandbytes loader cannot quantize dummy
            weights, so the 4-bit plan must fail and the supervisor fall back to bf16 (state degraded)
  squeeze   another process holds all but --free-gib of the GPU: the plan chain must lower
            GPU_MEMORY_UTILIZATION (or fall back to 4-bit) instead of dying

Usage on the device (vLLM and the appliance importable, a dummy model directory written beforehand):
  python3 gpu/prove_appliance.py --model DIR --scenarios bf16,bnb,squeeze --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf

from qwenasr_appliance.supervisor.probe import probe_vram

GIB = 1024**3
SETTLED = {"ready", "degraded", "failed"}


def clip(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    voice = np.sin(2 * np.pi * rng.uniform(100, 220) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    audio = (0.3 * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, audio, 16_000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def vram_used_gib() -> float | None:
    probe = probe_vram()
    return round(probe.gpus[0].used_bytes / GIB, 2) if probe.gpus else None


class Server:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        full = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", **env}
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwenasr_appliance", "serve"], env=full, stdout=self._out, stderr=subprocess.STDOUT
        )

    def settle(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status = httpx.get(self.url + "/status", timeout=5).json()
                if status["engine"]["state"] in SETTLED:
                    return status
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(2)
        return status

    def stop(self) -> dict[str, Any]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._out.close()
        return {"exit_code": code, "stop_seconds": round(time.monotonic() - started, 1)}


def transcribe_with_openai(url: str, model: str) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    started = time.monotonic()
    result = client.audio.transcriptions.create(model=model, file=("a.wav", clip(30, 1)))
    text = client.audio.transcriptions.create(model=model, file=("b.wav", clip(12, 2)), response_format="text")
    return {
        "json_chars": len(result.text),
        "text_chars": len(text),
        "seconds": round(time.monotonic() - started, 2),
        "models": [m.id for m in client.models.list().data],
    }


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def disconnect_check(url: str, model: str, clients: int = 32) -> dict[str, Any]:
    """Clients send 60 s of audio and hang up after 1.5 s: vLLM must stop working for them."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=1.5)) as client:

        async def leave(i: int) -> str:
            try:
                await client.post(
                    url + "/v1/audio/transcriptions",
                    files={"file": ("long.wav", clip(60, 100 + i), "audio/wav")},
                    data={"model": model},
                )
                return "finished"
            except httpx.ReadTimeout:
                return "left"

        outcomes = await asyncio.gather(*(leave(i) for i in range(clients)))
    running_after: list[float] = []
    for _ in range(20):
        running_after.append(metric(url, "vllm:num_requests_running"))
        if running_after[-1] == 0:
            break
        await asyncio.sleep(0.5)
    return {
        "clients": clients,
        "left": outcomes.count("left"),
        "finished_before_leaving": outcomes.count("finished"),
        "vllm_running_after": running_after,
        "cancelled_metric": metric(url, 'qwenasr_transcriptions_total{outcome="cancelled"}'),
    }


async def burst_check(url: str, model: str, requests: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=300) as client:

        async def send(i: int) -> tuple[int, str | None]:
            response = await client.post(
                url + "/v1/audio/transcriptions",
                files={"file": ("c.wav", clip(30, 1000 + i), "audio/wav")},
                data={"model": model},
            )
            return response.status_code, response.headers.get("retry-after")

        results = await asyncio.gather(*(send(i) for i in range(requests)))
    statuses = [s for s, _ in results]
    return {
        "sent": requests,
        "ok": statuses.count(200),
        "rejected_429": statuses.count(429),
        "retry_after_present": all(r is not None for s, r in results if s == 429),
        "other": sorted({s for s in statuses if s not in (200, 429)}),
        "vram_used_gib_after": vram_used_gib(),
    }


def hold_vram(free_gib: float) -> subprocess.Popen[bytes] | None:
    probe = probe_vram()
    if not probe.gpus:
        return None
    hold = max(0, probe.gpus[0].free_bytes - int(free_gib * GIB))
    code = (
        f"import torch, time; x = torch.empty({hold}, dtype=torch.uint8, device='cuda'); "
        "print('holding', x.numel(), flush=True); time.sleep(3600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()
    return proc


def run_scenario(name: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    env = {
        "ENGINE": args.engine,
        "MODEL_ID": args.model,
        "SERVED_MODEL_NAME": "qwen3-asr",
        "LOAD_FORMAT": "dummy",
        "MAX_NEW_TOKENS": "100",
        "QWENASR_BENCH_IGNORE_EOS": "1",
        "GPU_MEMORY_UTILIZATION": "0.85",
        "HF_HUB_OFFLINE": "1",
    }
    record: dict[str, Any] = {"scenario": name, "vram_before_gib": vram_used_gib()}
    hog = None
    if name == "bnb":
        env["QUANT_MODE"] = "bnb-4bit"
    if name == "bf16":
        env.update(MAX_CONCURRENT_REQUESTS="64", MAX_QUEUE_SIZE="32", QUEUE_TIMEOUT_SECONDS="120")
    if name == "squeeze":
        env["QUANT_MODE"] = "none"
        hog = hold_vram(args.free_gib)
        record["vram_held_by_other_process_gib"] = vram_used_gib()
    server = Server(env, port, args.out / f"server-{name}.log")
    started = time.monotonic()
    try:
        status = server.settle(args.settle_timeout)
        record["settle_seconds"] = round(time.monotonic() - started, 1)
        record["status"] = status
        record["vram_loaded_gib"] = vram_used_gib()
        state = status.get("engine", {}).get("state")
        if state in ("ready", "degraded"):
            record["openai"] = transcribe_with_openai(server.url, "qwen3-asr")
            if name == "bf16":
                record["disconnect"] = asyncio.run(disconnect_check(server.url, "qwen3-asr"))
                record["burst"] = asyncio.run(burst_check(server.url, "qwen3-asr", args.burst))
    except Exception as exc:  # keep the record of what happened; the table shows it
        record["error"] = repr(exc)
    finally:
        record["stop"] = server.stop()
        if hog is not None:
            hog.kill()
            hog.wait()
    return record


def summary(record: dict[str, Any]) -> str:
    engine = record.get("status", {}).get("engine", {})
    attempts = "; ".join(f"{a['plan']}={a['outcome']}" for a in engine.get("attempts", []))
    line = (
        f"{record['scenario']:8} state={engine.get('state')} plan={engine.get('plan')} attempts=[{attempts}] "
        f"settle={record.get('settle_seconds')}s vram={record.get('vram_loaded_gib')}GiB exit={record['stop']}"
    )
    if "disconnect" in record:
        d = record["disconnect"]
        line += f"\n  disconnect: left={d['left']} vllm_running_after={d['vllm_running_after'][-1]}"
    if "burst" in record:
        b = record["burst"]
        line += f"\n  burst: sent={b['sent']} ok={b['ok']} 429={b['rejected_429']} other={b['other']}"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dummy Qwen3-ASR model directory")
    parser.add_argument("--scenarios", default="bf16,bnb,squeeze")
    parser.add_argument("--out", type=Path, default=Path("prove-out"))
    parser.add_argument("--settle-timeout", type=float, default=360)
    parser.add_argument("--free-gib", type=float, default=8.0)
    parser.add_argument("--burst", type=int, default=160)
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--engine", default="vllm", help="cpu: a dry run of the script with a tiny CPU model")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, name in enumerate(args.scenarios.split(",")):
        record = run_scenario(name, args, args.port + i)
        records.append(record)
        (args.out / "prove.json").write_text(json.dumps(records, indent=2, default=str))
        print(summary(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
