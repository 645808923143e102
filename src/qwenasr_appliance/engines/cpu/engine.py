"""CPU engine: the `qwen-asr` package's transformers backend, one request at a time on a worker thread.

The model is loaded with `qwen_asr.Qwen3ASRModel.from_pretrained` and driven the way its
`_infer_asr_transformers` drives it (processor, then `generate`), but with our prompt, a streamer that
reports the text token by token, and a stopping criterion that ends an aborted request at the next token.
torch, transformers and qwen_asr are imported inside `load`, so this module imports without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwenasr_appliance.audio.features import pad_to_hop
from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray
from qwenasr_appliance.audio.split import pad_to_min
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import (
    EngineDeadError,
    EngineDescription,
    EngineLoadError,
    EngineOutput,
    EngineRequestError,
    FinishReason,
    TokenLogprob,
    TranscribeOptions,
)
from qwenasr_appliance.engines.cpu.loading import CPU_DTYPES, load_failure_kind, load_on_own_thread, model_location
from qwenasr_appliance.engines.no_speech import decision_step, no_speech_token_ids
from qwenasr_appliance.engines.progress import LoadProgress
from qwenasr_appliance.engines.prompt import build_prompt
from qwenasr_appliance.engines.token_bytes import token_bytes, token_texts
from qwenasr_appliance.logs import adopt_library_loggers

log = logging.getLogger(__name__)

_WARM_UP_SECONDS = 0.5
# qwen-asr pads its short chunks to this length; shorter than 201 samples the STFT fails outright.
_MIN_AUDIO_SECONDS = 0.5
# Stop a runaway loop (a pattern of 1-10 tokens repeated 20 times in a row), as the vLLM engine does:
# `prompt.fix_repetitions` collapses the loop afterwards anyway, and on a CPU every wasted token is slow.
_LOOP_MAX_PATTERN = 10
_LOOP_MIN_COUNT = 20


_Item = EngineOutput | EngineDeadError | EngineRequestError | None


@dataclass(eq=False)
class _Job:
    """One request, shared by the event loop (which reads `outputs`) and the worker (which fills it)."""

    request_id: str
    audio: AudioArray
    options: TranscribeOptions
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    engine_closed: bool = False
    _started: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> bool:
        """Worker: claim the job; False if it was cancelled while queued."""
        with self._lock:
            self._started = not self.cancelled.is_set()
            return self._started

    def cancel(self) -> None:
        """Event loop: stop the job; one still queued ends its stream now instead of when its turn comes."""
        with self._lock:
            self.cancelled.set()
            if not self._started:
                self.outputs.put_nowait(None)

    def emit(self, item: _Item) -> None:
        """Hand an item to the event loop; called from the worker thread."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class _TokenStreamer:
    """A `generate` streamer that emits the cumulative text whenever a token adds complete characters."""

    def __init__(self, tokenizer: Any, job: _Job) -> None:
        self._tokenizer = tokenizer
        self._job = job
        self._prompt_seen = False
        self._pending: list[int] = []
        self._text = ""
        self._tokens = 0

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt ids
            self._prompt_seen = True
            return
        ids = [int(token) for token in value.reshape(-1).tolist()]
        self._tokens += len(ids)
        self._pending.extend(ids)
        piece: str = self._tokenizer.decode(self._pending, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if piece.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self._pending.clear()
        if piece:
            self._text += piece
            self._job.emit(EngineOutput(raw_text=self._text, output_tokens=self._tokens, finished=False))

    def end(self) -> None:
        """Nothing to flush: the final output is decoded from the whole sequence."""


class _CancelCriterion:
    """A stopping criterion that ends generation once `event` is set (checked after every token)."""

    def __init__(self, event: threading.Event, torch: Any) -> None:
        self._event = event
        self._torch = torch

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return self._torch.full((input_ids.shape[0],), self._event.is_set(), dtype=self._torch.bool)


class _LoopCriterion:
    """A stopping criterion that ends generation once the newest tokens repeat one short pattern."""

    def __init__(self, prompt_length: int, torch: Any) -> None:
        self._prompt_length = prompt_length
        self._torch = torch
        self.fired = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        window = _LOOP_MAX_PATTERN * _LOOP_MIN_COUNT
        tail: list[int] = input_ids[0, max(self._prompt_length, input_ids.shape[1] - window) :].tolist()
        looping = any(
            len(tail) >= size * _LOOP_MIN_COUNT and tail[-size * _LOOP_MIN_COUNT :] == tail[-size:] * _LOOP_MIN_COUNT
            for size in range(1, _LOOP_MAX_PATTERN + 1)
        )
        self.fired = self.fired or looping
        return self._torch.full((input_ids.shape[0],), looping, dtype=self._torch.bool)


def _sampling_arguments(temperature: float) -> dict[str, Any]:
    if temperature <= 0:
        return {"do_sample": False}
    # Plain temperature sampling, as the OpenAI API defines `temperature`: no top-k / top-p cut.
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


class CPUEngine:
    """Qwen3-ASR on the CPU through transformers; requests run one after another on one worker thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._dtype_name = CPU_DTYPES[settings.dtype]
        self._executor: ThreadPoolExecutor | None = None
        self._asr: Any = None  # qwen_asr.Qwen3ASRModel
        self._torch: Any = None
        self._eos_ids: list[int] = []
        self._pad_id: int | None = None
        self._jobs: dict[str, _Job] = {}
        self._details: dict[str, str | int | float | bool | None] = {}
        self.load_progress = LoadProgress()  # what `/status` shows while this engine loads

    async def load(self) -> None:
        if self._asr is not None:
            return
        self._executor = await load_on_own_thread(self._load_blocking, "cpu-engine")

    def _load_blocking(self) -> None:
        location = model_location(self._settings.model_id)
        # Seconds on a busy host: without a step of its own, /status showed none meanwhile.
        self.load_progress.enter("importing_libraries", "torch, transformers, qwen-asr")
        try:
            import qwen_asr
            import torch
            import transformers
        except ImportError as exc:
            raise EngineLoadError("import", f"the CPU engine needs qwen-asr, transformers and torch: {exc}") from exc
        adopt_library_loggers()  # transformers' warnings once, in our format
        if self._settings.cpu_threads > 0:
            torch.set_num_threads(self._settings.cpu_threads)
        self.load_progress.enter("loading_weights", location)
        try:
            asr = qwen_asr.Qwen3ASRModel.from_pretrained(
                location,
                device_map="cpu",
                dtype=getattr(torch, self._dtype_name),
                max_new_tokens=self._settings.max_new_tokens,
            )
        except Exception as exc:
            kind = load_failure_kind(exc)
            raise EngineLoadError(kind, f"loading {self._settings.model_id!r} failed ({kind}): {exc}") from exc
        tokenizer = asr.processor.tokenizer
        # The package's generate() defaults to the released vocabulary's EOS ids; ask the tokenizer instead.
        self._eos_ids = [
            token_id
            for token_id in tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
            if token_id is not None and token_id != tokenizer.unk_token_id
        ]
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._eos_ids[-1]
        self._asr, self._torch = asr, torch
        self.load_progress.enter("warming_up", f"{_WARM_UP_SECONDS} s of silence")
        try:
            self._generate(np.zeros(int(_WARM_UP_SECONDS * SAMPLE_RATE), dtype=np.float32),
                           TranscribeOptions(max_new_tokens=1), threading.Event(), streamer=None)  # fmt: skip
        except Exception as exc:
            self._asr = None
            kind = load_failure_kind(exc)
            raise EngineLoadError(kind, f"warm-up of {self._settings.model_id!r} failed: {exc}") from exc
        self._details = {
            "torch_threads": torch.get_num_threads(),
            "torch": str(torch.__version__),
            "transformers": str(transformers.__version__),
            "max_new_tokens": self._settings.max_new_tokens,
            "streaming": True,
        }

    async def stream(
        self, audio: AudioArray, options: TranscribeOptions, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        executor = self._executor
        if executor is None or self._asr is None:
            raise EngineDeadError("the CPU engine is not loaded")
        if request_id in self._jobs:
            raise EngineRequestError(f"request {request_id!r} is already running")
        job = _Job(request_id, audio, options, asyncio.get_running_loop())
        self._jobs[request_id] = job
        future = executor.submit(self._run, job)
        try:
            while True:
                item = await job.outputs.get()
                if item is None:
                    if job.engine_closed:
                        raise EngineDeadError("the CPU engine was closed during the request")
                    return  # aborted: the stream ends without a finished output
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            job.cancel()  # stops the worker at its next token if the consumer left early
            if self._jobs.get(request_id) is job:
                del self._jobs[request_id]
            future.add_done_callback(_log_worker_failure)

    def _run(self, job: _Job) -> None:
        """Worker thread: run one job unless it was cancelled while queued; emit its last item."""
        if not job.start():
            return
        try:
            result = self._generate(job.audio, job.options, job.cancelled, _TokenStreamer(self._tokenizer, job))
        except Exception as exc:
            failure = EngineRequestError(f"CPU generation failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            job.emit(failure)
            return
        except BaseException:
            job.emit(EngineDeadError("the CPU engine's worker was interrupted"))
            raise
        job.emit(None if job.cancelled.is_set() else result)

    @property
    def _tokenizer(self) -> Any:
        return self._asr.processor.tokenizer

    def _generate(
        self, audio: AudioArray, options: TranscribeOptions, cancelled: threading.Event, streamer: Any
    ) -> EngineOutput:
        torch, asr = self._torch, self._asr
        model = asr.model
        prompt = build_prompt(options.context, options.language, options.assistant_prefix)
        # Whole hops, as vLLM's renderer pads: both engines see ceil(n / 160) feature frames.
        audio = pad_to_hop(pad_to_min(audio, _MIN_AUDIO_SECONDS))
        inputs = asr.processor(text=[prompt], audio=[audio], return_tensors="pt", padding=True)
        inputs = inputs.to(model.device).to(model.dtype)
        prompt_length = int(inputs["input_ids"].shape[1])
        loop_guard = _LoopCriterion(prompt_length, torch)
        # Raw logits per step (before temperature), only when the caller wants confidence (qwen-asr's
        # generate() already returns a dict).
        confidence = {"output_logits": True} if options.logprobs else {}
        with torch.inference_mode():
            result = model.generate(
                **inputs,
                max_new_tokens=options.max_new_tokens,
                eos_token_id=self._eos_ids,
                pad_token_id=self._pad_id,
                stopping_criteria=[_CancelCriterion(cancelled, torch), loop_guard],
                streamer=streamer,
                **confidence,
                **_sampling_arguments(options.temperature),
            )
        generated = result.sequences[0, prompt_length:]
        ids = [int(token) for token in generated.tolist()]
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        output = EngineOutput(
            raw_text=text,
            output_tokens=len(ids),
            finished=True,
            finish_reason=self._finish_reason(ids, options, loop_guard),
        )
        if options.logprobs and getattr(result, "logits", None):
            return self._with_confidence(output, ids, result.logits, options)
        return output

    def _finish_reason(self, ids: list[int], options: TranscribeOptions, loop_guard: _LoopCriterion) -> FinishReason:
        if ids and ids[-1] in self._eos_ids:
            return "stop"
        if loop_guard.fired:
            return "repetition"
        return "length" if len(ids) >= options.max_new_tokens else "stop"

    def _with_confidence(
        self, output: EngineOutput, ids: list[int], logits: Any, options: TranscribeOptions
    ) -> EngineOutput:
        """`output` with each token's log-probability and `no_speech_prob` read from the raw logits."""
        torch = self._torch
        steps = torch.log_softmax(torch.stack([step[0] for step in logits[: len(ids)]]).float(), dim=-1)
        chosen = steps[torch.arange(len(ids)), torch.tensor(ids)].tolist()
        texts = token_texts(self._tokenizer, ids)
        raw = token_bytes(self._tokenizer, ids, texts)
        tokens = tuple(
            TokenLogprob(token=t, logprob=float(lp), raw=b) for t, lp, b in zip(texts, chosen, raw, strict=True)
        )
        forced = bool(options.language)
        step = decision_step(texts, forced)
        no_speech: float | None = None
        if step is not None:
            candidates = no_speech_token_ids(self._tokenizer, forced, self._eos_ids)
            if candidates:
                no_speech = float(steps[step, candidates].exp().sum().clamp(max=1.0))
        return dataclasses.replace(output, logprobs=tokens, no_speech_prob=no_speech)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            job.cancel()

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        for job in self._jobs.values():
            job.engine_closed = True
            job.cancel()
        if executor is not None:
            # Queued jobs see their flag and return at once; the running one stops after its next token.
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._asr = None
        gc.collect()

    def describe(self) -> EngineDescription:
        return EngineDescription(
            name="cpu",
            model=self._settings.model_id,
            device="cpu",
            dtype=self._dtype_name,
            quantization=None,
            max_concurrency=1,
            details=dict(self._details),
        )


def _log_worker_failure(future: Future[None]) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        log.error("CPU engine worker failed", exc_info=exc)
