"""The GPU engine: Qwen3-ASR on vLLM's async engine (`AsyncLLM`, continuous batching).

vLLM 0.26 is used the way its own `/v1/audio/transcriptions` server uses it, minus the HTTP layer:

* one `AsyncLLM` built from `AsyncEngineArgs` with the API server's usage context (so vLLM picks the
  same hardware-dependent batch defaults as `vllm serve`); the model runs in vLLM's engine-core child
  process, this process renders prompts, detokenizes and streams;
* each chunk's log-mel features are computed in worker processes and turned into the engine input vLLM's
  renderer would have made (`engines.vllm.inputs`, checked against the renderer at start-up), then
  submitted with `AsyncLLM.generate(..., request_id)` and streamed as DELTA outputs that this engine
  accumulates into the cumulative `EngineOutput`s the protocol asks for. Without a known feature
  extractor, or when the check fails, vLLM's renderer does the work (`render_cmpl_async`: tokenization
  and Whisper features in its thread pool);
* the prompt is `engines.prompt.build_prompt` (the same string the CPU engine uses).

Aborting: closing the stream (client gone) or cancelling its task closes vLLM's generator, which makes
vLLM 0.26 abort the request itself (`AsyncLLM.generate` handles `GeneratorExit` and `CancelledError`);
the engine then calls `AsyncLLM.abort(request_id)` as well, which costs nothing when the request is
already gone. `abort(request_id)` from another task ends the stream with `EngineRequestError`.

Benchmark-only switch: with `QWENASR_BENCH_IGNORE_EOS=1` in the environment every request generates
exactly `max_new_tokens` tokens (`ignore_eos`, `min_tokens`): dummy weights rarely emit EOS, so a fixed
output length is the only fair comparison. It is not a setting and must never be set in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import structlog

from qwenasr_appliance.audio.features import LogMelExtractor, find_extractor
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.cpus import usable_cpus
from qwenasr_appliance.engines.base import (
    EngineDeadError,
    EngineDescription,
    EngineError,
    EngineLoadError,
    EngineOutput,
    EngineRequestError,
    FinishReason,
    TokenLogprob,
    TranscribeOptions,
)
from qwenasr_appliance.engines.no_speech import decision_step, no_speech_token_ids
from qwenasr_appliance.engines.progress import LoadProgress
from qwenasr_appliance.engines.prompt import build_prompt
from qwenasr_appliance.engines.token_bytes import token_bytes, token_texts
from qwenasr_appliance.engines.vllm.common import (
    LLMFactory,
    OutputTap,
    ParamsFactory,
    PlanLike,
    audio_tokens,
    round_model_len,
)
from qwenasr_appliance.engines.vllm.errors import (
    classify_load_failure,
    failure_region,
    map_request_error,
    root_cause_line,
)
from qwenasr_appliance.engines.vllm.inputs import (
    ChunkFeatures,
    EngineInputBuilder,
    chunk_features,
    differences,
    vllm_input_builder,
)
from qwenasr_appliance.engines.vllm.lifecycle import attr, build_llm, import_vllm, release_llm
from qwenasr_appliance.engines.vllm.steps import VllmStepObserver
from qwenasr_appliance.metrics import METRICS
from qwenasr_appliance.workers import WorkerCrashedError, WorkerPool, WorkerTimeoutError

if TYPE_CHECKING:
    from qwenasr_appliance.config import Settings

log = structlog.get_logger(__name__)

BENCH_IGNORE_EOS_ENV: Final = "QWENASR_BENCH_IGNORE_EOS"

# Audio placeholder tokens per second of audio: the encoder turns every 100 mel frames (1 s) into 13
# tokens (vLLM's `_get_feat_extract_output_lengths`). Prompt text around the audio: about 20 tokens.
PROMPT_OVERHEAD_TOKENS: Final = 64
DEFAULT_CONTEXT_TOKENS: Final = 2000
# Stop a runaway loop: a pattern of 1-10 tokens repeated 20 times in a row (vLLM 0.26
# `RepetitionDetectionParams`, checked after every step in `vllm/v1/core/sched/utils.py: check_stop`, after
# the end-token and `max_tokens` checks). `prompt.fix_repetitions` collapses such loops to two copies anyway,
# so stopping early saves the time the loop would take; the text after the loop is lost (logged and counted).
REPETITION_GUARD: Final[Mapping[str, int]] = {"min_pattern_size": 1, "max_pattern_size": 10, "min_count": 20}
# Stream every 8th token (and always the first and the last): vLLM's output processor then builds a
# tenth of the per-token `RequestOutput`s this process has to handle under load; at 2-10 ms per decode
# step a client still sees text every 20-80 ms.
STREAM_INTERVAL_TOKENS: Final = 8
# Top log-probabilities asked per step when confidence is wanted (only then: vLLM computes the
# log-softmax over the vocabulary for every step of such requests).
NO_SPEECH_TOP_LOGPROBS: Final = 5
WARMUP_SECONDS: Final = 2.0
WARMUP_TOKENS: Final = 4
CHECK_SECONDS: Final = 2.37
VRAM_RELEASE_TIMEOUT_SECONDS: Final = 20.0
VRAM_RELEASE_SLACK_BYTES: Final = 512 * 1024**2


# -- pure helpers (unit-tested without vLLM) ------------------------------------------------------


def derive_max_model_len(settings: Settings) -> int:
    """`MAX_MODEL_LEN`, or when 0 what one chunk can need: its audio tokens, the longest context, the
    output budget and the template, rounded up to a multiple of 1024.

    vLLM's default is the model's 65,536 positions, which makes it refuse GPUs whose free memory cannot
    hold one such sequence although ASR never comes near it.
    """
    if settings.max_model_len > 0:
        return settings.max_model_len
    context = settings.max_prompt_chars if settings.max_prompt_chars > 0 else DEFAULT_CONTEXT_TOKENS
    need = audio_tokens(settings.chunk_seconds) + PROMPT_OVERHEAD_TOKENS + context + settings.max_new_tokens
    return round_model_len(need)


def renderer_workers(cpu_count: int | None = None) -> int:
    """Threads for vLLM's renderer (tokenization and Whisper features of incoming chunks): half the CPUs
    the container may use (`cpus.usable_cpus`), 1 to 8."""
    cores = cpu_count if cpu_count is not None else usable_cpus()
    return max(1, min(8, cores // 2))


def build_engine_args(settings: Settings, plan: PlanLike, *, cpu_count: int | None = None) -> dict[str, Any]:
    """Keyword arguments of vLLM's `AsyncEngineArgs` for this plan."""
    quantization = plan.quantization
    util = plan.gpu_memory_utilization
    args: dict[str, Any] = {
        "model": settings.model_id,
        "served_model_name": settings.model_name,
        "dtype": plan.dtype,
        "quantization": quantization,
        # In-flight bitsandbytes quantization needs vLLM's bitsandbytes loader (vLLM forces it anyway, and
        # it reads real weight files: load_format "dummy" cannot be combined with it).
        "load_format": "bitsandbytes" if quantization == "bitsandbytes" else settings.load_format,
        "gpu_memory_utilization": settings.gpu_memory_utilization if util is None else util,
        "max_model_len": derive_max_model_len(settings),
        "max_num_seqs": settings.max_num_seqs,
        "enforce_eager": settings.enforce_eager,
        "limit_mm_per_prompt": {"audio": 1},
        # Every chunk is new audio: the processor cache would only hash and hold it. Without the cache
        # vLLM allows several renderer threads.
        "mm_processor_cache_gb": 0.0,
        "renderer_num_workers": renderer_workers(cpu_count),
        "stream_interval": STREAM_INTERVAL_TOKENS,
        "disable_log_stats": False,  # keeps the vllm:* Prometheus metrics
        "enable_log_requests": False,
        "trust_remote_code": False,
        "seed": 0,
    }
    return args


