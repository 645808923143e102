"""The vLLM engine without vLLM: argument building, error sorting, streaming and abort bookkeeping.

`VLLMEngine` takes its `AsyncLLM` from `llm_factory` and its `SamplingParams` from `params_factory`;
here they are a `FakeLLM` that behaves like vLLM 0.26's `AsyncLLM` where the engine relies on it
(DELTA outputs, a final "abort" output after `abort()`, aborting itself when its generator is closed)
and the identity function. The GPU behaviour is checked by `gpu/smoke_engine.py`.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import pytest

from qwenasr_appliance.audio.features import LogMelExtractor
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import (
    Engine,
    EngineDeadError,
    EngineLoadError,
    EngineOutput,
    EngineRequestError,
    TranscribeOptions,
    run_to_completion,
)
from qwenasr_appliance.engines.prompt import build_prompt
from qwenasr_appliance.engines.vllm.common import OutputTap, audio_tokens
from qwenasr_appliance.engines.vllm.engine import (
    BENCH_IGNORE_EOS_ENV,
    NO_SPEECH_TOP_LOGPROBS,
    REPETITION_GUARD,
    VLLMEngine,
    bench_fixed_length,
    build_engine_args,
    build_request_input,
    build_sampling_kwargs,
    check_clip,
    derive_max_model_len,
    finish_reason,
    renderer_workers,
    top_probability,
)
from qwenasr_appliance.engines.vllm.errors import (
    classify_load_failure,
    classify_text,
    failure_region,
    is_engine_dead,
    map_request_error,
    root_cause_line,
)
from qwenasr_appliance.engines.vllm.inputs import (
    AUDIO_PAD_TOKEN,
    ChunkFeatures,
    EngineInputBuilder,
    expand_placeholder,
    placeholder_tokens,
)
from qwenasr_appliance.supervisor.plans import Plan
from qwenasr_appliance.workers import WorkerCrashedError

TINY_ASR_EN_DE = Path(__file__).parent / "fixtures" / "tiny-asr-en-de"

T = TypeVar("T")

BF16 = Plan("vllm-bf16", "vllm", "bfloat16", None, 0.85, "test")
BNB = Plan("vllm-bnb4", "vllm", "bfloat16", "bitsandbytes", None, "test")
AUDIO = np.zeros(16_000 * 3, dtype=np.float32)
PAD_ID = 7


def run(coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- a stand-in for vllm.v1.engine.async_llm.AsyncLLM ---------------------------------------------


class EngineDeadErrorStandIn(Exception):
    pass


EngineDeadErrorStandIn.__name__ = "EngineDeadError"  # vllm.v1.engine.exceptions.EngineDeadError


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool


@dataclass
class FakeRenderer:
    rendered: list[dict[str, Any]] = field(default_factory=list)

    async def render_cmpl_async(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.rendered.extend(prompts)
        return [{"type": "token", "source": prompt} for prompt in prompts]


STREAMED = TranscribeOptions(incremental=True)  # partial outputs, as for a streaming client


class FakeTokenizer:
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        assert skip_special_tokens
        return "".join(f"w{i} " for i in token_ids)


class FakeLLM:
    """Streams up to `tokens` DELTA outputs ("w0 ", "w1 ", ...) per request, `delay` seconds apart."""

    def __init__(self, tokens: int = 5, delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.tokens = tokens
        self.delay = delay
        self.fail = fail
        self.errored = False
        self.renderer = FakeRenderer()
        self.generated: list[tuple[Any, Any, str]] = []
        self.aborts: list[Any] = []
        self.closed_early: list[str] = []
        self.shutdowns = 0
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(dtype="torch.bfloat16", max_model_len=3072),
            cache_config=SimpleNamespace(num_gpu_blocks=1000, block_size=16),
            scheduler_config=SimpleNamespace(max_num_seqs=256, max_num_batched_tokens=8192),
        )
        self._aborted: set[str] = set()
        self._running: set[str] = set()
        self.tokenizer = FakeTokenizer()

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
        self.generated.append((prompt, params, request_id))
        if self.fail is not None:
            raise self.fail
        self._running.add(request_id)
        count = min(self.tokens, params["max_tokens"])
        try:
            for index in range(count):
                await asyncio.sleep(self.delay)
                if request_id in self._aborted:
                    yield Output([Completion("", [], "abort")], True)
                    return
                last = index == count - 1
                if params["output_kind"] == "FINAL_ONLY":
                    if last:  # cumulative ids, no text: detokenize=False
                        yield Output([Completion("", list(range(count)), "length")], True)
                    continue
                yield Output([Completion(f"w{index} ", [index], "length" if last else None)], last)
        except (asyncio.CancelledError, GeneratorExit):
            # vLLM 0.26 AsyncLLM.generate: abort the request when the consumer goes away.
            self.closed_early.append(request_id)
            await self.abort(request_id)
            raise
        finally:
            self._running.discard(request_id)

    async def abort(self, request_id: Any) -> None:
        self.aborts.append(request_id)
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self._aborted.update(i for i in ids if i in self._running)

    def shutdown(self) -> None:
        self.shutdowns += 1


def identity(kwargs: dict[str, Any]) -> dict[str, Any]:
    return kwargs


def make_engine(
    llm: FakeLLM | None = None, settings: Settings | None = None, plan: Plan = BF16, **kwargs: Any
) -> tuple[VLLMEngine, FakeLLM]:
    fake = llm or FakeLLM()
    engine = VLLMEngine(settings or Settings(), plan, llm_factory=lambda _args: fake, params_factory=identity, **kwargs)
    return engine, fake


async def loaded(llm: FakeLLM | None = None, **kwargs: Any) -> tuple[VLLMEngine, FakeLLM]:
    engine, fake = make_engine(llm, **kwargs)
    await engine.load()
    return engine, fake


# -- engine arguments -----------------------------------------------------------------------------


def test_audio_tokens_follow_vllms_formula() -> None:
    assert audio_tokens(30.0) == 390
    assert audio_tokens(1.0) == 13
    assert audio_tokens(0.5) == 7
    assert audio_tokens(2.0) == 26


def test_max_model_len_is_derived_from_the_chunk_budget() -> None:
    assert derive_max_model_len(Settings()) == 3072  # 390 audio + 64 + 2000 context + 512 out
    assert derive_max_model_len(Settings(max_model_len=5000)) == 5000
    assert derive_max_model_len(Settings(max_prompt_chars=0, max_new_tokens=100)) == 3072
    assert derive_max_model_len(Settings(chunk_seconds=1200.0, max_new_tokens=32_000)) == 50_176


def test_engine_args_for_a_bf16_plan() -> None:
    settings = Settings(model_id="/models/qwen3-asr-1.7b", load_format="dummy", max_num_seqs=64, enforce_eager=True)
    args = build_engine_args(settings, BF16, cpu_count=16)
    assert args["model"] == "/models/qwen3-asr-1.7b"
    assert args["served_model_name"] == "/models/qwen3-asr-1.7b"
    assert args["dtype"] == "bfloat16"
    assert args["quantization"] is None
    assert args["load_format"] == "dummy"
    assert args["gpu_memory_utilization"] == 0.85
    assert args["max_model_len"] == 3072
    assert args["max_num_seqs"] == 64
    assert args["enforce_eager"] is True
    assert args["limit_mm_per_prompt"] == {"audio": 1}
    assert args["disable_log_stats"] is False
    assert args["trust_remote_code"] is False
    assert args["mm_processor_cache_gb"] == 0.0  # required by vLLM for renderer_num_workers > 1
    assert args["renderer_num_workers"] == 8
    assert args["stream_interval"] == 8


def test_engine_args_for_a_bitsandbytes_plan_use_its_loader_and_the_settings_utilization() -> None:
    settings = Settings(gpu_memory_utilization=0.7, load_format="auto", served_model_name=("asr",))
    args = build_engine_args(settings, BNB)
    assert args["quantization"] == "bitsandbytes"
    assert args["load_format"] == "bitsandbytes"
    assert args["gpu_memory_utilization"] == 0.7
    assert args["served_model_name"] == "asr"


def test_renderer_workers_are_bounded() -> None:
    assert renderer_workers(1) == 1
    assert renderer_workers(4) == 2
    assert renderer_workers(128) == 8


# -- sampling and request input -------------------------------------------------------------------


def test_sampling_kwargs_for_production() -> None:
    kwargs = build_sampling_kwargs(TranscribeOptions(temperature=0.0, max_new_tokens=300))
    assert kwargs == {
        "n": 1,
        "temperature": 0.0,
        "max_tokens": 300,
        "skip_special_tokens": True,
        "output_kind": "FINAL_ONLY",
        "detokenize": False,
        "repetition_detection": dict(REPETITION_GUARD),
    }
    assert "ignore_eos" not in kwargs and "min_tokens" not in kwargs
    streamed = build_sampling_kwargs(TranscribeOptions(max_new_tokens=300, incremental=True))
    assert streamed["output_kind"] == "DELTA" and streamed["detokenize"] is True


def test_a_non_streaming_request_gets_one_output_decoded_once() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=3))
        options = TranscribeOptions(language="English", max_new_tokens=3)
        outputs = [out async for out in engine.stream(AUDIO, options, "final")]
        assert outputs == [EngineOutput("w0 w1 w2 ", 3, True, "length")]
        assert fake.generated[-1][1]["output_kind"] == "FINAL_ONLY"

    run(main())


def test_sampling_kwargs_for_fixed_length_benchmarks() -> None:
    kwargs = build_sampling_kwargs(TranscribeOptions(temperature=0.7, max_new_tokens=100), fixed_length=True)
    assert kwargs["ignore_eos"] is True
    assert kwargs["min_tokens"] == kwargs["max_tokens"] == 100
    assert kwargs["temperature"] == 0.7
    assert "repetition_detection" not in kwargs


def test_bench_switch_is_read_from_the_environment_only_when_exactly_one() -> None:
    assert bench_fixed_length({BENCH_IGNORE_EOS_ENV: "1"})
    assert not bench_fixed_length({BENCH_IGNORE_EOS_ENV: "true"})
    assert not bench_fixed_length({})


def test_request_input_holds_the_shared_prompt_and_16k_samples() -> None:
    audio = np.linspace(-1, 1, 16_000, dtype=np.float64)
    options = TranscribeOptions(language="English", context="names: Qwen")
    request = build_request_input(audio, options)  # type: ignore[arg-type]
    assert request["prompt"] == build_prompt("names: Qwen", "English")
    assert request["prompt"].endswith("language English<asr_text>")
    samples, rate = request["multi_modal_data"]["audio"]
    assert rate == 16_000
    assert samples.dtype == np.float32 and samples.shape == (16_000,)
    assert build_request_input(AUDIO, TranscribeOptions())["prompt"] == build_prompt("", None)
    continued = build_request_input(AUDIO, TranscribeOptions(language="English", assistant_prefix="Hello wor"))
    assert continued["prompt"] == build_prompt("", "English") + "Hello wor"


@pytest.mark.parametrize("shape", [(0,), (2, 16_000)])
def test_request_input_rejects_empty_or_multichannel_audio(shape: tuple[int, ...]) -> None:
    with pytest.raises(EngineRequestError):
        build_request_input(np.zeros(shape, dtype=np.float32), TranscribeOptions())


# -- error sorting --------------------------------------------------------------------------------

STARTUP_FAILED = RuntimeError(
    "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}"
)


def engine_core_log(error_line: str) -> str:
    return (
        "(EngineCore pid=42) INFO 11-24 Loading weights took 3.2 seconds\n"
        "(EngineCore pid=42) WARNING 11-24 Cascade attention is not supported here; disabled\n"
        "(EngineCore pid=42) ERROR 11-24 EngineCore failed to start.\n"
        "(EngineCore pid=42) Traceback (most recent call last):\n"
        '(EngineCore pid=42)   File "vllm/v1/engine/core.py", line 1310, in run_engine_core\n'
        f"(EngineCore pid=42) {error_line}\n"
    )


@pytest.mark.parametrize(
    ("error_line", "kind"),
    [
        (
            "ValueError: Free memory on device cuda:0 (3.1/79.2 GiB) on startup is less than desired GPU "
            "memory utilization (0.9, 71.3 GiB). Decrease GPU memory utilization",
            "out_of_memory",
        ),
        (
            "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
            "out_of_memory",
        ),
        (
            "ValueError: To serve at least one request with the model's max seq len (65536), (7.00 GiB KV cache "
            "is needed, which is larger than the available KV cache memory (2.1 GiB).",
            "out_of_memory",
        ),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", "out_of_memory"),
        ("ImportError: Please install bitsandbytes>=0.46.1 via `pip install bitsandbytes>=0.46.1`", "import"),
        ("RuntimeError: Cannot find any model weights with `/models/asr`", "model_not_found"),
        ("ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0.", "unsupported"),
        ("RuntimeError: something nobody expected", "other"),
    ],
)
def test_engine_core_failures_are_classified_from_the_child_output(error_line: str, kind: str) -> None:
    error = classify_load_failure(STARTUP_FAILED, engine_core_log(error_line))
    assert error.kind == kind
    assert "Engine core initialization failed" in str(error)
    assert error_line.split(":", 1)[1].strip()[:40] in str(error)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ValueError("Invalid repository ID or local directory specified: '/nope'."), "model_not_found"),
        (
            # seen on the device for a local path that does not exist (huggingface_hub's HFValidationError)
            ValueError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/nonexistent/qwen3-asr'."),
            "model_not_found",
        ),
        (ValueError("Unknown quantization method: bnb. Must be one of ['awq', ...]."), "unsupported"),
        (ImportError("Please install bitsandbytes>=0.48.1 via `pip install`"), "import"),
        (ModuleNotFoundError("No module named 'vllm._C'"), "import"),
        (MemoryError(), "out_of_memory"),
        (RuntimeError("boom"), "other"),
    ],
)
def test_failures_in_this_process_are_classified_from_the_exception_chain(exc: Exception, kind: str) -> None:
    assert classify_load_failure(exc).kind == kind


def test_a_wrapped_cause_and_an_out_of_memory_class_are_found() -> None:
    class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError's name
        pass

    try:
        try:
            raise OutOfMemoryError("Tried to allocate 20.00 MiB")
        except OutOfMemoryError as inner:
            raise RuntimeError("loading failed") from inner
    except RuntimeError as outer:
        assert classify_load_failure(outer).kind == "out_of_memory"


def test_the_child_root_cause_beats_noise_earlier_in_its_log() -> None:
    log = "WARNING: feature X is not supported for the current gpu\n" + engine_core_log(
        "RuntimeError: Cannot find any model weights with `/m`"
    )
    assert failure_region(log).startswith("EngineCore failed to start")
    assert classify_load_failure(STARTUP_FAILED, log).kind == "model_not_found"
    assert root_cause_line(failure_region(log)) == "RuntimeError: Cannot find any model weights with `/m`"
    assert classify_text("nothing to see") == "other"


def test_an_existing_load_error_passes_through() -> None:
    error = EngineLoadError("unsupported", "no")
    assert classify_load_failure(error) is error


def test_request_errors_are_sorted_into_dead_and_request_failures() -> None:
    dead = EngineDeadErrorStandIn("EngineCore encountered an issue.")
    assert is_engine_dead(dead)
    assert isinstance(map_request_error(dead), EngineDeadError)
    wrapped = RuntimeError("generate failed")
    wrapped.__cause__ = dead
    assert isinstance(map_request_error(wrapped), EngineDeadError)
    assert isinstance(map_request_error(ValueError("prompt too long")), EngineRequestError)
    assert isinstance(map_request_error(RuntimeError("x")), EngineRequestError)
    assert isinstance(map_request_error(RuntimeError("x"), engine_errored=True), EngineDeadError)


# -- the engine with a fake AsyncLLM --------------------------------------------------------------


def test_the_engine_implements_the_protocol() -> None:
    engine, _ = make_engine()
    assert isinstance(engine, Engine)


def test_load_builds_the_llm_from_engine_args_and_warms_up() -> None:
    received: list[dict[str, Any]] = []
    fake = FakeLLM()

    def factory(args: dict[str, Any]) -> FakeLLM:
        received.append(args)
        return fake

    async def main() -> None:
        engine = VLLMEngine(Settings(load_format="dummy"), BF16, llm_factory=factory, params_factory=identity)
        await engine.load()
        await engine.load()  # idempotent
        assert len(received) == 1 and received[0] == build_engine_args(Settings(load_format="dummy"), BF16)
        assert len(fake.generated) == 1 and fake.generated[0][2].startswith("warmup-")
        assert fake.generated[0][1]["max_tokens"] == 4
        assert engine.active_requests == frozenset()
        description = engine.describe()
        assert description.name == "vllm"
        assert description.dtype == "bfloat16"
        assert description.quantization is None
        assert description.max_concurrency == 256
        assert description.details["kv_cache_tokens"] == 16_000
        assert description.details["gpu_memory_utilization"] == 0.85
        assert description.details["max_model_len"] == 3072
        assert isinstance(description.details["load_seconds"], float)
        assert "bench_ignore_eos" not in description.details
        await engine.close()

    run(main())


def test_stream_yields_cumulative_text_and_ends_finished() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=3))
        options = TranscribeOptions(language="English", max_new_tokens=3, incremental=True)
        outputs = [out async for out in engine.stream(AUDIO, options, "req-1")]
        assert outputs == [
            EngineOutput("w0 ", 1, False),
            EngineOutput("w0 w1 ", 2, False),
            EngineOutput("w0 w1 w2 ", 3, True, "length"),
        ]
        prompt, params, request_id = fake.generated[-1]
        assert request_id == "req-1"
        assert prompt["type"] == "token"  # what the renderer returned went to generate()
        assert fake.renderer.rendered[-1]["prompt"] == build_prompt("", "English")
        assert params == build_sampling_kwargs(options)
        assert fake.aborts == []  # a finished request is not aborted
        assert engine.active_requests == frozenset()
        result = await run_to_completion(engine, AUDIO, options, "req-2")
        assert result == EngineOutput("w0 w1 w2 ", 3, True, "length")

    run(main())


def test_bench_switch_reaches_the_sampling_params() -> None:
    async def main() -> None:
        engine, fake = await loaded(environ={BENCH_IGNORE_EOS_ENV: "1"})
        await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=5), "bench")
        params = fake.generated[-1][1]
        assert params["ignore_eos"] is True and params["min_tokens"] == 5
        assert engine.describe().details["bench_ignore_eos"] is True

    run(main())


def test_closing_the_stream_early_aborts_the_request() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=50, delay=0.001))
        stream = engine.stream(AUDIO, STREAMED, "gone")
        first = await stream.__anext__()  # type: ignore[attr-defined]
        assert first.raw_text == "w0 " and not first.finished
        assert engine.active_requests == {"gone"}
        await stream.aclose()  # type: ignore[attr-defined]
        assert fake.closed_early == ["gone"]
        assert fake.aborts.count("gone") == 2  # vLLM's own abort, then ours by the same id
        assert engine.active_requests == frozenset()

    run(main())


def test_cancelling_the_consuming_task_aborts_the_request() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=1000, delay=0.005))
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.stream(AUDIO, STREAMED, "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "cancelled" in fake.closed_early
        assert "cancelled" in fake.aborts
        assert engine.active_requests == frozenset()

    run(main())


def test_cancelling_a_non_streaming_request_aborts_it_in_vllm() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=1000, delay=0.005))
        task = asyncio.create_task(run_to_completion(engine, AUDIO, TranscribeOptions(), "client-left"))
        while "client-left" not in fake._running:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "client-left" in fake.closed_early and "client-left" in fake.aborts
        assert engine.active_requests == frozenset()

    run(main())


def test_abort_from_another_task_ends_the_stream_with_a_request_error() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=1000, delay=0.002))
        seen: list[EngineOutput] = []
        started = asyncio.Event()

        async def consume() -> None:
            async for output in engine.stream(AUDIO, STREAMED, "victim"):
                seen.append(output)
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        await engine.abort("victim")
        with pytest.raises(EngineRequestError, match="aborted"):
            await task
        assert "victim" in fake.aborts
        assert len(seen) < 1000
        assert engine.active_requests == frozenset()
        before = list(fake.aborts)
        await engine.abort("victim")  # no longer running: nothing is sent to vLLM
        await engine.abort("never-seen")
        assert fake.aborts == before

    run(main())


def test_abort_before_vllm_knows_the_request_still_ends_it() -> None:
    async def main() -> None:
        engine, fake = await loaded()
        release, rendering = asyncio.Event(), asyncio.Event()
        original = fake.renderer.render_cmpl_async

        async def slow_render(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
            rendering.set()
            await release.wait()
            return await original(prompts)

        fake.renderer.render_cmpl_async = slow_render  # type: ignore[method-assign]
        task = asyncio.create_task(run_to_completion(engine, AUDIO, TranscribeOptions(), "early"))
        await rendering.wait()
        assert engine.active_requests == {"early"}
        await engine.abort("early")
        release.set()
        with pytest.raises(EngineRequestError, match="aborted"):
            await task
        assert all(request_id != "early" for _, _, request_id in fake.generated)

    run(main())


def test_duplicate_request_ids_are_refused() -> None:
    async def main() -> None:
        engine, _ = await loaded(FakeLLM(tokens=100, delay=0.002))
        first = engine.stream(AUDIO, TranscribeOptions(), "same")
        await first.__anext__()  # type: ignore[attr-defined]
        with pytest.raises(EngineRequestError, match="already running"):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "same")
        await first.aclose()  # type: ignore[attr-defined]

    run(main())


def test_a_dead_engine_core_raises_engine_dead_error() -> None:
    async def main() -> None:
        engine, fake = await loaded()
        fake.fail = EngineDeadErrorStandIn("EngineCore encountered an issue.")
        with pytest.raises(EngineDeadError):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "r1")
        fake.fail = None
        fake.errored = True
        assert engine.is_dead
        with pytest.raises(EngineDeadError):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "r2")

    run(main())


def test_a_rejected_request_raises_engine_request_error() -> None:
    async def main() -> None:
        engine, fake = await loaded()
        fake.fail = ValueError("The decoder prompt (length 9000) is longer than the maximum model length")
        with pytest.raises(EngineRequestError, match="longer than the maximum model length"):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "long")
        fake.fail = RuntimeError("unexpected")
        with pytest.raises(EngineRequestError):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "odd")
        assert not engine.is_dead
        assert engine.active_requests == frozenset()

    run(main())


def test_a_request_error_finish_reason_is_an_error() -> None:
    class ErroringLLM(FakeLLM):
        async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
            self.generated.append((prompt, params, request_id))
            yield Output([Completion("x", [1], "error")], True)

    async def main() -> None:
        engine, _ = make_engine(ErroringLLM())
        with pytest.raises(EngineLoadError):  # the warm-up fails, so the load does
            await engine.load()
        engine, _ = make_engine(ErroringLLM())
        engine._llm = ErroringLLM()  # loaded without warm-up
        with pytest.raises(EngineRequestError, match="'error'"):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "e")

    run(main())


def test_load_failures_become_classified_load_errors() -> None:
    def factory(_args: dict[str, Any]) -> FakeLLM:
        raise ValueError("Invalid repository ID or local directory specified: '/models/missing'.")

    async def main() -> None:
        engine = VLLMEngine(Settings(), BF16, llm_factory=factory, params_factory=identity)
        with pytest.raises(EngineLoadError) as caught:
            await engine.load()
        assert caught.value.kind == "model_not_found"
        await engine.close()

    run(main())


def test_close_ends_open_streams_shuts_down_once_and_refuses_new_work() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=10_000, delay=0.002))
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.stream(AUDIO, STREAMED, "open"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        await engine.close()
        with pytest.raises(EngineRequestError):
            await task
        assert ["open"] in fake.aborts
        await engine.close()
        assert fake.shutdowns == 1
        with pytest.raises(EngineDeadError, match="closed"):
            await run_to_completion(engine, AUDIO, TranscribeOptions(), "late")
        with pytest.raises(EngineLoadError):
            await engine.load()

    run(main())


def test_a_cancelled_load_shuts_the_engine_down_once_it_is_built() -> None:
    gate = threading.Event()
    fake = FakeLLM()

    def factory(_args: dict[str, Any]) -> FakeLLM:
        gate.wait(5)
        return fake

    async def main() -> None:
        engine = VLLMEngine(Settings(), BF16, llm_factory=factory, params_factory=identity)
        task = asyncio.create_task(engine.load())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        for _ in range(200):
            if fake.shutdowns:
                break
            await asyncio.sleep(0.01)
        assert fake.shutdowns == 1

    run(main())


def test_close_waits_until_the_gpu_memory_is_back() -> None:
    gib = 1024**3
    readings = iter([1 * gib, 9 * gib, 6 * gib, gib + gib // 4])

    async def main() -> None:
        engine, _ = await loaded(vram_probe=lambda: next(readings))
        assert engine.describe().details["vram_used_bytes"] == 8 * gib
        await engine.close()
        assert next(readings, None) is None  # polled until back near the baseline

    run(main())


# -- the output tap -------------------------------------------------------------------------------


def test_output_tap_keeps_what_child_processes_print_and_restores_the_descriptors() -> None:
    before = os.fstat(2)
    tap = OutputTap()
    tap.start()
    try:
        subprocess.run(
            [sys.executable, "-c", "import sys; print('hello'); sys.stderr.write('CUDA out of memory\\n')"],
            check=True,
        )
    finally:
        tap.stop()
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    for _ in range(100):
        if "CUDA out of memory" in tap.text():
            break
        threading.Event().wait(0.01)
    assert "hello" in tap.text()
    assert classify_load_failure(STARTUP_FAILED, tap.text()).kind == "out_of_memory"


class ShapedRenderer(FakeRenderer):
    """Renders like vLLM 0.26's Qwen3-ASR renderer, in its shapes: prompt tokens with the audio placeholder
    expanded, and the three processor tensors. `token_shift` makes it disagree with inputs built here."""

    def __init__(self, token_shift: int = 0) -> None:
        super().__init__()
        self.token_shift = token_shift

    async def render_cmpl_async(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.rendered.extend(prompts)
        out = []
        for prompt in prompts:
            tokens = fake_tokens(prompt["prompt"])
            if "multi_modal_data" not in prompt:
                out.append({"type": "token", "prompt_token_ids": tokens})
                continue
            samples, _rate = prompt["multi_modal_data"]["audio"]
            features = LogMelExtractor()(samples)
            out.append(shaped_input(tokens, features, "vllm-hash", token_shift=self.token_shift))
        return out


def fake_tokens(prompt: str) -> list[int]:
    """A toy tokenizer: one id per character, the audio placeholder one token."""
    head, _pad, tail = prompt.partition(AUDIO_PAD_TOKEN)
    return [ord(c) for c in head] + [PAD_ID] + [ord(c) for c in tail]


def shaped_input(tokens: list[int], features: np.ndarray, digest: str, token_shift: int = 0) -> dict[str, Any]:
    import torch

    frames = features.shape[1]
    expanded, offset = expand_placeholder(tokens, PAD_ID, placeholder_tokens(frames))
    return {
        "type": "multimodal",
        "prompt_token_ids": [t + token_shift for t in expanded],
        "mm_placeholders": {"audio": [SimpleNamespace(offset=offset, length=placeholder_tokens(frames))]},
        "mm_hashes": {"audio": [digest]},
        "mm_kwargs": {
            "audio": [
                {
                    "input_audio_features": SimpleNamespace(data=torch.from_numpy(features).to(torch.bfloat16)),
                    "feature_attention_mask": SimpleNamespace(data=torch.ones(frames)),
                    "audio_feature_lengths": SimpleNamespace(data=torch.tensor(frames)),
                }
            ]
        },
    }


def shaped_builder(llm: FakeLLM) -> EngineInputBuilder:
    """What `vllm_input_builder` is to a real AsyncLLM, for the fake one."""

    async def tokenize(prompt: str) -> list[int]:
        (rendered,) = await llm.renderer.render_cmpl_async([{"prompt": prompt}])
        return list(rendered["prompt_token_ids"])

    def assemble(prompt: str, ids: list[int], offset: int, length: int, chunk: ChunkFeatures) -> dict[str, Any]:
        built = shaped_input(fake_tokens(prompt), chunk.features, chunk.digest)
        assert built["prompt_token_ids"] == ids and built["mm_placeholders"]["audio"][0].offset == offset
        return {**built, "built_here": True}

    return EngineInputBuilder(tokenize, assemble, PAD_ID)


def features_engine(fake: FakeLLM, **kwargs: Any) -> VLLMEngine:
    engine, _ = make_engine(fake, input_builder_factory=shaped_builder, **kwargs)
    engine._extractor = LogMelExtractor()
    return engine


def test_features_come_from_worker_processes_when_inputs_built_here_match_vllms() -> None:
    async def main() -> None:
        fake = FakeLLM(tokens=2)
        fake.renderer = ShapedRenderer()
        engine = features_engine(fake)
        await engine.load()
        try:
            assert engine.describe().details["audio_features"] == "workers"
            await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "features")
            engine_input, _params, request_id = fake.generated[-1]
            assert request_id == "features" and engine_input["built_here"]
            assert engine_input["mm_hashes"]["audio"][0].startswith("qwenasr-")
            features = engine_input["mm_kwargs"]["audio"][0]["input_audio_features"].data
            assert tuple(features.shape) == (128, len(AUDIO) // 160)
            # vLLM's renderer saw only the start-up check's chunk and the prompt text, never this request's audio
            assert all(
                p["multi_modal_data"]["audio"][0].size == len(check_clip())
                for p in fake.renderer.rendered
                if "multi_modal_data" in p
            )
        finally:
            await engine.close()

    run(main(), timeout=60)


def test_when_inputs_built_here_differ_from_vllms_vllm_renders_every_chunk() -> None:
    async def main() -> None:
        fake = FakeLLM(tokens=2)
        fake.renderer = ShapedRenderer(token_shift=1)
        engine = features_engine(fake)
        await engine.load()
        try:
            assert engine.describe().details["audio_features"] == "vllm"
            await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "rendered")
            assert "built_here" not in fake.generated[-1][0]
            assert fake.renderer.rendered[-1]["multi_modal_data"]["audio"][0].shape == AUDIO.shape
        finally:
            await engine.close()

    run(main(), timeout=60)


def test_when_inputs_cannot_be_built_here_vllm_renders_every_chunk() -> None:
    def no_builder(llm: Any) -> EngineInputBuilder:
        raise ImportError("No module named 'vllm'")

    async def main() -> None:
        engine, fake = make_engine(FakeLLM(tokens=2), input_builder_factory=no_builder)
        engine._extractor = LogMelExtractor()
        await engine.load()
        try:
            assert engine.describe().details["audio_features"] == "vllm"
            await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "rendered")
            assert fake.generated[-1][0]["type"] == "token"
        finally:
            await engine.close()

    run(main(), timeout=60)


def test_without_an_extractor_vllm_gets_the_samples() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=2))
        await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "samples")
        samples, rate = fake.renderer.rendered[-1]["multi_modal_data"]["audio"]
        assert rate == 16_000 and samples.shape == AUDIO.shape
        assert engine.describe().details["audio_features"] == "vllm"

    run(main())


def test_when_vllm_refuses_an_input_built_here_the_engine_falls_back_to_its_renderer() -> None:
    class RefusingLLM(FakeLLM):
        async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
            if isinstance(prompt, dict) and prompt.get("built_here"):
                raise ValueError("mm_hashes must contain only strings")
            async for output in super().generate(prompt, params, request_id):
                yield output

    async def main() -> None:
        fake = RefusingLLM(tokens=2)
        fake.renderer = ShapedRenderer()
        engine = features_engine(fake)
        await engine.load()
        try:
            assert engine.describe().details["audio_features"] == "vllm"
            result = await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "after")
            assert result.finished and "built_here" not in fake.generated[-1][0]
        finally:
            await engine.close()

    run(main(), timeout=60)


def test_a_feature_worker_death_is_retried_once_then_reaches_the_client_as_retryable() -> None:
    """Issue 12 (K4): a killed feature worker costs one retry on its replacement; a second death fails
    only that request, with WorkerCrashedError (503 `worker_restarting`), never a 4xx or a 500."""

    async def main() -> None:
        fake = FakeLLM(tokens=2)
        fake.renderer = ShapedRenderer()
        engine = features_engine(fake)
        await engine.load()
        pool = engine._features
        assert pool is not None
        real_run = pool.run
        deaths = {"left": 0, "calls": 0}

        async def dying_run(*args: Any, **kwargs: Any) -> Any:
            deaths["calls"] += 1
            if deaths["left"] > 0:
                deaths["left"] -= 1
                raise WorkerCrashedError("a features worker process died", -9)
            return await real_run(*args, **kwargs)

        try:
            pool.run = dying_run  # type: ignore[method-assign]
            deaths.update(left=1, calls=0)
            result = await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "retried")
            assert result.finished and deaths["calls"] == 2
            deaths.update(left=2, calls=0)
            with pytest.raises(WorkerCrashedError):
                await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "crash")
            assert deaths["calls"] == 2
            result = await run_to_completion(engine, AUDIO, TranscribeOptions(max_new_tokens=2), "next")
            assert result.finished and fake.generated[-1][0]["built_here"]
        finally:
            await engine.close()

    run(main(), timeout=60)


# ------------------------------------------------------------------------------------- confidence


@dataclass
class StepLogprob:
    logprob: float


class LogprobLLM(FakeLLM):
    """Finishes with ids 0..n-1 and, when asked, vLLM's per-step logprobs: {token id: Logprob}."""

    def __init__(self, steps: list[dict[int, float]], reason: str = "stop") -> None:
        super().__init__(tokens=len(steps))
        self.steps = steps
        self.reason = reason

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Output]:
        self.generated.append((prompt, params, request_id))
        ids = [min(step, key=lambda token: -step[token]) for step in self.steps]
        completion = Completion("", ids, self.reason)
        if params.get("logprobs") is not None:
            completion.logprobs = [  # type: ignore[attr-defined]
                {token: StepLogprob(lp) for token, lp in step.items()} for step in self.steps
            ]
        yield Output([completion], True)


