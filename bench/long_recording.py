"""What the chunk length costs on a long recording: words lost or doubled at cuts, and segment times.

Builds the long recording of `tests/long_recording.py` (the held-out utterances of
`tests/fixtures/speech-en-de` in a seeded order with pauses of known length, so every word's true
place is known), then for each `CHUNK_SECONDS` value starts the appliance with the checkpoint, sends the
recording once as `response_format=verbose_json` with `temperature=0`, and reports the word error rate
against the true word sequence, the transcription time, and how far each segment's start and end lie
from the true start of its first and the true end of its last utterance.

    python -m bench.long_recording --model tests/fixtures/tiny-asr-en-de --seconds 180 \\
        --chunk-seconds 10 20 30 --out long.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile as sf
from tests.long_recording import RATE, PlacedUtterance, assemble

from bench.accuracy import SERVED_NAME, appliance, word_errors


def segment_offsets(segments: Sequence[dict[str, Any]], placed: Sequence[PlacedUtterance]) -> list[float]:
    """For each segment, the larger of |start - true start of its first utterance| and |end - true end
    of its last one| in seconds, the utterances being those that lie within the segment (0.5 s slack);
    a segment holding no utterance counts as infinitely far."""
    offsets = []
    for segment in segments:
        inside = [u for u in placed if segment["start"] - 0.5 <= u.start and u.end <= segment["end"] + 0.5]
        if not inside:
            offsets.append(float("inf"))
            continue
        offsets.append(max(abs(segment["start"] - inside[0].start), abs(segment["end"] - inside[-1].end)))
    return offsets


def measure(url: str, flac: bytes, placed: Sequence[PlacedUtterance]) -> dict[str, Any]:
    """One verbose_json transcription of the recording: WER, seconds, segment statistics."""
    started = time.perf_counter()
    reply = httpx.post(
        f"{url}/v1/audio/transcriptions",
        data={"model": SERVED_NAME, "response_format": "verbose_json", "temperature": "0"},
        files={"file": ("long.flac", flac)},
        timeout=1800,
    )
    seconds = time.perf_counter() - started
    reply.raise_for_status()
    body = reply.json()
    edits, words = word_errors(" ".join(u.text for u in placed), body["text"])
    offsets = segment_offsets(body.get("segments") or [], placed)
    finite = [o for o in offsets if o != float("inf")]
    return {
        "wer": round(edits / max(words, 1), 4),
        "word_errors": edits,
        "words": words,
        "seconds": round(seconds, 2),
        "truncated": reply.headers.get("x-transcript-truncated"),
        "segments": len(offsets),
        "segments_without_speech": len(offsets) - len(finite),
        "segment_offset_p50_s": round(statistics.median(finite), 3) if finite else None,
        "segment_offset_max_s": round(max(finite), 3) if finite else None,
        "text": body["text"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--engine", choices=("cpu", "vllm"), default="cpu")
    parser.add_argument("--seconds", type=float, default=180.0, help="length of the recording")
    parser.add_argument("--chunk-seconds", type=float, nargs="+", default=[30.0])
    parser.add_argument("--max-new-tokens", type=int, default=640, help="MAX_NEW_TOKENS for the server")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    samples, placed = assemble(args.seconds)
    buffer = io.BytesIO()
    sf.write(buffer, np.round(samples * 32767).astype(np.int16), RATE, format="FLAC")
    runs = []
    for chunk in args.chunk_seconds:
        settings = {"CHUNK_SECONDS": f"{chunk:g}", "MAX_NEW_TOKENS": str(args.max_new_tokens), "CPU_THREADS": "1"}
        log_path = args.out.with_suffix(f".chunk{chunk:g}.server.log")
        with appliance(args.model, args.engine, log_path, args.ready_timeout, settings) as (url, _):
            run = {"chunk_seconds": chunk, **measure(url, buffer.getvalue(), placed)}
        runs.append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "text"}), flush=True)
    report = {"engine": args.engine, "model": str(args.model), "recording_seconds": round(samples.size / RATE, 1),
              "utterances": len(placed), "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
