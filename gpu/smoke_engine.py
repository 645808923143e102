"""Smoke test of `VLLMEngine` on the lent GPU machine (dummy weights, fixed output length).

Phases, each optional and in the order given by --phases:

  missing   a model path that does not exist: the load must fail with kind "model_not_found"
  1.7b      Qwen3-ASR-1.7B architecture, bf16, load_format=dummy: load time, VRAM, KV-cache tokens,
  0.6b      throughput at 1/16/64 concurrent 30 s requests, abort / early close / cancel checks,
            vllm:* metrics present, close and VRAM release
  bnb       0.6B with random safetensors weights written here, quantized in flight by bitsandbytes 4-bit
  oom       another process holds all but a few GiB, then a plan asks for 50% of the GPU: the load must
            fail with kind "out_of_memory" (the engine core's own message is read from its output)
  oom-kv    the same with a plan that passes vLLM's free-memory check but leaves no room for a KV cache

Usage (from the repository root on the device, vLLM and the appliance importable):

  QWENASR_BENCH_IGNORE_EOS=1 python3 gpu/smoke_engine.py --writer PATH/make_dummy_qwen3_asr.py \\
      [--tokenizer-dir DIR_WITH_vocab.json_AND_merges.txt] [--phases missing,1.7b,oom] [--out $OUT]

The dummy-model writer is shared code (`../shared/gpu/make_dummy_qwen3_asr.py`), not part of this
repository: carry a copy in an ignored folder and pass its path. Results go to OUT/smoke.json after every
phase, and a compact table is printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("QWENASR_BENCH_IGNORE_EOS", "1")  # random weights rarely emit EOS
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing can be reached from the device
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import (
    EngineLoadError,
    EngineOutput,
    EngineRequestError,
    TranscribeOptions,
    run_to_completion,
)
from qwenasr_appliance.engines.vllm.engine import VLLMEngine
from qwenasr_appliance.supervisor.plans import Plan
from qwenasr_appliance.supervisor.probe import gpu_name, probe_vram, used_vram_bytes

GIB = 1024**3
SR = 16_000
STARTED = time.monotonic()
PHASE_COST = {"missing": 20, "1.7b": 260, "0.6b": 220, "bnb": 160, "oom": 60, "oom-kv": 90}


def log(message: str) -> None:
    print(f"[smoke {time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


def used_vram() -> int | None:
    gpu = probe_vram().first
    return gpu.used_bytes if gpu else None


def gib(value: int | float | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


def load_writer(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("make_dummy_qwen3_asr", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_dir(args: argparse.Namespace, size: str) -> Path:
    target = Path(args.workdir) / f"qwen3-asr-{size}"
    if not (target / "config.json").exists():
        load_writer(args.writer).main(str(target), size, args.tokenizer_dir)
    return target


def write_random_weights(directory: Path) -> float:
    """Random bf16 weights under the released checkpoints' tensor names (for the bitsandbytes loader)."""
    import torch
    from safetensors.torch import save_file

    if (directory / "model.safetensors").exists():
        return 0.0
    began = time.monotonic()
    thinker = json.loads((directory / "config.json").read_text())["thinker_config"]
    audio, text = thinker["audio_config"], thinker["text_config"]
    shapes: dict[str, tuple[int, ...]] = {}
    a = "thinker.audio_tower."
    d, ffn, hidden = audio["d_model"], audio["encoder_ffn_dim"], audio["downsample_hidden_size"]
    mel_out = ((((audio["num_mel_bins"] + 1) // 2 + 1) // 2 + 1) // 2) * hidden
    shapes[a + "conv2d1.weight"], shapes[a + "conv2d1.bias"] = (hidden, 1, 3, 3), (hidden,)
    for conv in ("conv2d2", "conv2d3"):
        shapes[a + conv + ".weight"], shapes[a + conv + ".bias"] = (hidden, hidden, 3, 3), (hidden,)
    shapes[a + "conv_out.weight"] = (d, mel_out)
    for i in range(audio["encoder_layers"]):
        p = f"{a}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (d, d), (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (d,), (d,)
        shapes[p + "fc1.weight"], shapes[p + "fc1.bias"] = (ffn, d), (ffn,)
        shapes[p + "fc2.weight"], shapes[p + "fc2.bias"] = (d, ffn), (d,)
    shapes[a + "ln_post.weight"], shapes[a + "ln_post.bias"] = (d,), (d,)
    shapes[a + "proj1.weight"], shapes[a + "proj1.bias"] = (d, d), (d,)
    shapes[a + "proj2.weight"], shapes[a + "proj2.bias"] = (audio["output_dim"], d), (audio["output_dim"],)
    t = "thinker.model."
    h, inter, hd = text["hidden_size"], text["intermediate_size"], text["head_dim"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    shapes[t + "embed_tokens.weight"] = (text["vocab_size"], h)
    shapes[t + "norm.weight"] = (h,)
    for i in range(text["num_hidden_layers"]):
        p = f"{t}layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (heads * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * hd)
        shapes[p + "self_attn.q_norm.weight"] = (hd,)
        shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    if not text.get("tie_word_embeddings", False):
        shapes["thinker.lm_head.weight"] = (text["vocab_size"], h)
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = (
                torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(shape, dtype=torch.bfloat16)
            )
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return time.monotonic() - began


def audio_for(index: int, seconds: float, base: np.ndarray) -> np.ndarray:
    """Distinct audio per request: vLLM's encoder and prefix caches must not serve repeats."""
    samples = base[: int(seconds * SR)].copy()
    samples[:8] += np.float32(index * 1e-3)
    return samples


def metric_sum(name: str) -> float | None:
    from prometheus_client import REGISTRY

    total, found = 0.0, False
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name:
                total += sample.value
                found = True
    return total if found else None


async def bench(
    engine: VLLMEngine, concurrency: int, total: int, seconds: float, tokens: int, base: np.ndarray
) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    first_outputs: list[float] = []
    options = TranscribeOptions(max_new_tokens=tokens)

    async def one(index: int) -> None:
        async with semaphore:
            audio = audio_for(index + concurrency * 100_000, seconds, base)
            began = time.perf_counter()
            first: float | None = None
            last = EngineOutput("", 0, False)
            async for output in engine.stream(audio, options, f"bench-c{concurrency}-{index}"):
                if first is None:
                    first = time.perf_counter() - began
                last = output
            latencies.append(time.perf_counter() - began)
            first_outputs.append(first or 0.0)
            assert last.finished and last.output_tokens == tokens, last

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    wall = time.perf_counter() - began
    return {
        "concurrency": concurrency,
        "requests": total,
        "audio_s_per_s": round(total * seconds / wall, 1),
        "output_tok_per_s": round(total * tokens / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3),
        "p50_first_output_s": round(statistics.median(first_outputs), 3),
        "wall_s": round(wall, 3),
    }


async def abort_checks(engine: VLLMEngine, base: np.ndarray) -> dict[str, Any]:
    llm: Any = engine._llm
    options = TranscribeOptions(max_new_tokens=1500)
    result: dict[str, Any] = {}

    def unfinished() -> int:
        return int(llm.output_processor.get_num_unfinished_requests())

    # 1. abort() from another task
    seen: list[EngineOutput] = []
    started = asyncio.Event()

    async def consume(request_id: str) -> None:
        async for output in engine.stream(audio_for(1, 30, base), options, request_id):
            seen.append(output)
            if output.output_tokens >= 10:
                started.set()

    task = asyncio.create_task(consume("abort-me"))
    await started.wait()
    began = time.perf_counter()
    await engine.abort("abort-me")
    try:
        await task
        result["abort_raised"] = "nothing"
    except EngineRequestError as exc:
        result["abort_raised"] = f"EngineRequestError: {exc}"
    result["abort_ended_after_s"] = round(time.perf_counter() - began, 4)
    result["abort_tokens_generated"] = seen[-1].output_tokens if seen else 0
    await asyncio.sleep(0.5)
    result["abort_unfinished_in_vllm"] = unfinished()
    result["abort_running_metric"] = metric_sum("vllm:num_requests_running")

    # 2. the consumer closes the stream (client gone)
    stream = engine.stream(audio_for(2, 30, base), options, "close-me")
    outputs = 0
    async for output in stream:  # type: ignore[attr-defined]
        outputs += 1
        if output.output_tokens >= 10:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0.5)
    result["close_unfinished_in_vllm"] = unfinished()
    result["close_active_in_engine"] = len(engine.active_requests)

    # 3. the consuming task is cancelled
    started.clear()
    seen.clear()
    task = asyncio.create_task(consume("cancel-me"))
    await started.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)
    result["cancel_unfinished_in_vllm"] = unfinished()
    result["cancel_active_in_engine"] = len(engine.active_requests)
    # 4. the engine still serves afterwards
    after = await run_to_completion(engine, audio_for(3, 30, base), TranscribeOptions(max_new_tokens=20), "after-abort")
    result["serves_after_aborts"] = after.finished and after.output_tokens == 20
    return result


async def full_phase(
    name: str, settings: Settings, plan: Plan, args: argparse.Namespace, base: np.ndarray, *, quick: bool = False
) -> dict[str, Any]:
    record: dict[str, Any] = {"phase": name, "plan": plan.name, "dtype": plan.dtype, "quantization": plan.quantization}
    before = used_vram()
    record["vram_before_gib"] = gib(before)
    engine = VLLMEngine(settings, plan, vram_probe=used_vram_bytes, gpu_name=gpu_name)
    began = time.monotonic()
    try:
        await engine.load()
    except EngineLoadError as exc:
        record.update(load_error_kind=exc.kind, load_error=str(exc)[:800], load_s=round(time.monotonic() - began, 1))
        await engine.close()
        return record
    record["load_s"] = round(time.monotonic() - began, 1)
    loaded = used_vram()
    record["vram_used_gib"] = gib(None if loaded is None or before is None else loaded - before)
    description = engine.describe()
    record["describe"] = {
        "device": description.device,
        "dtype": description.dtype,
        "quantization": description.quantization,
        "max_concurrency": description.max_concurrency,
        **description.details,
    }
    record["vllm_metrics_present"] = metric_sum("vllm:num_requests_running") is not None
    log(f"{name}: loaded in {record['load_s']} s, VRAM {record['vram_used_gib']} GiB, {description}")
    try:
        await run_to_completion(
            engine, audio_for(0, 30, base), TranscribeOptions(max_new_tokens=args.tokens), "first-30s"
        )
        runs = []
        plan_runs = [(1, 8), (16, 64), (64, 256)] if not quick else [(16, 64)]
        for concurrency, total in plan_runs:
            result = await bench(engine, concurrency, total, 30.0, args.tokens, base)
            log(f"{name}: {result}")
            runs.append(result)
        record["bench"] = runs
        if not quick:
            record["abort"] = await abort_checks(engine, base)
            log(f"{name}: abort checks {record['abort']}")
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()[-3000:]
        log(f"{name}: FAILED {record['error']}")
    began = time.monotonic()
    await engine.close()
    record["close_s"] = round(time.monotonic() - began, 1)
    after = used_vram()
    record["vram_after_close_gib"] = gib(None if after is None or before is None else after - before)
    return record


class Holder:
    """Another process that holds all but `keep_gib` of the GPU's free memory."""

    def __init__(self, keep_gib: float) -> None:
        code = (
            "import sys, torch\n"
            "free, total = torch.cuda.mem_get_info()\n"
            f"x = torch.empty(max(0, free - int({keep_gib} * 2**30)), dtype=torch.uint8, device='cuda')\n"
            "print('held', x.numel(), flush=True)\n"
            "sys.stdin.read()\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        assert line.startswith("held"), line

    def release(self) -> None:
        if self.process.stdin:
            self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


async def failure_phase(name: str, settings: Settings, plan: Plan, keep_gib: float | None) -> dict[str, Any]:
    record: dict[str, Any] = {"phase": name, "plan": plan.name, "gpu_memory_utilization": plan.gpu_memory_utilization}
    holder = Holder(keep_gib) if keep_gib is not None else None
    try:
        gpu = probe_vram().first
        record["free_gib_at_load"] = gib(gpu.free_bytes if gpu else None)
        engine = VLLMEngine(settings, plan, vram_probe=used_vram_bytes, gpu_name=gpu_name)
        began = time.monotonic()
        try:
            await engine.load()
            record["load_error_kind"] = None
            record["describe"] = dict(engine.describe().details)
        except EngineLoadError as exc:
            record["load_error_kind"] = exc.kind
            record["load_error"] = str(exc)[:800]
        record["load_s"] = round(time.monotonic() - began, 1)
        await engine.close()
    finally:
        if holder:
            holder.release()
    return record


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "phase    | load s | VRAM GiB | KV tokens | c=1 a-s/s | c=16 a-s/s | c=64 a-s/s | p50@64 s | abort | failure kind"
    ]
    for r in records:
        bench = {b["concurrency"]: b for b in r.get("bench", [])}
        abort = r.get("abort", {})
        abort_ok = (
            "ok"
            if abort
            and abort.get("abort_unfinished_in_vllm") == 0
            and abort.get("close_unfinished_in_vllm") == 0
            and abort.get("cancel_unfinished_in_vllm") == 0
            and abort.get("serves_after_aborts")
            else ("-" if not abort else "FAIL")
        )

        def thr(c: int, bench: dict[int, Any] = bench) -> str:
            return str(bench[c]["audio_s_per_s"]) if c in bench else "-"

        lines.append(
            f"{r['phase']:<8} | {r.get('load_s', '-')!s:>6} | {r.get('vram_used_gib', '-')!s:>8} | "
            f"{r.get('describe', {}).get('kv_cache_tokens', '-')!s:>9} | {thr(1):>9} | {thr(16):>10} | {thr(64):>10} | "
            f"{bench[64]['p50_latency_s'] if 64 in bench else '-'!s:>8} | {abort_ok:>5} | {r.get('load_error_kind') or r.get('error') or '-'}"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writer", required=True, help="path to make_dummy_qwen3_asr.py")
    parser.add_argument("--tokenizer-dir", default=None, help="folder with the real Qwen3 vocab.json and merges.txt")
    parser.add_argument("--phases", default="missing,1.7b,0.6b,oom")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--workdir", default="/tmp/smoke-models")  # noqa: S108 - a scratch folder
    parser.add_argument("--tokens", type=int, default=100, help="output tokens per 30 s request")
    parser.add_argument("--deadline", type=float, default=450.0, help="skip phases that would end later (s)")
    parser.add_argument("--util", type=float, default=0.85)
    parser.add_argument("--bnb-eager", action="store_true", help="bitsandbytes plan without CUDA graphs")
    args = parser.parse_args()
    out = Path(args.out)
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(SR * 30) * 0.05).astype(np.float32)
    records: list[dict[str, Any]] = []
    gpu = probe_vram().first
    meta = {
        "gpu": gpu.name if gpu else None,
        "total_gib": gib(gpu.total_bytes if gpu else None),
        "tokens_per_request": args.tokens,
    }
    try:
        import vllm

        meta["vllm"] = vllm.__version__
    except Exception as exc:
        meta["vllm"] = f"import failed: {exc}"

    def save() -> None:
        (out / "smoke.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2, default=str))

    for phase in [p.strip() for p in args.phases.split(",") if p.strip()]:
        elapsed = time.monotonic() - STARTED
        if elapsed + PHASE_COST.get(phase, 120) > args.deadline:
            log(f"skipping {phase}: {elapsed:.0f} s elapsed, deadline {args.deadline:.0f} s")
            records.append({"phase": phase, "skipped": "deadline"})
            save()
            continue
        log(f"phase {phase}")
        bf16 = Plan(f"smoke-{phase}-bf16", "vllm", "bfloat16", None, args.util, "smoke")
        try:
            if phase in ("1.7b", "0.6b"):
                settings = Settings(model_id=str(model_dir(args, phase)), load_format="dummy")
                records.append(await full_phase(phase, settings, bf16, args, base))
            elif phase == "bnb":
                directory = model_dir(args, "0.6b")
                seconds = await asyncio.to_thread(write_random_weights, directory)
                log(f"bnb: wrote random weights in {seconds:.1f} s")
                settings = Settings(model_id=str(directory), load_format="auto", enforce_eager=args.bnb_eager)
                plan = Plan("smoke-bnb4", "vllm", "bfloat16", "bitsandbytes", args.util, "smoke")
                records.append(await full_phase(phase, settings, plan, args, base, quick=True))
            elif phase == "missing":
                settings = Settings(model_id="/nonexistent/qwen3-asr", load_format="dummy")
                records.append(await failure_phase(phase, settings, bf16, None))
            elif phase == "oom":
                settings = Settings(model_id=str(model_dir(args, "0.6b")), load_format="dummy", enforce_eager=True)
                plan = Plan("smoke-oom", "vllm", "bfloat16", None, 0.5, "smoke")
                records.append(await failure_phase(phase, settings, plan, keep_gib=6.0))
            elif phase == "oom-kv":
                settings = Settings(model_id=str(model_dir(args, "0.6b")), load_format="dummy", enforce_eager=True)
                total = gpu.total_bytes if gpu else 80 * GIB
                plan = Plan("smoke-oom-kv", "vllm", "bfloat16", None, round(2.2 * GIB / total, 4), "smoke")
                records.append(await failure_phase(phase, settings, plan, keep_gib=3.0))
            else:
                records.append({"phase": phase, "error": "unknown phase"})
        except Exception as exc:
            records.append(
                {"phase": phase, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            )
        log(f"phase {phase} done: {json.dumps(records[-1], default=str)[:1500]}")
        save()
    save()
    print("\n" + json.dumps(meta))
    print(table(records), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
