"""The CPU engine on the tiny real checkpoint: loading, transcription, streaming, abort, failures.

Each test runs its own event loop (`asyncio.run`); the loaded engine is shared by the module, which
also shows that the engine does not depend on the loop that loaded it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
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
from qwenasr_appliance.engines.cpu import engine as cpu_engine
from qwenasr_appliance.engines.cpu.engine import CPUEngine
from qwenasr_appliance.engines.cpu.loading import load_failure_kind
from qwenasr_appliance.engines.prompt import build_prompt, parse_output
from qwenasr_appliance.engines.repetition import find_loops

pytestmark = pytest.mark.slow
T = TypeVar("T")
LONG = 3000  # tokens: seconds of work for the tiny model unless something stops it


def run(awaitable: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await awaitable

    return asyncio.run(wrapper())


def tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds), dtype=np.float32) / 16000
    return (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[CPUEngine]:
    import torch

    threads = torch.get_num_threads()
    loaded = CPUEngine(Settings(model_id=str(tiny_model_dir), cpu_threads=1))
    run(loaded.load())
    yield loaded
    run(loaded.close())
    torch.set_num_threads(threads)


@pytest.fixture
def no_loop_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model falls into loops; without the guard a long request really runs long."""
    monkeypatch.setattr(cpu_engine, "_LOOP_MIN_COUNT", 10**6)


async def collect(engine: CPUEngine, options: TranscribeOptions, request_id: str) -> list[EngineOutput]:
    return [output async for output in engine.stream(tone(1.5), options, request_id)]


def test_transcribes_audio_end_to_end(engine: CPUEngine) -> None:
    assert isinstance(engine, Engine)
    started = time.perf_counter()
    output = run(run_to_completion(engine, tone(1.5), TranscribeOptions(max_new_tokens=12), "plain"))
    assert time.perf_counter() - started < 5
    assert output.finished
    assert output.output_tokens == 12  # the tiny model never emits EOS
    assert output.raw_text and output.raw_text.isprintable()
    again = run(run_to_completion(engine, tone(1.5), TranscribeOptions(max_new_tokens=12), "plain"))
    assert again.raw_text == output.raw_text  # greedy decoding is deterministic


def test_streams_cumulative_text_that_ends_in_the_final_output(engine: CPUEngine) -> None:
    outputs = run(collect(engine, TranscribeOptions(max_new_tokens=10), "streamed"))
    partial, final = outputs[:-1], outputs[-1]
    assert final.finished and final.output_tokens == 10
    assert len(partial) >= 5 and not any(o.finished for o in partial)
    texts = [o.raw_text for o in outputs]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert partial[-1].raw_text == final.raw_text
    assert [o.output_tokens for o in partial] == sorted(o.output_tokens for o in partial)


def test_language_context_and_sampling_options(engine: CPUEngine) -> None:
    forced = TranscribeOptions(language="English", context="Alice and Bob", max_new_tokens=6)
    output = run(run_to_completion(engine, tone(1.0), forced, "forced"))
    assert output.finished and output.output_tokens == 6
    assert parse_output(output.raw_text, "English").language == "English"
    sampled = run(run_to_completion(engine, tone(1.0), TranscribeOptions(temperature=0.7, max_new_tokens=6), "hot"))
    assert sampled.finished and 1 <= sampled.output_tokens <= 6


def test_an_assistant_prefix_is_continued_greedily(engine: CPUEngine) -> None:
    """Live re-decoding: with the first tokens of its own output as the prefix, the model goes on with the
    rest of the same output, and `raw_text` holds only the continuation (the tiny tokenizer is bytes)."""
    whole = run(run_to_completion(engine, tone(1.5), TranscribeOptions(max_new_tokens=12), "whole"))
    prefix = whole.raw_text[:6]
    options = TranscribeOptions(max_new_tokens=6, assistant_prefix=prefix)
    continued = run(run_to_completion(engine, tone(1.5), options, "continued"))
    assert prefix + continued.raw_text == whole.raw_text
    assert continued.output_tokens == 6


@pytest.mark.parametrize("samples", [0, 1, 150, 7999])
def test_short_audio_is_padded_rather_than_failing(engine: CPUEngine, samples: int) -> None:
    audio = np.zeros(samples, dtype=np.float32)
    output = run(run_to_completion(engine, audio, TranscribeOptions(max_new_tokens=2), f"short-{samples}"))
    assert output.finished and output.output_tokens == 2