class WordTokenizer:
    """Ids 0..: `language`, ` English`, `<asr_text>`, ` hi`, end, ` None`."""

    words = ["language", " English", "<asr_text>", " hi", "", " None"]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.words[i] for i in token_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.words.index(text)]

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [4 if token == "<|im_end|>" else 99 for token in tokens]

    unk_token_id = 99


def test_logprobs_are_asked_only_when_confidence_is_wanted() -> None:
    assert "logprobs" not in build_sampling_kwargs(TranscribeOptions())
    assert "logprobs" not in build_sampling_kwargs(TranscribeOptions(incremental=True))
    assert build_sampling_kwargs(TranscribeOptions(logprobs=True))["logprobs"] == NO_SPEECH_TOP_LOGPROBS


@pytest.mark.parametrize(
    ("reason", "tokens", "expected"),
    [
        ("stop", 3, "stop"),
        ("length", 8, "length"),
        ("repetition", 5, "repetition"),  # vLLM 0.26: str(FinishReason.REPETITION)
        ("repetition_detected", 5, "stop"),  # that is vLLM's `stop_reason`, never its finish reason
        (None, 8, "length"),
    ],
)
def test_finish_reasons(reason: str | None, tokens: int, expected: str) -> None:
    assert finish_reason(reason, tokens, 8) == expected


