"""Smoke test of the GPU forced aligner (`aligner.vllm.VLLMAligner`) on the lent GPU machine.

Phases (in order, each optional through --phases):

  aligner   vLLM's Qwen3ASRForcedAlignerForTokenClassification on a tiny aligner checkpoint with real
            weights (tests/tiny_aligner.py, GPU head sizes; build it where qwen-asr is installed with
            `python -m tests.tiny_aligner DIR gpu`): load, warm-up, concurrent alignments of 3/12/30 s,
            Chinese characters, the rows vLLM returns per request (STEP pooling: one per timestamp slot),
            the 180 s limit, close
  together  the engine supervisor with the real VLLMEngine (0.6B architecture, dummy weights) and the
            aligner beside it: both plans and their GPU shares, vLLM's Prometheus metrics still present
            after the aligner loaded, then TranscriptionService with word timestamps on 45 s of audio

Usage (repository root on the device, vLLM and the appliance importable):

  python3 gpu/smoke_aligner.py --aligner DIR --writer PATH/make_dummy_qwen3_asr.py \\
      [--tokenizer-dir DIR] [--phases aligner,together] [--out $OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import itertools
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("QWENASR_BENCH_IGNORE_EOS", "1")  # dummy ASR weights rarely emit EOS
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from qwenasr_appliance.aligner.base import AlignerRequestError
from qwenasr_appliance.aligner.text import split_units
from qwenasr_appliance.aligner.vllm import VLLMAligner
from qwenasr_appliance.config import Settings
from qwenasr_appliance.supervisor.plans import Plan

SR = 16_000
TEXT = "And so, my fellow Americans: ask not what your country can do for you, ask what you can do."
RESULTS: dict[str, Any] = {}


def noise(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * SR)) * 0.1).astype(np.float32)


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke_aligner.json").write_text(json.dumps(RESULTS, indent=2, default=str))


async def phase_aligner(args: argparse.Namespace) -> None:
    settings = Settings(aligner_model_id=args.aligner, max_new_tokens=64)
    plan = Plan("aligner-vllm-bf16", "vllm", "bfloat16", None, 0.10, "smoke")
    aligner = VLLMAligner(settings, plan)
    rows_seen: list[list[int]] = []
    units_fn = aligner._units

    def spy(units: list[str], rows: Any, token_ids: list[int]) -> Any:
        rows_seen.append([*list(rows.shape), len(token_ids), len(units)])
        return units_fn(units, rows, token_ids)

    aligner._units = spy  # type: ignore[method-assign]
    began = time.monotonic()
    await aligner.load()
    result: dict[str, Any] = {"load_seconds": round(time.monotonic() - began, 1), "args": aligner.engine_args}
    result["describe"] = aligner.describe().__dict__
    began = time.monotonic()
    outputs = await asyncio.gather(*(aligner.align(noise(s, i), TEXT, "English") for i, s in enumerate((3, 12, 30))))
    result["concurrent_seconds"] = round(time.monotonic() - began, 3)
    expected = split_units(TEXT, "English")
    for seconds, units in zip((3, 12, 30), outputs, strict=True):
        assert [u.text for u in units] == expected, units
        assert all(a.start <= b.start and u.start <= u.end for a, b, u in zip(units, units[1:], units, strict=False))
        result[f"units_{seconds}s"] = [(u.text, u.start, u.end) for u in units]
    chinese = await aligner.align(noise(5, 9), "你好世界\uff0c今天天气很好\u3002", "Chinese")
    assert [u.text for u in chinese] == list("你好世界今天天气很好"), chinese
    result["chinese"] = [(u.text, u.start, u.end) for u in chinese]
    result["rows_per_request"] = rows_seen  # [rows, classes, prompt tokens, units]
    try:
        await aligner.align(noise(181, 1), "x", "English")
        result["limit"] = "NOT ENFORCED"
    except AlignerRequestError as exc:
        result["limit"] = str(exc)
    await aligner.close()
    RESULTS["aligner"] = result


async def phase_together(args: argparse.Namespace, workdir: Path) -> None:
    from prometheus_client import REGISTRY

    from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
    from qwenasr_appliance.transcription.admission import AdmissionController
    from qwenasr_appliance.transcription.pipeline import RequestStats, TranscriptionRequest, TranscriptionService

    spec = importlib.util.spec_from_file_location("make_dummy_qwen3_asr", args.writer)
    assert spec and spec.loader
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    model = workdir / "dummy-0.6b"
    writer.main(str(model), "0.6b", args.tokenizer_dir)
    settings = Settings(
        model_id=str(model), load_format="dummy", engine="vllm", quant_mode="none", enforce_eager=True,
        max_new_tokens=24, max_num_seqs=32, aligner_model_id=args.aligner,
    )  # fmt: skip
    supervisor = EngineSupervisor(settings, cpu_available=False)
    result: dict[str, Any] = {}
    began = time.monotonic()
    await supervisor.start()
    try:
        assert await supervisor.wait_ready(420), supervisor.snapshot()
        result["asr_ready_seconds"] = round(time.monotonic() - began, 1)
        for _ in range(900):  # the aligner loads after the model (no event to wait on from outside)
            if supervisor.aligner.state not in ("waiting", "loading"):
                break
            await asyncio.sleep(0.5)
        result["aligner_ready_seconds"] = round(time.monotonic() - began, 1)
        snapshot = supervisor.snapshot()
        result["plan"] = snapshot.plan
        result["chain"] = [(p.name, p.gpu_memory_utilization, p.reason) for p in snapshot.chain]
        result["aligner_status"] = _struct(supervisor.aligner.snapshot())
        names = {
            name for collector in list(REGISTRY._collector_to_names) for name in REGISTRY._collector_to_names[collector]
        }
        result["vllm_metrics"] = sorted(n for n in names if n.startswith("vllm:"))[:8]
        assert supervisor.aligner.ready, result["aligner_status"]
        service = TranscriptionService(
            settings, supervisor, AdmissionController(max_concurrent=8, max_queue=8, queue_timeout=30)
        )
        import soundfile as sf

        out = io.BytesIO()
        sf.write(out, noise(45, 5), SR, format="WAV")
        request = TranscriptionRequest(
            audio=out.getvalue(), filename="a.wav", language="English", prompt="",
            temperature=0.0, stream=False, word_timestamps=True,
        )  # fmt: skip
        began = time.monotonic()
        transcript = await service.transcribe(request, "smoke-1", RequestStats())
        result["transcribe_seconds"] = round(time.monotonic() - began, 3)
        words = transcript.words or []
        result["text"] = transcript.text[:300]
        result["segments"] = [(s.start, s.end) for s in transcript.segments]
        result["words"] = [(w.word, w.start, w.end) for w in words][:60]
        assert all(0 <= w.start <= w.end <= transcript.duration for w in words)
        assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(words))
        service.close()
    finally:
        await supervisor.stop()
        result["state_after_stop"] = (supervisor.state, supervisor.aligner.state)
        RESULTS["together"] = result


def _struct(value: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(value)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--aligner", required=True)
    parser.add_argument("--writer", required=True)
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--phases", default="aligner,together")
    parser.add_argument("--out", default="smoke-aligner-out")
    args = parser.parse_args()
    out = Path(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="smoke-aligner-"))
    for phase in args.phases.split(","):
        began = time.monotonic()
        try:
            if phase == "aligner":
                asyncio.run(phase_aligner(args))
            elif phase == "together":
                asyncio.run(phase_together(args, workdir))
            RESULTS.setdefault(phase, {})["ok"] = True
        except BaseException as exc:
            RESULTS.setdefault(phase, {})["error"] = "".join(traceback.format_exception(exc))[-4000:]
        RESULTS[phase]["phase_seconds"] = round(time.monotonic() - began, 1)
        save(out)
        print(f"== {phase}: {json.dumps(RESULTS[phase], default=str)[:3000]}", flush=True)


if __name__ == "__main__":
    main()