def build_sampling_kwargs(options: TranscribeOptions, *, fixed_length: bool = False) -> dict[str, Any]:
    """Keyword arguments of vLLM's `SamplingParams` for one chunk (`output_kind` by member name)."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": max(0.0, options.temperature),
        "max_tokens": options.max_new_tokens,
        "skip_special_tokens": True,  # `<asr_text>` is not special and stays in the text
        # Without a streaming client, vLLM's frontend need neither detokenize every step nor build
        # an output per step: the text is decoded once from the final token ids (see `stream`).
        "output_kind": "DELTA" if options.incremental else "FINAL_ONLY",
        "detokenize": options.incremental,
    }
    if options.logprobs:
        # The sampled token's log-probability plus the top few at each step: `no_speech_prob` needs the
        # probability of the "no speech" token at the decision step even when it was not sampled.
        kwargs["logprobs"] = NO_SPEECH_TOP_LOGPROBS
    if fixed_length:
        kwargs.update(ignore_eos=True, min_tokens=options.max_new_tokens)
    else:
        kwargs["repetition_detection"] = dict(REPETITION_GUARD)
    return kwargs


def build_request_input(audio: AudioArray, options: TranscribeOptions) -> dict[str, Any]:
    """The prompt vLLM renders for one chunk: the chat prompt text and the 16 kHz samples."""
    samples = np.ascontiguousarray(audio, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise EngineRequestError(f"expected non-empty mono audio, got shape {samples.shape}")
    return {
        "prompt": build_prompt(options.context, options.language, options.assistant_prefix),
        "multi_modal_data": {"audio": (samples, SAMPLE_RATE)},
    }


# vLLM 0.26's `CompletionOutput.finish_reason` for a stop by the repetition guard: `check_stop` sets
# `RequestStatus.FINISHED_REPETITION` (and `stop_reason="repetition_detected"`), `vllm/v1/request.py` maps
# it to `FinishReason.REPETITION`, whose string (`FINISH_REASON_STRINGS`, `vllm/v1/engine/__init__.py`) the
# output processor reports (`str(finish_reason)`, `vllm/v1/engine/output_processor.py`).
VLLM_REPETITION_REASON: Final = "repetition"


def finish_reason(vllm_reason: str | None, output_tokens: int, max_new_tokens: int) -> FinishReason:
    """Our finish reason from vLLM's `CompletionOutput.finish_reason`: `length` stays (also when vLLM gave
    none and the limit was reached), `repetition` is the repetition guard's stop (`VLLM_REPETITION_REASON`),
    anything else that finished (`stop`: end token) is `stop`."""
    if vllm_reason == "length" or (vllm_reason is None and output_tokens >= max_new_tokens):
        return "length"
    if vllm_reason == VLLM_REPETITION_REASON:
        return "repetition"
    return "stop"


def end_token_ids(tokenizer: Any) -> list[int]:
    """The ids of `<|im_end|>` and `<|endoftext|>` in the tokenizer's vocabulary."""
    ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    unknown = getattr(tokenizer, "unk_token_id", None)
    return [int(token) for token in ids if token is not None and token != unknown]