def test_token_logprobs_and_no_speech_prob_come_from_vllm() -> None:
    steps = [
        {0: -0.01},
        {1: -0.2, 5: math.log(0.15)},  # the language step: " None" had probability 0.15
        {2: -0.001},
        {3: -0.5},
        {4: -0.05},
    ]

    async def main() -> None:
        fake = LogprobLLM(steps)
        fake.tokenizer = WordTokenizer()  # type: ignore[assignment]
        engine, _ = await loaded(fake)
        plain = await run_to_completion(engine, AUDIO, TranscribeOptions(), "plain")
        assert plain.logprobs is None and plain.no_speech_prob is None
        assert "logprobs" not in fake.generated[-1][1]
        output = await run_to_completion(engine, AUDIO, TranscribeOptions(logprobs=True), "conf")
        assert output.raw_text == "language English<asr_text> hi"
        assert output.finish_reason == "stop"
        assert output.logprobs is not None
        assert [(t.token, t.logprob) for t in output.logprobs] == [
            ("language", -0.01), (" English", -0.2), ("<asr_text>", -0.001), (" hi", -0.5), ("", -0.05)
        ]  # fmt: skip
        assert output.no_speech_prob == pytest.approx(0.15)

    run(main())


def test_token_bytes_come_from_the_vocabulary_when_a_token_splits_a_character() -> None:
    """A byte-level tokenizer (the tiny checkpoint's: one token per byte) writes `grün` as g, r, C3, BC, n:
    each half of `ü` decodes alone to U+FFFD, and its `raw` bytes are its own byte, not EF BF BD."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINY_ASR_EN_DE))
    ids = tokenizer.encode("grün", add_special_tokens=False)
    steps = [{token: -0.1 * (index + 1)} for index, token in enumerate(ids)]

    async def main() -> None:
        fake = LogprobLLM(steps)
        fake.tokenizer = tokenizer
        engine, _ = await loaded(fake)
        output = await run_to_completion(engine, AUDIO, TranscribeOptions(logprobs=True, language="German"), "de")
        assert output.logprobs is not None
        assert [(t.token, t.raw) for t in output.logprobs] == [
            ("g", b"g"), ("r", b"r"), ("\ufffd", b"\xc3"), ("\ufffd", b"\xbc"), ("n", b"n")
        ]  # fmt: skip
        assert b"".join(t.raw for t in output.logprobs) == "grün".encode()

    run(main(), timeout=60)


def test_no_speech_prob_is_an_upper_bound_when_the_token_is_not_in_the_top() -> None:
    step = {1: math.log(0.9), 7: math.log(0.04), 8: math.log(0.01)}
    assert top_probability({k: StepLogprob(v) for k, v in step.items()}, [5]) == pytest.approx(0.01)
    assert top_probability({k: StepLogprob(v) for k, v in step.items()}, [7, 8]) == pytest.approx(0.05)


def test_the_context_reaches_vllm_in_the_prompt() -> None:
    async def main() -> None:
        engine, fake = await loaded(FakeLLM(tokens=2))
        options = TranscribeOptions(context="Speakers: Alice, Bob. Terms: Kubernetes.", language="German")
        await run_to_completion(engine, AUDIO, options, "ctx")
        prompt = fake.renderer.rendered[-1]["prompt"]
        assert prompt == build_prompt(options.context, "German")
        assert "<|im_start|>system\nSpeakers: Alice, Bob. Terms: Kubernetes.<|im_end|>" in prompt
        assert prompt.endswith("language German<asr_text>")

    run(main())
