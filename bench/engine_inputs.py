"""CPU time of one chunk's vLLM engine input in the serving process: vLLM's renderer vs the appliance.

    python -m bench.engine_inputs --model /tmp/s/model-1.7b --seconds 30 --repeat 50

vLLM's renderer (what `vllm serve`, and the appliance without worker features, run in the serving
process) tokenizes the prompt and runs the Qwen3-ASR processor: Whisper features, hashing, tensors.
The appliance computes the features in a worker (`chunk_features`, timed here too, in this process)
and only assembles the input in the serving process (`EngineInputBuilder.build`). Both are timed
serially on one thread, on new audio each time, and the two inputs are checked to be the same.

Needs vLLM (a GPU host; or a CPU machine where vLLM's Python modules import) and a Qwen3-ASR model
directory (`make_dummy_qwen3_asr.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from qwenasr_appliance.audio.features import LogMelExtractor  # noqa: E402
from qwenasr_appliance.engines.prompt import build_prompt  # noqa: E402
from qwenasr_appliance.engines.vllm.inputs import chunk_features, differences, vllm_input_builder  # noqa: E402


def vllm_renderer(model_dir: Path) -> Any:
    """vLLM's renderer for `model_dir`, as `AsyncLLM` builds it, wrapped like an `AsyncLLM` for
    `vllm_input_builder`. Only the configs the renderer reads: a full VllmConfig wants a GPU."""
    from vllm.config import CacheConfig, ModelConfig, ObservabilityConfig, ParallelConfig
    from vllm.renderers import renderer_from_config

    model_config = ModelConfig(
        model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16", mm_processor_cache_gb=0
    )
    config = SimpleNamespace(
        model_config=model_config,
        parallel_config=ParallelConfig(),
        cache_config=CacheConfig(),
        observability_config=ObservabilityConfig(),
    )
    return SimpleNamespace(renderer=renderer_from_config(config), vllm_config=config)


def _ms(values: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(values) * 1000, 3), "min_ms": round(min(values) * 1000, 3)}


async def measure(model_dir: Path, seconds: float, repeat: int) -> dict[str, Any]:
    llm = vllm_renderer(model_dir)
    builder = vllm_input_builder(llm)
    extractor = LogMelExtractor.from_preprocessor_config(model_dir / "preprocessor_config.json")
    prompt = build_prompt("", None)
    rng = np.random.default_rng(0)
    render, features, build = [], [], []
    found: list[str] = []
    for index in range(repeat + 1):
        audio = (rng.standard_normal(int(seconds * 16_000)) * 0.1).astype(np.float32)
        started = time.perf_counter()
        (theirs,) = await llm.renderer.render_cmpl_async(
            [{"prompt": prompt, "multi_modal_data": {"audio": (audio, 16_000)}}]
        )
        rendered = time.perf_counter()
        chunk = chunk_features(extractor, audio, builder.feature_dtype)
        extracted = time.perf_counter()
        ours = await builder.build(prompt, chunk)
        built = time.perf_counter()
        if index == 0:  # warm-up: first-use costs, the prompt's tokenization
            found = differences(ours, theirs)
            continue
        render.append(rendered - started)
        features.append(extracted - rendered)
        build.append(built - extracted)
    return {
        "seconds": seconds,
        "repeat": repeat,
        "vllm_renderer": _ms(render),
        "worker_features": _ms(features),
        "appliance_build": _ms(build),
        "differences": found,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Qwen3-ASR model directory")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.model, args.seconds, args.repeat))
    print(json.dumps(result, indent=2))
    return 1 if result["differences"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