def test_a_runaway_loop_is_stopped_and_collapsed(engine: CPUEngine) -> None:
    output = run(run_to_completion(engine, tone(1.5), TranscribeOptions(max_new_tokens=LONG), "loop"))
    assert output.finished
    assert output.output_tokens < LONG  # the loop guard ended it
    assert output.finish_reason == "repetition"
    text = parse_output(output.raw_text, None).text
    assert len(text) < len(output.raw_text)
    assert find_loops(text) == []


def test_the_token_limit_is_reported_as_length(engine: CPUEngine) -> None:
    output = run(run_to_completion(engine, tone(1.5), TranscribeOptions(max_new_tokens=3), "limit"))
    assert output.output_tokens == 3
    assert output.finish_reason == "length"


@pytest.mark.parametrize("language", [None, "English"])
def test_confidence_is_computed_from_the_model_only_when_asked(engine: CPUEngine, language: str | None) -> None:
    import torch

    plain = run(run_to_completion(engine, tone(1.0), TranscribeOptions(max_new_tokens=6, language=language), "p"))
    assert plain.logprobs is None
    assert plain.no_speech_prob is None
    options = TranscribeOptions(max_new_tokens=6, language=language, logprobs=True)
    output = run(run_to_completion(engine, tone(1.0), options, "c"))
    assert output.raw_text == plain.raw_text  # asking for confidence changes nothing in the text
    assert output.logprobs is not None
    assert len(output.logprobs) == output.output_tokens
    assert all(item.logprob <= 0.0 for item in output.logprobs)
    assert "".join(item.token for item in output.logprobs) == output.raw_text
    # The same numbers straight from the model: a forward pass over prompt + output.
    asr = engine._asr
    inputs = asr.processor(text=[build_prompt("", language)], audio=[tone(1.0)], return_tensors="pt", padding=True)
    prompt_length = int(inputs["input_ids"].shape[1])
    ids = asr.processor.tokenizer.encode(output.raw_text, add_special_tokens=False)
    generated = run(run_to_completion(engine, tone(1.0), options, "c2"))
    assert generated == output  # deterministic
    assert len(ids) == output.output_tokens  # the tiny tokenizer re-encodes this output to the same ids
    full = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    with torch.inference_mode():
        logits = asr.model.thinker(
            input_ids=full,
            input_features=inputs["input_features"],
            feature_attention_mask=inputs["feature_attention_mask"],
        ).logits
    expected = torch.log_softmax(logits[0, prompt_length - 1 : -1].float(), dim=-1)
    expected_chosen = expected[torch.arange(len(ids)), torch.tensor(ids)].tolist()
    assert [item.logprob for item in output.logprobs] == pytest.approx(expected_chosen, abs=1e-3)
    if output.no_speech_prob is not None:
        assert 0.0 <= output.no_speech_prob <= 1.0


@pytest.mark.usefixtures("no_loop_guard")
def test_abort_stops_a_running_request(engine: CPUEngine) -> None:
    async def scenario() -> tuple[list[EngineOutput], float]:
        outputs: list[EngineOutput] = []
        stream = engine.stream(tone(1.5), TranscribeOptions(max_new_tokens=LONG), "long")
        async for output in stream:
            outputs.append(output)
            if len(outputs) == 3:
                aborted_at = time.perf_counter()
                await engine.abort("long")
        return outputs, time.perf_counter() - aborted_at

    outputs, stop_seconds = run(scenario())
    assert stop_seconds < 1.0
    assert not outputs[-1].finished and outputs[-1].output_tokens < LONG
    after = run(run_to_completion(engine, tone(1.0), TranscribeOptions(max_new_tokens=4), "after-abort"))
    assert after.finished


@pytest.mark.usefixtures("no_loop_guard")
def test_abort_drops_a_queued_request_and_run_to_completion_reports_it(engine: CPUEngine) -> None:
    async def scenario() -> tuple[list[EngineOutput], BaseException | None]:
        long = asyncio.create_task(collect(engine, TranscribeOptions(max_new_tokens=LONG), "running"))
        await asyncio.sleep(0.2)  # "running" holds the worker
        queued = asyncio.create_task(run_to_completion(engine, tone(1.0), TranscribeOptions(), "queued"))
        await asyncio.sleep(0.05)
        await engine.abort("queued")
        failure = None
        try:
            await queued
        except EngineRequestError as exc:
            failure = exc
        assert not long.done()  # dropping the queued request did not touch the running one
        await engine.abort("running")
        return await long, failure

    running_outputs, failure = run(scenario())
    assert isinstance(failure, EngineRequestError)
    assert not running_outputs[-1].finished


