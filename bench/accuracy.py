"""Held-out transcripts of a checkpoint through the whole appliance: HTTP, decoding, the engine, parsing.

Starts `python -m qwenasr_appliance serve` on 127.0.0.1 with the given model and engine, waits for
`/ready`, then sends every clip of a held-out set (a folder with `manifest.json`: a list of
`{"file", "text", "language", ...}`) as `response_format=verbose_json`, `temperature=0` (greedy), once
detected and once streamed, and writes what came back with the word error rate per language.

Run it for the CPU engine here and for the vLLM engine on the GPU machine, then compare the two files
(`--compare A.json B.json`): the same checkpoint must give the same words through both engines.

    python -m bench.accuracy --model tests/fixtures/tiny-asr-en-de --clips tests/fixtures/speech-en-de \\
        --engine cpu --out cpu.json
    python -m bench.accuracy --compare cpu.json vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

SERVED_NAME = "heldout"


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edits, reference words): the word-level Levenshtein distance, case and punctuation folded."""
    ref = _words(reference)
    hyp = _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1], len(ref)


def _words(text: str) -> list[str]:
    kept = "".join(c.lower() if c.isalnum() or c.isspace() or c == "'" else " " for c in text)
    return kept.split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the appliance exited with {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"the appliance was not ready within {timeout:.0f} s")


@contextmanager
def appliance(
    model: Path, engine: str, log_path: Path, ready_timeout: float, settings: Mapping[str, str] | None = None
) -> Iterator[tuple[str, float]]:
    """`python -m qwenasr_appliance serve` on a free port of 127.0.0.1 serving `model` as `SERVED_NAME`
    with `engine` and extra `settings` (environment variables): yields (base URL, seconds to /ready).
    The server's output goes to `log_path` (a start-up that never gets ready says why there); it is
    stopped with SIGTERM (SIGKILL after 60 s) on exit. Raises SystemExit when it is not ready in time."""
    port = _free_port()
    env = {
        **os.environ,
        "MODEL_ID": str(model.resolve()),
        "SERVED_MODEL_NAME": SERVED_NAME,
        "ENGINE": engine,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "warning",
        **(settings or {}),
    }
    if engine == "vllm":
        env.setdefault("GPU_MEMORY_UTILIZATION", "0.3")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "qwenasr_appliance", "serve"], env=env, stdout=server_log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            _wait_ready(url, server, ready_timeout)
            yield url, time.perf_counter() - started
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()


def _streamed_text(client: httpx.Client, url: str, audio: bytes, name: str) -> tuple[str, str]:
    """(joined deltas, done text) of one streamed transcription."""
    deltas: list[str] = []
    done = ""
    data = {"model": SERVED_NAME, "stream": "true", "temperature": "0"}
    with client.stream("POST", f"{url}/v1/audio/transcriptions", data=data, files={"file": (name, audio)}) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[len("data: ") :])
            if event["type"] == "transcript.text.delta":
                deltas.append(event["delta"])
            elif event["type"] == "transcript.text.done":
                done = event["text"]
    return "".join(deltas), done


def transcribe_all(url: str, clips: Path) -> list[dict[str, Any]]:
    manifest = json.loads((clips / "manifest.json").read_text(encoding="utf-8"))
    results: list[dict[str, Any]] = []
    with httpx.Client(timeout=120) as client:
        for item in manifest:
            audio = (clips / item["file"]).read_bytes()
            started = time.perf_counter()
            reply = client.post(
                f"{url}/v1/audio/transcriptions",
                data={"model": SERVED_NAME, "response_format": "verbose_json", "temperature": "0"},
                files={"file": (item["file"], audio)},
            )
            seconds = time.perf_counter() - started
            reply.raise_for_status()
            body = reply.json()
            deltas, done = _streamed_text(client, url, audio, item["file"])
            edits, words = word_errors(item["text"], body["text"])
            results.append(
                {
                    "file": item["file"],
                    "reference": item["text"],
                    "language": item["language"],
                    "text": body["text"],
                    "detected_language": body["language"],
                    "streamed_deltas": deltas,
                    "streamed_done": done,
                    "edits": edits,
                    "words": words,
                    "seconds": round(seconds, 3),
                }
            )
    return results


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_language: dict[str, list[int]] = {}
    for result in results:
        totals = by_language.setdefault(str(result["language"]).lower(), [0, 0, 0])
        totals[0] += int(result["edits"])
        totals[1] += int(result["words"])
        totals[2] += str(result["detected_language"]).lower() == str(result["language"]).lower()
    edits = sum(int(r["edits"]) for r in results)
    words = sum(int(r["words"]) for r in results)
    return {
        "utterances": len(results),
        "wer": round(edits / max(words, 1), 4),
        "per_language": {
            language: {
                "wer": round(e / max(w, 1), 4),
                "language_correct": f"{c}/{sum(1 for r in results if str(r['language']).lower() == language)}",
            }
            for language, (e, w, c) in sorted(by_language.items())
        },
        "stream_matches_done": sum(r["streamed_deltas"] == r["streamed_done"] for r in results),
    }


def compare(first: Path, second: Path) -> int:
    a = {r["file"]: r for r in json.loads(first.read_text())["results"]}
    b = {r["file"]: r for r in json.loads(second.read_text())["results"]}
    differ = [
        name
        for name in sorted(a)
        if name in b
        and (a[name]["text"], a[name]["detected_language"]) != (b[name]["text"], b[name]["detected_language"])
    ]
    for name in differ:
        print(
            f"{name}: {a[name]['detected_language']} {a[name]['text']!r} != {b[name]['detected_language']} {b[name]['text']!r}"
        )
    print(f"{len(a) - len(differ)} of {len(a)} held-out utterances identical (text and language)")
    return 0 if not differ else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint directory")
    parser.add_argument("--clips", type=Path, help="held-out folder with manifest.json")
    parser.add_argument("--engine", choices=("cpu", "vllm"), default="cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not (args.model and args.clips and args.out):
        parser.error("--model, --clips and --out are needed (or --compare A B)")
    log_path = args.out.with_suffix(".server.log")
    with appliance(args.model, args.engine, log_path, args.ready_timeout) as (url, ready_seconds):
        status = httpx.get(f"{url}/status", timeout=5).json()
        results = transcribe_all(url, args.clips)
    summary = summarize(results)
    report = {
        "engine": args.engine,
        "plan": status.get("engine", {}).get("plan"),
        "engine_status": status.get("engine", {}).get("engine"),
        "ready_seconds": round(ready_seconds, 1),
        "summary": summary,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps({"engine": args.engine, "ready_seconds": report["ready_seconds"], **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
