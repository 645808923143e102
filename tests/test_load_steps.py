"""The load steps `/status` shows: vLLM's output lines read as steps, and the progress they land in."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.progress import LoadProgress
from qwenasr_appliance.engines.vllm.common import OutputTap
from qwenasr_appliance.engines.vllm.steps import VllmStepObserver, step_of_line
from qwenasr_appliance.supervisor.plans import Plan
from qwenasr_appliance.supervisor.probe import VramProbe
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor

# Lines as vLLM's V1 engine core prints them (prefix, logger position), in start-up order.
VLLM_START = [
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:10 [gpu_model_runner.py:2602] Starting to load model /m...", "loading_weights"),
    ("Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:01<00:01,  1.2s/it]", "loading_weights"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:20 [default_loader.py:267] Loading weights took 3.21 seconds", "loading_weights"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:21 [gpu_model_runner.py:2653] Model loading took 4.1 GiB and 4.0 seconds", "loading_weights"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:25 [backends.py:548] Dynamo bytecode transform time: 5.38 s", "compiling"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:29 [monitor.py:34] torch.compile takes 9.1 s in total", "compiling"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:31 [kv_cache_utils.py:1087] GPU KV cache size: 49,152 tokens", None),
    ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 11/11", "capturing_cuda_graphs"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:40 [gpu_model_runner.py:3480] Graph capturing finished in 8 secs, took 0.31 GiB", "warming_up"),
    ("(EngineCore_DP0 pid=212) INFO 10-06 12:00:40 [core.py:210] init engine (profile, create kv cache, warmup model) took 30.1 seconds", "warming_up"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "step"), VLLM_START)
def test_vllm_lines_name_their_step(line: str, step: str | None) -> None:
    assert step_of_line(line) == step


def test_progress_keeps_the_step_since_and_bytes() -> None:
    progress = LoadProgress()
    assert progress.reading() is None
    progress.enter("downloading", "Qwen/Qwen3-ASR-1.7B", bytes_total=4_000)
    progress.advance(1_000)
    first = progress.reading()
    assert first is not None and (first.step, first.bytes_done, first.bytes_total) == ("downloading", 1_000, 4_000)
    progress.enter("downloading", "still")  # the same step again: only the detail changes
    again = progress.reading()
    assert again is not None and again.since == first.since and again.bytes_total == 4_000
    progress.enter("loading_weights", "/models/x")
    weights = progress.reading()
    assert weights is not None and weights.bytes_done is None and weights.since >= first.since


def test_the_output_tap_hands_lines_to_the_observer(tmp_path: Path) -> None:
    """What a child writes to the tapped descriptor (newlines and progress bars' carriage returns)
    moves the step, and is still forwarded."""
    sink = (tmp_path / "out.txt").open("wb")
    progress = LoadProgress()
    tap = OutputTap(fds=(sink.fileno(),), on_line=VllmStepObserver(progress))
    tap.start()
    try:
        os.write(sink.fileno(), (VLLM_START[0][0] + "\n").encode())
        os.write(sink.fileno(), b"Capturing CUDA graphs (decode, FULL):  50%|#####     | 2/4\r")
        os.write(sink.fileno(), b"Capturing CUDA graphs (decode, FULL): 100%")  # no end yet: not a line
        deadline = time.monotonic() + 5
        while (progress.step != "capturing_cuda_graphs") and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        tap.stop()
        sink.close()
    reading = progress.reading()
    assert reading is not None and reading.step == "capturing_cuda_graphs"
    assert reading.detail == "Capturing CUDA graphs (decode, FULL):  50%|#####     | 2/4"
    assert "Starting to load model" in (tmp_path / "out.txt").read_text()


def test_the_supervisor_shows_the_resolving_step_then_the_engines_and_none_once_ready() -> None:
    """The supervisor's own step (resolving the model) and then the loading engine's appear in /status
    and in the not-ready reason; once serving there is no step."""
    from tests.test_supervisor import FakeEngine, FakeFactory, RecordingMetrics, run, until

    resolving, loading = asyncio.Event(), asyncio.Event()
    proceed_resolving, proceed_loading = threading.Event(), asyncio.Event()

    def resolver(model_id: str, progress: LoadProgress) -> str:
        progress.enter("downloading", model_id, bytes_total=3_000_000_000)
        progress.advance(1_500_000_000)
        loop.call_soon_threadsafe(resolving.set)
        proceed_resolving.wait(5)
        return "/cache/snapshots/abc"

    class SteppingEngine(FakeEngine):
        async def load(self) -> None:
            self.load_progress.enter("loading_weights", "/cache/snapshots/abc")
            loading.set()
            await proceed_loading.wait()
            await super().load()

    class SteppingFactory(FakeFactory):
        def __call__(self, plan: Plan, settings: Settings) -> FakeEngine:
            assert settings.model_id == "/cache/snapshots/abc"  # the engines load the resolved directory
            assert settings.served_model_names == ("Qwen/Qwen3-ASR-1.7B",)  # the names do not change
            engine = SteppingEngine(plan)
            engine.load_progress = LoadProgress()  # type: ignore[attr-defined]
            self.engines.append(engine)
            return engine

    async def main() -> None:
        nonlocal loop
        loop = asyncio.get_running_loop()
        supervisor = EngineSupervisor(
            Settings(engine="cpu"),
            engine_factory=SteppingFactory(),
            probe=lambda: VramProbe(no_gpu="no GPU"),
            metrics=RecordingMetrics(),
            cpu_available=True,
            vllm_available=False,
            model_resolver=resolver,
        )
        await supervisor.start()
        await asyncio.wait_for(resolving.wait(), 5)
        step = supervisor.snapshot().step
        assert step is not None and (step.step, step.bytes_done, step.bytes_total) == (
            "downloading",
            1_500_000_000,
            3_000_000_000,
        )
        assert "downloading, 1.50 of 3.00 GB" in (supervisor.not_ready_reason or "")
        proceed_resolving.set()
        await asyncio.wait_for(loading.wait(), 5)
        step = supervisor.snapshot().step
        assert step is not None and step.step == "loading_weights"
        assert "loading weights" in (supervisor.not_ready_reason or "")
        proceed_loading.set()
        await until(lambda: supervisor.ready)
        assert supervisor.snapshot().step is None
        await supervisor.stop()

    loop: asyncio.AbstractEventLoop | None = None
    run(main)