@pytest.mark.usefixtures("no_loop_guard")
def test_leaving_the_stream_early_stops_the_work(engine: CPUEngine) -> None:
    async def scenario() -> float:
        stream = engine.stream(tone(1.5), TranscribeOptions(max_new_tokens=LONG), "left")
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        started = time.perf_counter()
        await run_to_completion(engine, tone(1.0), TranscribeOptions(max_new_tokens=2), "next")
        return time.perf_counter() - started

    assert run(scenario()) < 1.0  # the next request did not wait for 3000 tokens


@pytest.mark.usefixtures("no_loop_guard")
def test_the_event_loop_stays_responsive_during_generation(engine: CPUEngine) -> None:
    async def scenario() -> float:
        work = asyncio.create_task(collect(engine, TranscribeOptions(max_new_tokens=400), "busy"))
        largest_gap, last = 0.0, time.perf_counter()
        while not work.done():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            largest_gap, last = max(largest_gap, now - last), now
        assert (await work)[-1].finished
        return largest_gap

    assert run(scenario()) < 0.1


def test_a_duplicate_request_id_is_refused(engine: CPUEngine) -> None:
    async def scenario() -> None:
        first = engine.stream(tone(1.0), TranscribeOptions(max_new_tokens=50), "same")
        await first.__anext__()  # type: ignore[attr-defined]
        with pytest.raises(EngineRequestError):
            await run_to_completion(engine, tone(1.0), TranscribeOptions(max_new_tokens=2), "same")
        await first.aclose()  # type: ignore[attr-defined]

    run(scenario())


def test_describe(engine: CPUEngine, tiny_model_dir: Path) -> None:
    description = engine.describe()
    assert (description.name, description.device, description.dtype) == ("cpu", "cpu", "float32")
    assert description.model == str(tiny_model_dir)
    assert description.quantization is None and description.max_concurrency == 1
    assert description.details["torch_threads"] == 1  # CPU_THREADS=1 was applied


def test_bfloat16_lifecycle_and_closed_engine(tiny_model_dir: Path) -> None:
    engine = CPUEngine(Settings(model_id=str(tiny_model_dir), dtype="bfloat16"))

    async def scenario() -> None:
        with pytest.raises(EngineDeadError):
            await run_to_completion(engine, tone(1.0), TranscribeOptions(), "too-early")
        await engine.load()
        await engine.load()  # loading twice is a no-op
        assert engine.describe().dtype == "bfloat16"
        output = await run_to_completion(engine, tone(1.0), TranscribeOptions(max_new_tokens=3), "bf16")
        assert output.finished and output.output_tokens == 3
        await engine.close()
        await engine.close()
        with pytest.raises(EngineDeadError):
            await run_to_completion(engine, tone(1.0), TranscribeOptions(), "too-late")

    run(scenario())


@pytest.mark.usefixtures("no_loop_guard")
def test_closing_during_a_request_fails_it_as_dead(tiny_model_dir: Path) -> None:
    engine = CPUEngine(Settings(model_id=str(tiny_model_dir)))

    async def scenario() -> None:
        await engine.load()
        work = asyncio.create_task(collect(engine, TranscribeOptions(max_new_tokens=LONG), "cut"))
        await asyncio.sleep(0.2)
        await engine.close()
        with pytest.raises(EngineDeadError):
            await work

    run(scenario())


# ------------------------------------------------------------------------------------- load failures


def load_error(model_id: str) -> EngineLoadError:
    with pytest.raises(EngineLoadError) as caught:
        run(CPUEngine(Settings(model_id=model_id)).load())
    return caught.value


def test_a_missing_directory_is_model_not_found(tmp_path: Path) -> None:
    error = load_error(str(tmp_path / "nowhere"))
    assert error.kind == "model_not_found"
    assert "nowhere" in str(error)


def test_a_home_relative_path_is_expanded(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tiny_model_dir.parent))
    engine = CPUEngine(Settings(model_id=f"~/{tiny_model_dir.name}"))
    run(engine.load())
    run(engine.close())


def test_a_directory_without_a_checkpoint_is_model_not_found(tmp_path: Path) -> None:
    assert load_error(str(tmp_path)).kind == "model_not_found"


