"""The ceiling: vLLM's offline engine (`LLM.generate`) on the appliance's inputs, one large batch at a time.

Same model directory and dummy weights, same prompt (`engines.prompt.build_prompt(context="",
language=None)`), same audio input form (`multi_modal_data={"audio": (samples, 16000)}`), same sampling
(greedy, exactly `max_tokens` tokens: `ignore_eos`, `min_tokens = max_tokens`), same engine limits as
the appliance (`max_num_seqs`, `gpu_memory_utilization`, `max_model_len` derived the appliance's way,
no multimodal processor cache). No HTTP, no file decoding: the clips are synthesized at 16 kHz up front.

Timing: one warm-up batch of other clips, then `--repeats` batches of `--batch` distinct clips (never
seen before, so vLLM's prefix cache cannot help); throughput = audio seconds / wall seconds of one
`LLM.generate` call (its input processing included). The best and the median repeat are reported.
Each timed call's GPU kernel-busy % is sampled (`bench.gpu_busy`) into its repeat; the entry's
`gpu_busy` is the best repeat's.

    python -m bench.offline_ceiling --model /tmp/qwenasr-bench/model-1.7b --out /tmp/offline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.gpu_busy import DEFAULT_INTERVAL_SECONDS, GpuBusySampler, unavailable
from bench.workload import CLIP_SECONDS, SYNTH_RATE, FloatArray, synthesize_speech

SEED_BASE = 500_000  # clip seeds of their own: nothing here was sent to a server


def appliance_prompt() -> str:
    try:
        from qwenasr_appliance.engines.prompt import build_prompt

        return str(build_prompt(context="", language=None))
    except ImportError:  # the project's src is not on the path: the same string, spelled out
        return (
            "<|im_start|>system\n<|im_end|>\n"
            "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n"
            "<|im_start|>assistant\n"
        )


def appliance_max_model_len(max_new_tokens: int, chunk_seconds: float) -> int:
    """The appliance's `derive_max_model_len` for these settings (3072 for 100 tokens, 30 s chunks)."""
    try:
        from qwenasr_appliance.config import load_settings
        from qwenasr_appliance.engines.vllm.engine import derive_max_model_len

        settings = load_settings({"MAX_NEW_TOKENS": str(max_new_tokens), "CHUNK_SECONDS": str(chunk_seconds)})
        return int(derive_max_model_len(settings))
    except Exception:  # the appliance is not importable here: its value for the defaults
        return 3072


def _clip(seed: int, seconds: float) -> FloatArray:
    return synthesize_speech(seconds, seed, SYNTH_RATE)


