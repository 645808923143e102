"""A test double engine: never shipped, used to drive the HTTP surface and the pipeline fast.

Its output depends on its input (the chunk's duration and the options it was given), so tests can
check that audio, chunking, prompts and languages really flow through the pipeline.
Behaviour is set by arguments, or by environment variables when granian builds the app in a
subprocess (`create_test_app`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qwenasr_appliance.api.app import create_app
from qwenasr_appliance.api.observer import RequestObserver
from qwenasr_appliance.audio.samples import AudioArray
from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import (
    EngineDeadError,
    EngineDescription,
    EngineLoadError,
    EngineOutput,
    FinishReason,
    TokenLogprob,
    TranscribeOptions,
)
from qwenasr_appliance.supervisor.plans import Plan


@dataclass
class DoubleBehaviour:
    token_delay: float = 0.0
    load_delay: float = 0.0
    language: str = "English"
    max_concurrency: int = 4
    # The Nth stream() call of the process (counted over every engine made) kills its engine: that call
    # and every other stream on the engine raise EngineDeadError, as a crashed engine core does. Once.
    die_on_call: int = 0
    # Raw output tokens to write for every chunk instead of the words (verbatim: no header is added), to
    # play what a real model does (control tokens, loops, an echoed context).
    script: tuple[str, ...] = ()
    finish_reason: FinishReason = "stop"
    # Log-probability of every written token, and the `no_speech_prob` reported, when options.logprobs.
    token_logprob: float = -0.25
    no_speech_prob: float = 0.125
    # Live sessions: with N > 0 the transcript of audio of S seconds is "w1 w2 ... wK", K = floor(S * N), so
    # a growing utterance's transcripts extend each other, as a real model's do.
    words_per_second: float = 0.0

    @classmethod
    def from_env(cls, engine_index: int = 0) -> DoubleBehaviour:
        """Behaviour from DOUBLE_* variables. DOUBLE_MAX_CONCURRENCY may be a comma list: the Nth engine
        made (`engine_index`, from 0; a restart makes a new one) reports the Nth value, the last repeats."""
        capacities = os.environ.get("DOUBLE_MAX_CONCURRENCY", "4").split(",")
        return cls(
            token_delay=float(os.environ.get("DOUBLE_TOKEN_DELAY", "0")),
            load_delay=float(os.environ.get("DOUBLE_LOAD_DELAY", "0")),
            language=os.environ.get("DOUBLE_LANGUAGE", "English"),
            max_concurrency=int(capacities[min(engine_index, len(capacities) - 1)]),
            die_on_call=int(os.environ.get("DOUBLE_DIE_ON_CALL", "0")),
            script=tuple(json.loads(os.environ.get("DOUBLE_SCRIPT", "[]"))),
            finish_reason=os.environ.get("DOUBLE_FINISH_REASON", "stop"),  # type: ignore[arg-type]
            words_per_second=float(os.environ.get("DOUBLE_WORDS_PER_SECOND", "0")),
        )


_STREAM_CALLS = itertools.count(1)  # stream() calls in this process, for `die_on_call`


@dataclass
class TestDoubleEngine:
    """Engine protocol implementation for tests only."""

    __test__ = False  # not a pytest test class

    behaviour: DoubleBehaviour = field(default_factory=DoubleBehaviour)
    loaded: bool = False
    closed: bool = False
    calls: list[tuple[float, TranscribeOptions, str]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    dead: bool = False

    async def load(self) -> None:
        if self.behaviour.load_delay:
            await asyncio.sleep(self.behaviour.load_delay)
        if os.environ.get("DOUBLE_FAIL_LOAD"):
            raise EngineLoadError("other", os.environ["DOUBLE_FAIL_LOAD"])
        self.loaded = True

    def words_for(self, audio: AudioArray, options: TranscribeOptions) -> list[str]:
        seconds = len(audio) / 16_000
        if self.behaviour.words_per_second:
            return [f"w{i}" for i in range(1, int(seconds * self.behaviour.words_per_second) + 1)]
        words = ["chunk", "of", f"{seconds:.1f}", "seconds"]
        if options.context:
            words += ["context", options.context.split()[0]]
        return words

    async def stream(
        self, audio: AudioArray, options: TranscribeOptions, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        self.calls.append((len(audio) / 16_000, options, request_id))
        if next(_STREAM_CALLS) == self.behaviour.die_on_call:
            self.dead = True
        self._check_alive()
        # With a forced language the prompt already ends in `language X<asr_text>`: the model only writes text.
        header = "" if options.language else f"language {self.behaviour.language}<asr_text>"
        if self.behaviour.script:
            tokens = list(self.behaviour.script)
        else:
            words = self.words_for(audio, options)
            tokens = [header + words[0], *(f" {word}" for word in words[1:])] if words else [header]
            # With an assistant prefix (live re-decoding) only what continues it, as a model continues its
            # prompt; nothing if the prefix is not the start of this audio's transcript.
            prefix = options.assistant_prefix
            if prefix:
                whole = "".join(tokens)
                rest = whole[len(prefix) :] if whole.startswith(prefix) else ""
                tokens = [f" {word}" for word in rest.split()] or [""]
        raw = ""
        logprobs: list[TokenLogprob] = []
        try:
            for index, token in enumerate(tokens):
                if self.behaviour.token_delay:
                    await asyncio.sleep(self.behaviour.token_delay)
                self._check_alive()
                raw += token
                if index == 0 and header and token.startswith(header) and token != header:
                    # The header and the first word arrive in one step, but are tokens of their own.
                    logprobs.append(TokenLogprob(header, self.behaviour.token_logprob, header.encode()))
                    token = token[len(header) :]
                logprobs.append(TokenLogprob(token, self.behaviour.token_logprob, token.encode()))
                if index < len(tokens) - 1:
                    yield EngineOutput(raw_text=raw, output_tokens=index + 1, finished=False)
            if self.behaviour.finish_reason == "stop":
                logprobs.append(TokenLogprob("", -0.05, b""))  # the end token
            wanted = options.logprobs
            yield EngineOutput(
                raw_text=raw,
                output_tokens=len(tokens),
                finished=True,
                finish_reason=self.behaviour.finish_reason,
                logprobs=tuple(logprobs) if wanted else None,
                no_speech_prob=self.behaviour.no_speech_prob if wanted else None,
            )
            self.finished.append(request_id)
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    def _check_alive(self) -> None:
        if self.dead:
            raise EngineDeadError("the test double engine died")
        if self.closed:
            raise EngineDeadError("the test double engine was closed during the request")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def close(self) -> None:
        self.closed = True

    def describe(self) -> EngineDescription:
        return EngineDescription(
            name="test-double",
            model="test-double",
            device="none",
            dtype="none",
            quantization=None,
            max_concurrency=self.behaviour.max_concurrency,
        )


def double_factory(behaviour: DoubleBehaviour | None = None) -> tuple[list[TestDoubleEngine], object]:
    """An engine factory handing out test doubles; returns (engines made so far, factory)."""
    made: list[TestDoubleEngine] = []

    def factory(plan: Plan, settings: Settings) -> TestDoubleEngine:
        engine = TestDoubleEngine(behaviour or DoubleBehaviour.from_env(len(made)))
        made.append(engine)
        return engine

    return made, factory


def create_test_app() -> RequestObserver:
    """granian factory target for live-server tests: the real app around a test double engine."""
    _, factory = double_factory()
    return create_app(engine_factory=factory)  # type: ignore[arg-type]
