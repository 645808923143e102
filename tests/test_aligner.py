"""The forced aligner: text side (against qwen-asr's own processor), merging chunk times, the vLLM
aligner's pure parts and its glue over a fake `AsyncLLM`, the aligner's plan and memory share, its
supervision (an aligner failure never takes transcription down), the service filling `words`, and the
CPU aligner over the tiny real checkpoint.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from qwenasr_appliance.aligner.base import (
    AlignedChunk,
    AlignedUnit,
    Aligner,
    AlignerDeadError,
    AlignerDescription,
    AlignerRequestError,
    check_align_input,
    merge_chunks,
    spread_instants,
)
from qwenasr_appliance.aligner.text import (
    build_align_prompt,
    fix_timestamps,
    split_space_language,
    split_units,
    units_from_bins,
)
from qwenasr_appliance.aligner.vllm import (
    ARCHITECTURE,
    VLLMAligner,
    build_aligner_engine_args,
    build_pooling_kwargs,
    derive_max_model_len,
    timestamp_bins,
    timestamp_config,
)
from qwenasr_appliance.api.error_mapping import to_api_error
from qwenasr_appliance.audio.samples import AudioArray
from qwenasr_appliance.config import ConfigError, Settings, load_settings
from qwenasr_appliance.engines.base import EngineDescription, EngineLoadError, EngineOutput, TranscribeOptions
from qwenasr_appliance.metrics import Metrics
from qwenasr_appliance.supervisor.aligner_supervisor import AlignerUnavailable
from qwenasr_appliance.supervisor.plans import NoPlanError, Plan, aligner_plan, plan_chain
from qwenasr_appliance.supervisor.probe import GpuInfo, VramProbe
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.pipeline import RequestStats, TranscriptionRequest, TranscriptionService

GIB = 1024**3
SR = 16_000
TS = 318  # the tiny tokenizer's <timestamp> id (any id works for the fakes)
H100 = VramProbe(gpus=(GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, 1 * GIB, "GPU-1", (9, 0)),))
CPU_PLAN = Plan("cpu-float32", "cpu", "float32", None, None, "ENGINE=cpu")
GPU_PLAN = Plan("vllm-bf16", "vllm", "bfloat16", None, 0.88, "test")


# -- text side ---------------------------------------------------------------------------------------

TEXTS = [
    "Hello, world! This is a test.",
    "It's 3 o'clock -- rock'n'roll... ok?",
    "你好\uff0c世界。我们今天去北京。",
    "我用 iPhone 15 Pro 拍了照片",
    "Ça va? Très bien, merci; à demain!",
    "Привет, как дела?",
    "  spaced   out\ttext\n",
    "!!! ... ---",
    "",
]


def test_units_split_like_qwen_asr() -> None:
    pytest.importorskip("qwen_asr")
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForceAlignProcessor

    processor = Qwen3ForceAlignProcessor()
    for text in TEXTS:
        for language in ("English", "Chinese", "French", ""):
            expected, prompt = processor.encode_timestamp(text, language)
            assert split_units(text, language) == expected, text
            if expected:
                assert build_align_prompt(expected) == prompt


def test_units_are_words_or_cjk_characters_without_punctuation() -> None:
    assert split_space_language("Hello, world!") == ["Hello", "world"]
    assert split_space_language("你好\uff0c世界") == ["你", "好", "世", "界"]
    assert split_space_language("用iPhone拍") == ["用", "iPhone", "拍"]
    assert split_space_language("... !!") == []


def test_japanese_without_nagisa_falls_back_to_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_nagisa(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "nagisa":
            raise ImportError("no nagisa here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nagisa)
    assert split_units("こんにちは、世界 OK", "Japanese") == ["こ", "ん", "に", "ち", "は", "世", "界", "OK"]


def test_prompt_has_two_timestamp_slots_after_each_unit() -> None:
    assert build_align_prompt(["a", "b"]) == (
        "<|audio_start|><|audio_pad|><|audio_end|>a<timestamp><timestamp>b<timestamp><timestamp>"
    )


def test_timestamp_repair_matches_qwen_asr() -> None:
    pytest.importorskip("qwen_asr")
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForceAlignProcessor

    processor = Qwen3ForceAlignProcessor()
    rng = random.Random(7)
    cases: list[list[float]] = [[0.0], [5.0, 1.0], [1.0, 2.0, 3.0], [9.0, 1.0, 1.0, 1.0, 1.0, 2.0]]
    for _ in range(300):
        n = rng.randint(1, 40)
        base = sorted(rng.randint(0, 400) for _ in range(n))
        for _ in range(rng.randint(0, n)):  # some predictions jump around
            base[rng.randrange(n)] = rng.randint(0, 400)
        cases.append([float(v * 80) for v in base])
    for values in cases:
        assert fix_timestamps(values) == processor.fix_timestamp(np.array(values, dtype=np.float32)), values


@given(st.lists(st.integers(0, 5000), max_size=60))
@settings(max_examples=200, deadline=None)
def test_repaired_timestamps_never_decrease(values: list[int]) -> None:
    fixed = fix_timestamps([float(v) for v in values])
    assert len(fixed) == len(values)
    assert all(a <= b for a, b in itertools.pairwise(fixed))


def test_units_from_bins_pairs_start_and_end() -> None:
    units = units_from_bins(["a", "b"], [1, 2, 3, 5], 80.0)
    assert units == [AlignedUnit("a", 0.08, 0.16), AlignedUnit("b", 0.24, 0.4)]
    with pytest.raises(ValueError, match="expected 4 timestamp predictions"):
        units_from_bins(["a", "b"], [1, 2, 3], 80.0)


# -- merging chunks onto the recording's time line ---------------------------------------------------


def test_merge_offsets_clamps_and_orders() -> None:
    chunks = [
        AlignedChunk(30.0, 12.0, [AlignedUnit("c", 1.0, 2.0), AlignedUnit("d", 15.0, 16.0)]),  # d past its chunk
        AlignedChunk(0.0, 30.0, [AlignedUnit("a", 1.0, 1.5), AlignedUnit("b", 0.5, 0.4)]),  # b goes backwards
    ]
    merged = merge_chunks(chunks, 40.0)
    assert [u.text for u in merged] == ["a", "b", "c", "d"]
    assert merged[0] == AlignedUnit("a", 1.0, 1.5)
    # b went backwards: it starts where a ends, with no length, so it gets the room after it (0.3 s at most).
    assert merged[1] == AlignedUnit("b", 1.5, 1.8)
    assert merged[2] == AlignedUnit("c", 31.0, 32.0)
    # d lies past its chunk (which ends at 42 s) and the audio (40 s): it ends the audio, in the time it
    # takes from the end of c (at most 0.3 s), never with zero length.
    assert merged[3] == AlignedUnit("d", pytest.approx(39.7), 40.0)


unit_strategy = st.builds(
    AlignedUnit,
    st.text(min_size=1, max_size=3),
    st.floats(-5, 300, allow_nan=False),
    st.floats(-5, 300, allow_nan=False),
)


@given(
    st.lists(st.tuples(st.floats(0.1, 30.0), st.lists(unit_strategy, max_size=8)), max_size=6),
    st.floats(0.0, 200.0),
)
@settings(max_examples=200, deadline=None)
def test_merged_times_are_monotonic_and_inside_the_audio(
    spans: list[tuple[float, list[AlignedUnit]]], duration: float
) -> None:
    chunks, offset = [], 0.0
    for length, units in spans:
        chunks.append(AlignedChunk(offset, length, units))
        offset += length
    merged = merge_chunks(chunks, duration)
    assert len(merged) == sum(len(units) for _, units in spans)
    assert all(0.0 <= u.start <= u.end <= max(duration, 0.0) for u in merged)
    assert all(a.end <= b.start + 1e-9 for a, b in itertools.pairwise(merged)), "units overlap"
    if duration > 1e-9:
        assert all(u.end > u.start for u in merged), "a unit of zero length"


def test_align_input_is_limited_to_what_the_aligner_takes() -> None:
    assert check_align_input(np.zeros(SR * 2, dtype=np.float32)) == 2.0
    with pytest.raises(AlignerRequestError, match="at most 180 s"):
        check_align_input(np.zeros(SR * 181, dtype=np.float32))
    with pytest.raises(AlignerRequestError, match="mono"):
        check_align_input(np.zeros((SR, 2), dtype=np.float32))


# -- settings and plans ---------------------------------------------------------------------------------


def test_aligner_settings() -> None:
    settings = load_settings({"ALIGNER_MODEL_ID": " /models/aligner ", "ALIGNER_GPU_MEMORY_UTILIZATION": "0.2"})
    assert settings.aligner_model_id == "/models/aligner" and settings.aligner_gpu_memory_utilization == 0.2
    assert load_settings({}).aligner_model_id == ""
    with pytest.raises(ConfigError, match=r"^ALIGNER_GPU_MEMORY_UTILIZATION:"):
        load_settings({"ALIGNER_GPU_MEMORY_UTILIZATION": "0"})
    with pytest.raises(ConfigError, match=r"^CHUNK_SECONDS: must be at most 180 when ALIGNER_MODEL_ID"):
        load_settings({"ALIGNER_MODEL_ID": "x", "CHUNK_SECONDS": "300"})
    assert load_settings({"CHUNK_SECONDS": "300"}).chunk_seconds == 300  # fine without an aligner


def test_the_asr_plan_leaves_room_for_the_aligner() -> None:
    alone = plan_chain(Settings(), H100, vllm_available=True, cpu_available=True)
    assert alone[0].name == "vllm-bf16" and alone[0].gpu_memory_utilization == 0.90
    beside = plan_chain(Settings(aligner_model_id="a"), H100, vllm_available=True, cpu_available=True)
    first = beside[0]
    assert first.name == "vllm-bf16-util0.86" and first.gpu_memory_utilization == 0.86
    assert "kept for the forced aligner" in first.reason
    small = plan_chain(
        Settings(aligner_model_id="a", gpu_memory_utilization=0.5), H100, vllm_available=True, cpu_available=True
    )
    assert small[0].gpu_memory_utilization == 0.5  # fits beside the aligner as configured


def test_aligner_plan_follows_the_asr_engine() -> None:
    settings = Settings(aligner_model_id="a")
    assert aligner_plan(settings, CPU_PLAN, VramProbe()) == Plan(
        "aligner-cpu-float32", "cpu", "float32", None, None, "the ASR model runs on the CPU"
    )
    after_asr = VramProbe(gpus=(GpuInfo(0, "H100", 80 * GIB, 9 * GIB, 71 * GIB, "GPU-1", (9, 0)),))
    plan = aligner_plan(settings, GPU_PLAN, after_asr)
    assert plan == Plan("aligner-vllm-bf16", "vllm", "bfloat16", None, 0.10, "ALIGNER_GPU_MEMORY_UTILIZATION")
    tight = VramProbe(gpus=(GpuInfo(0, "H100", 80 * GIB, 6 * GIB, 74 * GIB, "GPU-1", (9, 0)),))
    lowered = aligner_plan(settings, GPU_PLAN, tight)
    assert lowered.name == "aligner-vllm-bf16-util0.06" and lowered.gpu_memory_utilization == 0.06
    assert lowered.reason.startswith("ALIGNER_GPU_MEMORY_UTILIZATION=0.10 needs")
    full = VramProbe(gpus=(GpuInfo(0, "H100", 80 * GIB, 1 * GIB, 79 * GIB, "GPU-1", (9, 0)),))
    with pytest.raises(NoPlanError, match="no room for the forced aligner"):
        aligner_plan(settings, GPU_PLAN, full)


# -- the vLLM aligner: pure parts -----------------------------------------------------------------


def test_vllm_engine_args_run_the_native_aligner_on_the_pooling_runner() -> None:
    settings = Settings(aligner_model_id="Qwen/Qwen3-ForcedAligner-0.6B", enforce_eager=False)
    plan = Plan("aligner-vllm-bf16", "vllm", "bfloat16", None, 0.07, "test")
    args = build_aligner_engine_args(settings, plan)
    assert args["model"] == "Qwen/Qwen3-ForcedAligner-0.6B"
    assert args["runner"] == "pooling" and args["hf_overrides"] == {"architectures": [ARCHITECTURE]}
    assert args["pooler_config"] == {"tok_pooling_type": "STEP"}
    assert args["gpu_memory_utilization"] == 0.07 and args["dtype"] == "bfloat16"
    # Never the stat logger: it would unregister the ASR engine's vllm:* metrics in this process.
    assert args["disable_log_stats"] is True
    assert args["enforce_eager"] is True and args["enable_prefix_caching"] is False
    assert args["max_num_batched_tokens"] >= args["max_model_len"]
    assert build_pooling_kwargs(TS) == {"task": "token_classify", "use_activation": False, "step_tag_id": TS}


def test_max_model_len_covers_the_chunk_and_its_transcript() -> None:
    assert derive_max_model_len(Settings()) == 5120  # 390 audio tokens + 8 x 512 + 16, rounded up
    assert derive_max_model_len(Settings(chunk_seconds=180, max_new_tokens=64)) == 3072
    assert derive_max_model_len(Settings(max_new_tokens=32768)) == 65536


def test_timestamp_bins_from_step_or_all_pooling() -> None:
    tokens = [1, 5, TS, TS, 6, TS, TS]
    step_rows = np.eye(10, dtype=np.float32)[[3, 4, 4, 9]]
    assert timestamp_bins(step_rows, tokens, TS) == [3, 4, 4, 9]
    all_rows = np.eye(10, dtype=np.float32)[[0, 0, 3, 4, 0, 4, 9]]
    assert timestamp_bins(all_rows, tokens, TS) == [3, 4, 4, 9]
    with pytest.raises(AlignerRequestError, match="returned 2 rows"):
        timestamp_bins(step_rows[:2], tokens, TS)


def test_timestamp_config_needs_an_aligner_checkpoint() -> None:
    config = type("Config", (), {"timestamp_token_id": TS, "timestamp_segment_time": 80})()
    assert timestamp_config(config) == (TS, 80.0)
    with pytest.raises(EngineLoadError, match="Qwen3-ForcedAligner") as error:
        timestamp_config(object())
    assert error.value.kind == "unsupported"


# -- the vLLM aligner over a fake AsyncLLM --------------------------------------------------------


@dataclass
class FakeOutput:
    data: Any


@dataclass
class FakePooling:
    outputs: FakeOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class FakeRenderer:
    rendered: list[dict[str, Any]] = field(default_factory=list)

    async def render_cmpl_async(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.rendered.extend(prompts)
        return [{"rendered": prompt} for prompt in prompts]


class FakePoolingLLM:
    """`encode` answers STEP pooling: one row per <timestamp> slot, bins counting up from `first_bin`."""

    def __init__(self, first_bin: int = 2, fail: BaseException | None = None) -> None:
        self.renderer = FakeRenderer()
        self.errored = False
        self.fail = fail
        self.first_bin = first_bin
        self.params: list[Any] = []
        self.shutdowns = 0
        hf_config = type("HF", (), {"timestamp_token_id": TS, "timestamp_segment_time": 80})()
        model_config = type("MC", (), {"hf_config": hf_config, "dtype": "torch.bfloat16"})()
        self.vllm_config = type("VC", (), {"model_config": model_config})()

    async def encode(self, engine_input: Any, params: Any, request_id: str) -> AsyncIterator[FakePooling]:
        self.params.append(params)
        if self.fail is not None:
            raise self.fail
        prompt = engine_input["rendered"]["prompt"]
        slots = prompt.count("<timestamp>")
        tokens = [1] * 3 + [t for _ in range(slots // 2) for t in (7, TS, TS)]
        rows = np.eye(64, dtype=np.float32)[[min(63, self.first_bin + i) for i in range(slots)]]
        yield FakePooling(FakeOutput(rows), tokens)

    async def abort(self, request_ids: Any) -> None:
        return None

    def shutdown(self) -> None:
        self.shutdowns += 1


def vllm_aligner(llm: FakePoolingLLM) -> VLLMAligner:
    settings = Settings(aligner_model_id="aligner")
    plan = Plan("aligner-vllm-bf16", "vllm", "bfloat16", None, 0.1, "test")
    return VLLMAligner(settings, plan, llm_factory=lambda _args: llm, params_factory=dict)


def test_vllm_aligner_loads_warms_up_and_aligns() -> None:
    llm = FakePoolingLLM()

    async def scenario() -> list[AlignedUnit]:
        aligner = vllm_aligner(llm)
        assert isinstance(aligner, Aligner)
        await aligner.load()
        assert llm.renderer.rendered[0]["prompt"].endswith("warm<timestamp><timestamp>up<timestamp><timestamp>")
        units = await aligner.align(np.zeros(SR * 3, dtype=np.float32), "Hello, big world!", "English")
        description = aligner.describe()
        assert description.name == "vllm" and description.dtype == "bfloat16"
        assert description.details["timestamp_segment_ms"] == 80.0
        await aligner.close()
        assert llm.shutdowns == 1
        with pytest.raises(AlignerDeadError, match="closed"):
            await aligner.align(np.zeros(SR, dtype=np.float32), "x", "English")
        return units

    units = asyncio.run(scenario())
    assert [u.text for u in units] == ["Hello", "big", "world"]
    assert [(u.start, u.end) for u in units] == [(0.16, 0.24), (0.32, 0.4), (0.48, 0.56)]
    audio = llm.renderer.rendered[-1]["multi_modal_data"]["audio"]
    assert audio[1] == SR and audio[0].dtype == np.float32
    assert llm.params[-1] == {"task": "token_classify", "use_activation": False, "step_tag_id": TS}


def test_vllm_aligner_failures() -> None:
    async def scenario() -> None:
        llm = FakePoolingLLM()
        aligner = vllm_aligner(llm)
        await aligner.load()
        assert await aligner.align(np.zeros(SR, dtype=np.float32), "?!", "English") == []  # nothing to time
        llm.fail = ValueError("prompt too long")
        with pytest.raises(AlignerRequestError, match="prompt too long"):
            await aligner.align(np.zeros(SR, dtype=np.float32), "a b", "English")
        llm.errored = True
        with pytest.raises(AlignerDeadError):
            await aligner.align(np.zeros(SR, dtype=np.float32), "a b", "English")

        not_an_aligner = FakePoolingLLM()
        not_an_aligner.vllm_config.model_config.hf_config = object()
        with pytest.raises(EngineLoadError, match="Qwen3-ForcedAligner") as error:
            await vllm_aligner(not_an_aligner).load()
        assert error.value.kind == "unsupported" and not_an_aligner.shutdowns == 1

        def broken_factory(_args: dict[str, Any]) -> Any:
            raise RuntimeError("CUDA out of memory")

        broken = VLLMAligner(Settings(aligner_model_id="a"), GPU_PLAN, llm_factory=broken_factory)
        with pytest.raises(EngineLoadError) as error:
            await broken.load()
        assert error.value.kind == "out_of_memory"

    asyncio.run(scenario())


# -- supervision -------------------------------------------------------------------------------------


@dataclass
class FakeEngine:
    loaded: bool = False

    async def load(self) -> None:
        self.loaded = True

    async def stream(
        self, audio: AudioArray, options: TranscribeOptions, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        seconds = len(audio) / SR
        yield EngineOutput(raw_text=f"language English<asr_text>one two three, {seconds:.0f} seconds.")

    async def abort(self, request_id: str) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> EngineDescription:
        return EngineDescription("test-double", "fake", "none", "none", None, 4)


@dataclass
class FakeAligner:
    """Aligner test double: each unit gets 0.5 s from the chunk start (past the end for long texts)."""

    plan: Plan
    load_error: Exception | None = None
    align_error: Exception | None = None
    gate: asyncio.Event | None = None
    calls: list[tuple[float, str, str]] = field(default_factory=list)
    closed: bool = False

    async def load(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.load_error is not None:
            raise self.load_error

    async def align(self, audio: AudioArray, text: str, language: str) -> list[AlignedUnit]:
        self.calls.append((len(audio) / SR, text, language))
        if self.align_error is not None:
            raise self.align_error
        return [AlignedUnit(word, 0.5 * i, 0.5 * i + 0.4) for i, word in enumerate(split_units(text, language))]

    async def close(self) -> None:
        self.closed = True

    def describe(self) -> AlignerDescription:
        return AlignerDescription("test-double", "fake-aligner", "none", "none", {"plan": self.plan.name})


def make_supervisor(
    settings: Settings, make_aligner: Callable[[Plan], FakeAligner]
) -> tuple[EngineSupervisor, list[FakeAligner]]:
    made: list[FakeAligner] = []

    def aligner_factory(plan: Plan, _settings: Settings) -> FakeAligner:
        made.append(make_aligner(plan))
        return made[-1]

    supervisor = EngineSupervisor(
        settings,
        engine_factory=lambda _plan, _settings: FakeEngine(),  # type: ignore[arg-type, return-value]
        aligner_factory=aligner_factory,  # type: ignore[arg-type]
        probe=lambda: VramProbe(no_gpu="no GPU"),
        metrics=Metrics(CollectorRegistry()),
        vllm_available=False,
        cpu_available=True,
    )
    return supervisor, made


async def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_without_an_aligner_it_is_disabled() -> None:
    async def scenario() -> None:
        supervisor, made = make_supervisor(Settings(engine="cpu"), lambda plan: FakeAligner(plan))
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        status = supervisor.aligner.snapshot()
        assert status.state == "disabled" and not status.ready and status.model is None and not made
        with pytest.raises(AlignerUnavailable, match="set ALIGNER_MODEL_ID"):
            supervisor.aligner.require()
        await supervisor.stop()
        assert supervisor.aligner.state == "disabled"

    asyncio.run(scenario())


def test_the_aligner_loads_after_the_model_and_never_blocks_readiness() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        settings = Settings(engine="cpu", aligner_model_id="/models/aligner")
        supervisor, made = make_supervisor(settings, lambda plan: FakeAligner(plan, gate=gate))
        assert supervisor.aligner.state == "waiting"
        await supervisor.start()
        assert await supervisor.wait_ready(5)  # the model serves while the aligner still loads
        await wait_for(lambda: supervisor.aligner.state == "loading")
        with pytest.raises(AlignerUnavailable, match="loading") as unavailable:
            supervisor.aligner.require()
        assert unavailable.value.retry_after_seconds > 0
        gate.set()
        await wait_for(lambda: supervisor.aligner.ready)
        assert supervisor.aligner.require() is made[0]
        status = supervisor.aligner.snapshot()
        assert (status.state, status.plan, status.model, status.error) == (
            "ready", "aligner-cpu-float32", "/models/aligner", None
        )  # fmt: skip
        assert made[0].plan.engine == "cpu"
        await supervisor.stop()
        assert supervisor.aligner.state == "stopped" and made[0].closed

    asyncio.run(scenario())


def test_an_aligner_failure_leaves_transcription_serving() -> None:
    async def scenario() -> None:
        settings = Settings(engine="cpu", aligner_model_id="/nowhere")
        error = EngineLoadError("model_not_found", "model directory '/nowhere' does not exist")
        supervisor, made = make_supervisor(settings, lambda plan: FakeAligner(plan, load_error=error))
        await supervisor.start()
        await wait_for(lambda: supervisor.aligner.state == "failed")
        assert supervisor.ready and supervisor.state == "ready"
        status = supervisor.aligner.snapshot()
        assert status.error == "aligner-cpu-float32: model_not_found (model directory '/nowhere' does not exist)"
        with pytest.raises(AlignerUnavailable, match="failed: aligner-cpu-float32: model_not_found") as failure:
            supervisor.aligner.require()
        api_error = to_api_error(failure.value)
        assert api_error.status_code == 503 and api_error.code == "aligner_unavailable"
        assert "Retry-After" in api_error.headers and "/nowhere" in api_error.message
        assert made[0].closed
        await supervisor.stop()

    asyncio.run(scenario())


def test_a_dead_aligner_is_reloaded() -> None:
    async def scenario() -> None:
        settings = Settings(engine="cpu", aligner_model_id="a", engine_restart_backoff_seconds=0.0)
        supervisor, made = make_supervisor(settings, lambda plan: FakeAligner(plan))
        await supervisor.start()
        await wait_for(lambda: supervisor.aligner.ready)
        first = made[0]
        await supervisor.aligner.report_dead(first, AlignerDeadError("worker gone"))
        await supervisor.aligner.report_dead(first, AlignerDeadError("worker gone"))  # reported twice: one reload
        assert supervisor.aligner.state in ("restarting", "ready")
        await wait_for(lambda: supervisor.aligner.ready)
        assert len(made) == 2 and first.closed and supervisor.aligner.require() is made[1]
        assert supervisor.aligner.snapshot().restarts == 1
        await supervisor.stop()

    asyncio.run(scenario())


# -- the service fills `words` ---------------------------------------------------------------------------


def wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * SR)) / SR
    signal = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, signal, SR, format="WAV", subtype="PCM_16")
    return out.getvalue()


def request(audio: bytes, *, words: bool = True) -> TranscriptionRequest:
    return TranscriptionRequest(
        audio=audio, filename="a.wav", language=None, prompt="",
        temperature=0.0, stream=False, word_timestamps=words,
    )  # fmt: skip


def test_service_aligns_every_chunk_and_keeps_words_inside_the_audio() -> None:
    async def scenario() -> None:
        settings = Settings(engine="cpu", aligner_model_id="a", chunk_seconds=5.0)
        supervisor, made = make_supervisor(settings, lambda plan: FakeAligner(plan))
        metrics = Metrics(CollectorRegistry())
        service = TranscriptionService(
            settings, supervisor, AdmissionController(max_concurrent=4, max_queue=8, queue_timeout=5.0), metrics=metrics
        )
        try:
            await supervisor.start()
            await wait_for(lambda: supervisor.aligner.ready)
            transcript = await service.transcribe(request(wav(12.0)), "req-1", RequestStats())
            plain = await service.transcribe(request(wav(2.0), words=False), "req-2", RequestStats())
        finally:
            service.close()
            await supervisor.stop()
        assert plain.words is None
        words = transcript.words
        assert words is not None and len(made[0].calls) == len(transcript.segments) >= 3
        assert all(language == "English" for _, _, language in made[0].calls)
        assert [w.word for w in words[:4]] == ["one", "two", "three", str(round(made[0].calls[0][0]))]
        assert all(0.0 <= w.start <= w.end <= transcript.duration for w in words)
        assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(words))
        second = transcript.segments[1]
        in_second = [w for w in words if second.start <= w.start < second.end]
        assert in_second and in_second[0].start == pytest.approx(second.start)  # offset by the chunk start
        assert metrics.stage_duration.labels(stage="align")._sum.get() > 0

    asyncio.run(scenario())


def test_service_answers_aligner_failures_without_hurting_the_engine() -> None:
    async def scenario() -> None:
        settings = Settings(engine="cpu", aligner_model_id="a", engine_restart_backoff_seconds=0.0)
        supervisor, made = make_supervisor(
            settings, lambda plan: FakeAligner(plan, align_error=AlignerDeadError("the worker died"))
        )
        service = TranscriptionService(
            settings, supervisor, AdmissionController(max_concurrent=4, max_queue=8, queue_timeout=5.0)
        )
        try:
            await supervisor.start()
            await wait_for(lambda: supervisor.aligner.ready)
            with pytest.raises(AlignerDeadError) as dead:
                await service.transcribe(request(wav(2.0)), "req-1", RequestStats())
            assert to_api_error(dead.value).code == "aligner_restarting"
            assert supervisor.ready  # the ASR engine serves on
            await wait_for(lambda: len(made) == 2)
            made[1].align_error = AlignerRequestError("bad input")
            await wait_for(lambda: supervisor.aligner.ready)
            with pytest.raises(AlignerRequestError) as failed:
                await service.transcribe(request(wav(2.0)), "req-2", RequestStats())
            assert to_api_error(failed.value).status_code == 500
            assert (await service.transcribe(request(wav(2.0), words=False), "req-3", RequestStats())).text
        finally:
            service.close()
            await supervisor.stop()

    asyncio.run(scenario())


# -- the CPU aligner over the tiny real checkpoint ----------------------------------------------------


@pytest.mark.slow
def test_cpu_aligner_over_the_tiny_checkpoint(tiny_aligner_dir: Path, tiny_model_dir: Path) -> None:
    from qwenasr_appliance.aligner.cpu import CPUAligner

    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(SR * 4) * 0.1).astype(np.float32)

    async def scenario() -> None:
        aligner = CPUAligner(Settings(aligner_model_id=str(tiny_aligner_dir), cpu_threads=1))
        await aligner.load()
        description = aligner.describe()
        assert description.name == "cpu" and description.details["timestamp_segment_ms"] == 80.0
        english = await aligner.align(audio, "And so, my fellow Americans: ask not!", "English")
        assert [u.text for u in english] == ["And", "so", "my", "fellow", "Americans", "ask", "not"]
        assert all(
            a.start <= b.start and u.start <= u.end for a, b, u in zip(english, english[1:], english, strict=False)
        )
        chinese = await aligner.align(audio, "你好\uff0c世界", "Chinese")
        assert [u.text for u in chinese] == ["你", "好", "世", "界"]
        merged = merge_chunks([AlignedChunk(10.0, 4.0, english)], 14.0)
        assert all(10.0 <= u.start <= u.end <= 14.0 for u in merged)
        assert await aligner.align(audio[:800], "short", "English")  # padded to the minimum length
        assert await aligner.align(audio, "   ", "English") == []
        with pytest.raises(AlignerRequestError, match="at most 180 s"):
            await aligner.align(np.zeros(SR * 200, dtype=np.float32), "x", "English")
        await aligner.close()
        with pytest.raises(AlignerDeadError):
            await aligner.align(audio, "x", "English")

        for model_id, kind, message in (
            ("/nonexistent/aligner", "model_not_found", "does not exist"),
            (str(tiny_model_dir), "unsupported", "not a Qwen3-ForcedAligner"),
        ):
            with pytest.raises(EngineLoadError, match=re.escape(message)) as error:
                await CPUAligner(Settings(aligner_model_id=model_id)).load()
            assert error.value.kind == kind

    asyncio.run(scenario())


def test_zero_length_units_at_different_instants_keep_their_own_instants() -> None:
    units = [AlignedUnit("a", 6.8, 6.8), AlignedUnit("b", 26.5, 26.5), AlignedUnit("c", 51.8, 51.8)]
    spread = spread_instants(units, 70.0)
    assert [t for u in spread for t in (u.start, u.end)] == pytest.approx([6.8, 7.1, 26.5, 26.8, 51.8, 52.1])


def test_zero_length_units_at_one_instant_share_the_room_around_it() -> None:
    at_end = spread_instants([AlignedUnit("a", 1.0, 2.0), AlignedUnit("b", 3.0, 3.0), AlignedUnit("c", 3.0, 3.0)], 3.0)
    assert [(u.start, u.end) for u in at_end] == [
        (1.0, 2.0),
        (pytest.approx(2.4), pytest.approx(2.7)),
        (pytest.approx(2.7), 3.0),
    ]
    squeezed = spread_instants(
        [AlignedUnit("a", 1.0, 2.0), AlignedUnit("b", 2.0, 2.0), AlignedUnit("c", 2.0, 3.0)], 3.0
    )
    assert [(u.start, u.end) for u in squeezed] == [(1.0, 1.7), (1.7, 2.0), (2.0, 3.0)]
    assert spread_instants([AlignedUnit("a", 0.0, 0.0)], 0.0) == [AlignedUnit("a", 0.0, 0.0)]