def synthesize_clips(first_seed: int, count: int, seconds: float) -> list[FloatArray]:
    seeds = list(range(first_seed, first_seed + count))
    workers = max(1, min(os.cpu_count() or 1, count))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_clip, seeds, [seconds] * count, chunksize=4))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    max_model_len = args.max_model_len or appliance_max_model_len(args.max_tokens, args.chunk_seconds)
    engine_args: dict[str, Any] = {
        "model": str(args.model),
        "load_format": args.load_format,
        "dtype": args.dtype,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_num_seqs": args.max_num_seqs,
        "max_model_len": max_model_len,
        "limit_mm_per_prompt": {"audio": 1},
        "mm_processor_cache_gb": 0.0,
        "seed": 0,
        "enforce_eager": args.enforce_eager,
    }
    started = time.perf_counter()
    print(f"[offline] synthesizing {args.warmup + args.batch * args.repeats} clips", file=sys.stderr, flush=True)
    warm = synthesize_clips(SEED_BASE, args.warmup, args.clip_seconds)
    batches = [
        synthesize_clips(SEED_BASE + args.warmup + r * args.batch, args.batch, args.clip_seconds)
        for r in range(args.repeats)
    ]
    synth_seconds = time.perf_counter() - started
    started = time.perf_counter()
    llm = LLM(**engine_args)
    load_seconds = time.perf_counter() - started
    prompt = appliance_prompt()
    sampling: dict[str, Any] = {
        "n": 1,
        "temperature": 0.0,
        "max_tokens": args.max_tokens,
        "min_tokens": args.max_tokens,
        "ignore_eos": True,
        "skip_special_tokens": True,
    }
    params = SamplingParams(**sampling)
    # --compare-logprobs K: every other batch asks for the sampled token's log-probability and the top K (what verbose_json's
    # avg_logprob and include[]=logprobs need), so both variants share one engine, one warm-up and one GPU.
    with_logprobs = SamplingParams(**sampling, logprobs=args.compare_logprobs) if args.compare_logprobs >= 0 else None

    def inputs(clips: Sequence[FloatArray]) -> list[dict[str, Any]]:
        return [{"prompt": prompt, "multi_modal_data": {"audio": (clip, SYNTH_RATE)}} for clip in clips]

    if warm:
        llm.generate(inputs(warm), params, use_tqdm=False)
    repeats: list[dict[str, Any]] = []
    for index, clips in enumerate(batches):
        batch_inputs = inputs(clips)
        logprobs = with_logprobs is not None and index % 2 == 1
        sampler = GpuBusySampler(args.gpu_busy_interval) if args.gpu_busy_interval > 0 else None
        if sampler is not None:
            sampler.start()
        t0 = time.perf_counter()
        try:
            outputs = llm.generate(batch_inputs, with_logprobs if logprobs else params, use_tqdm=False)
            wall = time.perf_counter() - t0
        finally:
            busy = sampler.stop() if sampler is not None else unavailable("not sampled (--gpu-busy-interval 0)")
        tokens = [len(o.outputs[0].token_ids) for o in outputs]
        audio = sum(len(c) for c in clips) / SYNTH_RATE
        repeats.append(
            {
                "wall_seconds": round(wall, 4),
                "audio_seconds": round(audio, 3),
                "throughput": round(audio / wall, 2),
                "output_tokens": int(sum(tokens)),
                "tokens_min": int(min(tokens)),
                "tokens_max": int(max(tokens)),
                "logprobs": logprobs,
                "gpu_busy": busy,
            }
        )
        print(f"[offline] batch {len(clips)}: {wall:.3f} s, {audio / wall:,.0f} audio-s/s", file=sys.stderr, flush=True)
    plain = [r for r in repeats if not r["logprobs"]]
    asked = [r for r in repeats if r["logprobs"]]
    logprobs_cost = (
        {
            "throughput_median_without": round(statistics.median(float(r["throughput"]) for r in plain), 2),
            "throughput_median_with": round(statistics.median(float(r["throughput"]) for r in asked), 2),
        }
        if asked
        else None
    )
    repeats = plain
    throughputs = [r["throughput"] for r in repeats]
    best = max(repeats, key=lambda r: float(r["throughput"]))
    return {
        "system": "offline",
        "batch": args.batch,
        "clip_seconds": args.clip_seconds,
        "repeats": repeats,
        "throughput": best["throughput"],  # the ceiling: the best repeat
        "throughput_median": round(statistics.median(throughputs), 2),
        "wall_seconds": best["wall_seconds"],
        "gpu_busy": best["gpu_busy"],
        "tokens_per_request": round(best["output_tokens"] / args.batch, 2),
        "engine_args": {k: v for k, v in engine_args.items() if k != "model"},
        "max_tokens": args.max_tokens,
        "load_seconds": round(load_seconds, 1),
        "synth_seconds": round(synth_seconds, 1),
        "prompt": prompt,
        "logprobs_cost": logprobs_cost,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="the dummy model directory")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=32)
    parser.add_argument("--clip-seconds", type=float, default=CLIP_SECONDS)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--chunk-seconds", type=float, default=30.0)
    parser.add_argument("--max-model-len", type=int, default=0, help="0: derive it as the appliance does")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--gpu-busy-interval", type=float, default=DEFAULT_INTERVAL_SECONDS,
        help="seconds between NVML polls of the GPUs' kernel-busy %% during each timed batch (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--compare-logprobs",
        type=int,
        default=-1,
        metavar="K",
        help="alternate batches without and with logprobs=K (the sampled token and the top K; the engine asks "
        "for 5 when a request wants confidence); use an even --repeats; reports both medians",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "repeats"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