def test_a_file_instead_of_a_directory_is_model_not_found(tiny_model_dir: Path) -> None:
    assert load_error(str(tiny_model_dir / "config.json")).kind == "model_not_found"


def test_a_checkpoint_of_another_architecture_is_other(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    assert load_error(str(tmp_path)).kind == "other"


def test_missing_packages_are_import_failures(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "qwen_asr", None)  # makes `import qwen_asr` raise ImportError
    assert load_error(str(tiny_model_dir)).kind == "import"


class HFValidationError(ValueError):
    """Stands in for huggingface_hub's error of the same name."""


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ImportError("no module"), "import"),
        (ModuleNotFoundError("no module"), "import"),
        (MemoryError(), "out_of_memory"),
        (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried 9 GB"), "out_of_memory"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "out_of_memory"),
        (OSError("We couldn't connect to 'https://huggingface.co' to load the files"), "model_not_found"),
        (FileNotFoundError("config.json"), "model_not_found"),
        (HFValidationError("Repo id must be in the form 'repo_name'"), "model_not_found"),
        (ValueError("Unrecognized model in /tmp"), "other"),
        (KeyError("qwen3_asr"), "other"),
    ],
)
def test_load_failure_kinds(exc: BaseException, kind: Any) -> None:
    assert load_failure_kind(exc) == kind


@pytest.mark.parametrize("samples", [32_037, 16_000 * 3 + 159, 48_000, 8_001])
def test_the_cpu_engine_sees_the_feature_frames_vllms_renderer_makes(
    engine: CPUEngine, samples: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM pads each chunk to whole hops before its Whisper feature extractor (ceil(n / 160) frames,
    which `LogMelExtractor` reproduces for the GPU path); qwen-asr's processor alone gives floor(n / 160).
    The CPU engine pads the same way, so both engines see the same frames with the same values."""
    seen: list[Any] = []
    processor = engine._asr.processor

    class Spy:
        def __call__(self, **kwargs: Any) -> Any:
            out = processor(**kwargs)
            seen.append(out)
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(processor, name)

    monkeypatch.setattr(engine._asr, "processor", Spy())
    rng = np.random.default_rng(samples)
    audio = (0.1 * rng.standard_normal(samples)).astype(np.float32)
    run(run_to_completion(engine, audio, TranscribeOptions(max_new_tokens=1), f"frames-{samples}"))
    (inputs,) = seen
    ours = LogMelExtractor()(audio)
    frames = int(inputs["feature_attention_mask"][0].sum())
    assert frames == ours.shape[1] == -(-samples // 160)
    np.testing.assert_allclose(inputs["input_features"][0][:, :frames].float().numpy(), ours, atol=5e-5)


def test_the_context_reaches_the_model_in_the_prompt(engine: CPUEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The `prompt` field is the system turn of what the model reads: checked at the engine's boundary,
    on the token ids handed to `generate()` (the tiny model's words carry no meaning to show it otherwise)."""
    asr = engine._asr
    seen: dict[str, Any] = {}
    generate = asr.model.generate

    def spy(**inputs: Any) -> Any:
        seen["input_ids"] = inputs["input_ids"][0].tolist()
        return generate(**inputs)

    monkeypatch.setattr(asr.model, "generate", spy)
    context = "Speakers: Alice, Bob. Terms: Kubernetes."
    options = TranscribeOptions(language="German", context=context, max_new_tokens=2)
    run(run_to_completion(engine, tone(1.0), options, "context"))
    tokenizer = asr.processor.tokenizer
    prompt = tokenizer.decode(seen["input_ids"], skip_special_tokens=False)
    expected = build_prompt(context, "German")
    head, tail = expected.split("<|audio_pad|>")
    assert prompt.startswith(head) and prompt.endswith(tail)  # the audio placeholder is expanded in between
    assert f"<|im_start|>system\n{context}<|im_end|>" in prompt


def test_loading_reports_each_step_including_the_library_imports(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The imports take seconds on a busy host: /status showed no step meanwhile (a new user's report)."""
    engine = CPUEngine(Settings(model_id=str(tiny_model_dir)))
    steps: list[str] = []
    enter = engine.load_progress.enter

    def recording(step: Any, detail: str | None = None, **kwargs: Any) -> None:
        steps.append(step)
        enter(step, detail, **kwargs)

    monkeypatch.setattr(engine.load_progress, "enter", recording)
    run(engine.load())
    run(engine.close())
    assert steps[:2] == ["importing_libraries", "loading_weights"]