def top_probability(step: Mapping[int, Any], candidates: Sequence[int]) -> float:
    """The probability of `candidates` at one step from vLLM's logprobs of that step (the sampled
    token and the top `NO_SPEECH_TOP_LOGPROBS`). When none of them is there, its probability is at most
    the least likely listed one's: that upper bound is returned."""
    found = [math.exp(step[token].logprob) for token in candidates if token in step]
    if found:
        return min(1.0, sum(found))
    return min((math.exp(item.logprob) for item in step.values()), default=0.0)


def check_clip() -> AudioArray:
    """The start-up check's chunk: 2.37 s and 37 samples of seeded noise, a whole number of neither
    seconds nor feature hops (160 samples), so the check also sees how the renderer rounds frames."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(int(CHECK_SECONDS * SAMPLE_RATE) + 37) * 0.1).astype(np.float32)


def bench_fixed_length(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the benchmark-only fixed-output-length switch is on."""
    env = os.environ if environ is None else environ
    return env.get(BENCH_IGNORE_EOS_ENV, "").strip() == "1"


# -- vLLM glue (imported only in load) ------------------------------------------------------------


def _default_llm_factory(engine_kwargs: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs), usage_context=UsageContext.OPENAI_API_SERVER)


async def _built_input(
    builder: EngineInputBuilder, pool: WorkerPool, extractor: LogMelExtractor, prompt: str, samples: AudioArray
) -> Any:
    chunk: ChunkFeatures = await pool.run(chunk_features, extractor, samples, builder.feature_dtype)
    return await builder.build(prompt, chunk)


def _default_params_factory(kwargs: dict[str, Any]) -> Any:
    from vllm.sampling_params import RepetitionDetectionParams, RequestOutputKind, SamplingParams

    kwargs = dict(kwargs)
    kwargs["output_kind"] = RequestOutputKind[kwargs.get("output_kind", "DELTA")]
    guard = kwargs.pop("repetition_detection", None)
    if guard is not None:
        kwargs["repetition_detection"] = RepetitionDetectionParams(**guard)
    return SamplingParams(**kwargs)


# -- the engine -----------------------------------------------------------------------------------


class VLLMEngine:
    """Qwen3-ASR on vLLM's `AsyncLLM`. Implements `engines.base.Engine`.

    `llm_factory(engine_kwargs)` builds the `AsyncLLM` and `params_factory(kwargs)` the `SamplingParams`;
    both default to vLLM's own and exist so tests can run the engine without vLLM.
    """

    def __init__(
        self,
        settings: Settings,
        plan: PlanLike,
        *,
        llm_factory: LLMFactory | None = None,
        params_factory: ParamsFactory | None = None,
        capture_output: bool | None = None,
        environ: Mapping[str, str] | None = None,
        vram_probe: Callable[[], int | None] | None = None,
        gpu_name: Callable[[], str] | None = None,
        input_builder_factory: Callable[[Any], EngineInputBuilder] | None = None,
    ) -> None:
        self._settings = settings
        self._plan = plan
        self._llm_factory = llm_factory
        self._params_factory = params_factory
        self._capture_output = llm_factory is None if capture_output is None else capture_output
        self._fixed_length = bench_fixed_length(environ)
        # Readings of GPU 0 (used bytes, name): passed in by the supervisor's factory; None: not read.
        self._vram_probe = vram_probe
        self._gpu_name_reader = gpu_name
        self._engine_args = build_engine_args(settings, plan)
        self._llm: Any = None
        self._tap: OutputTap | None = None
        self._active: set[str] = set()
        self._abort_requested: set[str] = set()
        self._closed = False
        self._load_seconds: float | None = None
        self._vram_before: int | None = None
        self._vram_loaded: int | None = None
        self._gpu_name = ""
        self._vllm_version = ""
        # Log-mel features computed in worker processes and engine inputs built here (engines.vllm.inputs);
        # None: vLLM's renderer computes them.
        self._input_builder_factory = input_builder_factory or vllm_input_builder
        self._features: WorkerPool | None = None
        self._extractor: LogMelExtractor | None = None
        self._inputs: EngineInputBuilder | None = None
        self._feature_source = "vllm"
        self.load_progress = LoadProgress()  # what `/status` shows while this engine loads

    # -- introspection

    @property
    def engine_args(self) -> dict[str, Any]:
        return dict(self._engine_args)

    @property
    def active_requests(self) -> frozenset[str]:
        return frozenset(self._active)

    @property
    def is_dead(self) -> bool:
        """True when vLLM reports its engine core dead (the supervisor should restart)."""
        return self._llm is not None and bool(getattr(self._llm, "errored", False))

    def engine_output_tail(self) -> str:
        """The tail of the engine core's output (empty when not captured)."""
        return self._tap.text() if self._tap else ""

    # -- lifecycle

    async def load(self) -> None:
        if self._closed:
            raise EngineLoadError("other", "this engine was closed; make a new one")
        if self._llm is not None:
            return
        llm_factory = self._llm_factory
        if llm_factory is None:
            self.load_progress.enter("importing_libraries", "vllm, torch")
            self._vllm_version = await asyncio.to_thread(import_vllm)
            llm_factory = _default_llm_factory
        if self._params_factory is None:
            self._params_factory = _default_params_factory
        if self._llm_factory is None:
            self._gpu_name = await asyncio.to_thread(self._read_gpu_name)
        if self._vram_probe is not None:
            self._vram_before = await asyncio.to_thread(self._vram_probe)

        began = time.monotonic()
        self.load_progress.enter("starting_engine", f"vLLM {self._vllm_version}".strip())
        tap = OutputTap(on_line=VllmStepObserver(self.load_progress)) if self._capture_output else None
        self._tap = tap
        try:
            llm = await build_llm(llm_factory, self._engine_args, tap)
        except EngineLoadError:
            await self._wait_for_vram_release()
            raise
        self._llm = llm
        try:
            await self._start_feature_workers(llm)
            self.load_progress.enter("warming_up", "a first request through the engine")
            await self._warm_up()
        except asyncio.CancelledError:
            await self.close()
            raise
        except Exception as exc:
            error = classify_load_failure(exc, tap.text() if tap else "")
            await self.close()
            raise error from exc
        self._load_seconds = time.monotonic() - began
        if self._vram_probe is not None:
            self._vram_loaded = await asyncio.to_thread(self._vram_probe)

    def _read_gpu_name(self) -> str:
        if self._gpu_name_reader is None:
            return ""
        try:
            return self._gpu_name_reader()
        except Exception:
            return ""

    async def _warm_up(self) -> None:
        try:
            await self._warm_up_once()
        except EngineRequestError as exc:
            if self._inputs is None:
                raise
            log.warning("vllm.features_in_vllm", reason=f"vLLM refused an input built here: {exc}")
            self._stop_feature_workers()
            await self._warm_up_once()

    async def _warm_up_once(self) -> None:
        audio = np.zeros(int(WARMUP_SECONDS * SAMPLE_RATE), dtype=np.float32)
        options = TranscribeOptions(max_new_tokens=WARMUP_TOKENS)
        stream = self.stream(audio, options, f"warmup-{uuid.uuid4().hex[:12]}")
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def _start_feature_workers(self, llm: Any) -> None:
        """Compute features in worker processes when this process can build vLLM's engine inputs from
        them and those equal what vLLM's renderer makes of a test chunk; otherwise leave it to vLLM."""
        extractor = self._extractor or await asyncio.to_thread(find_extractor, self._settings.model_id)
        if extractor is None:
            log.info("vllm.features_in_vllm", reason="no preprocessor_config.json found for the model")
            return
        try:
            builder = self._input_builder_factory(llm)
        except Exception as exc:
            log.warning("vllm.features_in_vllm", reason=f"cannot build vLLM engine inputs here: {exc!r}")
            return
        pool = WorkerPool(
            self._settings.effective_decode_workers,
            "features",
            job_timeout=self._settings.worker_job_timeout,
            on_replaced=METRICS.worker_replaced("features"),
        )
        try:
            await pool.warm_up()
            found = await self._compare_with_renderer(llm, builder, pool, extractor)
        except Exception as exc:
            pool.close()
            log.warning("vllm.features_in_vllm", reason=f"the start-up check failed: {exc!r}")
            return
        except BaseException:
            pool.close()
            raise
        if found:
            pool.close()
            log.warning("vllm.features_in_vllm", reason="inputs built here differ from vLLM's", differences=found[:5])
            return
        self._extractor, self._features, self._inputs, self._feature_source = extractor, pool, builder, "workers"
        log.info("vllm.features_in_workers", workers=pool.processes)

    async def _compare_with_renderer(
        self, llm: Any, builder: EngineInputBuilder, pool: WorkerPool, extractor: LogMelExtractor
    ) -> list[str]:
        audio = check_clip()
        prompt = build_prompt("", None)
        ours = await _built_input(builder, pool, extractor, prompt, audio)
        theirs = await self._render(llm, {"prompt": prompt, "multi_modal_data": {"audio": (audio, SAMPLE_RATE)}})
        return differences(ours, theirs)

    def _stop_feature_workers(self) -> None:
        pool, self._features, self._inputs = self._features, None, None
        self._feature_source = "vllm"
        if pool is not None:
            pool.close()

    async def _engine_input(self, llm: Any, audio: AudioArray, options: TranscribeOptions) -> Any:
        """What `AsyncLLM.generate` gets for one chunk: built here from worker features, or rendered by vLLM."""
        request = build_request_input(audio, options)
        pool, builder, extractor = self._features, self._inputs, self._extractor
        if pool is None or builder is None or extractor is None:
            return await self._render(llm, request)
        samples, _rate = request["multi_modal_data"]["audio"]
        try:
            return await _built_input(builder, pool, extractor, request["prompt"], samples)
        except WorkerCrashedError as exc:
            if pool.closed:  # the engine is closing
                raise EngineRequestError(f"audio features could not be computed: {exc}") from exc
            # A worker killed from outside (the OOM killer): once more on its fresh replacement. A second
            # death, or a task past its deadline (WorkerTimeoutError), reaches the client as a retryable
            # 503 or 504 (api/error_mapping.py).
            log.warning("vllm.features_retry_after_worker_death", reason=str(exc))
            return await _built_input(builder, pool, extractor, request["prompt"], samples)

    def _take_llm(self) -> Any:
        llm, self._llm = self._llm, None
        return llm

    async def close(self) -> None:
        self._closed = True
        self._stop_feature_workers()
        await release_llm(self._take_llm, self._active)
        await self._wait_for_vram_release()

    async def _wait_for_vram_release(self) -> None:
        """Wait (bounded) until the GPU memory of the engine core is back, so the next plan sees it free."""
        baseline = self._vram_before
        if self._vram_probe is None or baseline is None:
            return
        deadline = time.monotonic() + VRAM_RELEASE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            used = await asyncio.to_thread(self._vram_probe)
            if used is None or used <= baseline + VRAM_RELEASE_SLACK_BYTES:
                return
            await asyncio.sleep(0.25)

    # -- requests

    async def abort(self, request_id: str) -> None:
        if request_id not in self._active:
            return
        self._abort_requested.add(request_id)
        llm = self._llm
        if llm is not None:
            with contextlib.suppress(Exception):
                await llm.abort(request_id)

    async def stream(
        self, audio: AudioArray, options: TranscribeOptions, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        llm = self._llm
        if llm is None:
            raise EngineDeadError("the vLLM engine is not loaded" if not self._closed else "the vLLM engine is closed")
        if getattr(llm, "errored", False):
            raise EngineDeadError(self._dead_message("the vLLM engine core is dead"))
        if request_id in self._active:
            raise EngineRequestError(f"request id {request_id!r} is already running")
        params_factory = self._params_factory or _default_params_factory
        self._active.add(request_id)
        generator: Any = None
        finished = False
        text = ""
        tokens = 0
        token_ids: list[int] = []
        step_logprobs: list[Any] = []
        reason: str | None = None
        try:
            engine_input = await self._engine_input(llm, audio, options)
            self._check_aborted(request_id)
            params = params_factory(build_sampling_kwargs(options, fixed_length=self._fixed_length))
            generator = llm.generate(engine_input, params, request_id)
            async for output in generator:
                reason = None
                for completion in output.outputs[:1]:
                    if options.incremental:
                        text += completion.text
                        token_ids.extend(completion.token_ids)
                        step_logprobs.extend(getattr(completion, "logprobs", None) or ())
                    else:
                        text = self._decode(completion.token_ids)
                        token_ids = list(completion.token_ids)
                        step_logprobs = list(getattr(completion, "logprobs", None) or ())
                    tokens = len(token_ids)
                    reason = completion.finish_reason
                finished = bool(output.finished)
                if reason in ("abort", "error") or (not finished and request_id in self._abort_requested):
                    finished = False
                    self._check_aborted(request_id)
                    raise EngineRequestError(f"vLLM ended request {request_id!r} with finish reason {reason!r}")
                if finished:
                    yield self._final_output(text, token_ids, step_logprobs, reason, options)
                else:
                    yield EngineOutput(raw_text=text, output_tokens=tokens, finished=False)
                # No break on `finished`: vLLM's generator returns right after its final output, and
                # leaving it suspended would make its finalizer send a (useless) abort.
            if not finished:
                raise EngineRequestError(f"vLLM ended request {request_id!r} without finishing it")
        except (EngineDeadError, WorkerCrashedError, WorkerTimeoutError):
            raise  # a feature worker's death or deadline: the API answers 503 or 504 (api/error_mapping.py)
        except EngineError:
            if getattr(llm, "errored", False):
                raise EngineDeadError(self._dead_message("the vLLM engine core died")) from None
            raise
        except Exception as exc:
            error = map_request_error(exc, engine_errored=bool(getattr(llm, "errored", False)))
            if isinstance(error, EngineDeadError):
                error = EngineDeadError(self._dead_message(str(error)))
            raise error from exc
        finally:
            self._active.discard(request_id)
            self._abort_requested.discard(request_id)
            if generator is not None and not finished:
                # Closing vLLM's generator aborts the request inside vLLM (it handles GeneratorExit);
                # the explicit abort by our id is a no-op when that already happened.
                with contextlib.suppress(Exception):
                    await generator.aclose()
                with contextlib.suppress(Exception):
                    await llm.abort(request_id)

    def _final_output(
        self, text: str, token_ids: list[int], steps: list[Any], reason: str | None, options: TranscribeOptions
    ) -> EngineOutput:
        """The finished output: why it ended and, when asked, the confidence read from vLLM's logprobs."""
        finish = finish_reason(reason, len(token_ids), options.max_new_tokens)
        output = EngineOutput(raw_text=text, output_tokens=len(token_ids), finished=True, finish_reason=finish)
        if not options.logprobs or len(steps) != len(token_ids):
            return output
        tokenizer = attr(self._llm, "tokenizer")
        if tokenizer is None:
            return output
        texts = token_texts(tokenizer, token_ids)
        raw = token_bytes(tokenizer, token_ids, texts)
        tokens = tuple(
            TokenLogprob(token=t, logprob=float(step[token].logprob), raw=b)
            for t, token, step, b in zip(texts, token_ids, steps, raw, strict=True)
        )
        forced = bool(options.language)
        decision = decision_step(texts, forced)
        no_speech = None
        if decision is not None:
            candidates = no_speech_token_ids(tokenizer, forced, end_token_ids(tokenizer))
            no_speech = top_probability(steps[decision], candidates)
        return dataclasses.replace(output, logprobs=tokens, no_speech_prob=no_speech)

    def _decode(self, token_ids: Any) -> str:
        tokenizer = attr(self._llm, "tokenizer")
        if tokenizer is None:
            raise EngineRequestError("the vLLM engine has no tokenizer to decode the output")
        return str(tokenizer.decode(list(token_ids), skip_special_tokens=True))

    async def _render(self, llm: Any, prompt: dict[str, Any]) -> Any:
        """Tokenize and extract audio features in vLLM's renderer threads (as `vllm serve` does)."""
        renderer = getattr(llm, "renderer", None)
        render = getattr(renderer, "render_cmpl_async", None)
        if render is None:
            return prompt
        rendered = await render([prompt])
        return rendered[0]

    def _check_aborted(self, request_id: str) -> None:
        if request_id in self._abort_requested:
            raise EngineRequestError(f"request {request_id!r} was aborted")

    def _dead_message(self, message: str) -> str:
        if self._tap is None:
            return message
        cause = root_cause_line(failure_region(self._tap.text()))
        return f"{message} (engine core: {cause})" if cause else message

    # -- description

    def describe(self) -> EngineDescription:
        llm = self._llm
        model_config = attr(llm, "vllm_config.model_config")
        cache_config = attr(llm, "vllm_config.cache_config")
        scheduler_config = attr(llm, "vllm_config.scheduler_config")
        dtype = str(getattr(model_config, "dtype", None) or self._plan.dtype).removeprefix("torch.")
        blocks = getattr(cache_config, "num_gpu_blocks", None)
        block_size = getattr(cache_config, "block_size", None)
        kv_tokens = int(blocks) * int(block_size) if blocks and block_size else None
        max_seqs = getattr(scheduler_config, "max_num_seqs", None) or self._settings.max_num_seqs
        details: dict[str, str | int | float | bool | None] = {
            "plan": self._plan.name,
            "vllm_version": self._vllm_version or None,
            "gpu_memory_utilization": float(self._engine_args["gpu_memory_utilization"]),
            "kv_cache_tokens": kv_tokens,
            "max_model_len": int(getattr(model_config, "max_model_len", None) or self._engine_args["max_model_len"]),
            "max_num_batched_tokens": getattr(scheduler_config, "max_num_batched_tokens", None),
            "load_format": str(self._engine_args["load_format"]),
            "enforce_eager": bool(self._engine_args["enforce_eager"]),
            "renderer_workers": int(self._engine_args["renderer_num_workers"]),
            "load_seconds": round(self._load_seconds, 3) if self._load_seconds is not None else None,
            "audio_features": self._feature_source,
        }
        if self._vram_before is not None and self._vram_loaded is not None:
            details["vram_used_bytes"] = max(0, self._vram_loaded - self._vram_before)
        if self._fixed_length:
            details["bench_ignore_eos"] = True
        return EngineDescription(
            name="vllm",
            model=self._settings.model_id,
            device=f"cuda:0 {self._gpu_name}".rstrip(),
            dtype=dtype,
            quantization=self._plan.quantization,
            max_concurrency=int(max_seqs),
            details=details,
        )
