"""Streamed text through the pipeline (`TranscriptionService.stream`) with the test double engine playing
what a real model writes: the joined `transcript.text.delta`s equal the final text, and that equals the
non-streamed transcript of the same engine output (docs/accuracy.md, Streaming)."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import soundfile as sf
from prometheus_client import CollectorRegistry

from qwenasr_appliance.config import load_settings
from qwenasr_appliance.metrics import Metrics
from qwenasr_appliance.supervisor.probe import VramProbe
from qwenasr_appliance.supervisor.supervisor import EngineSupervisor
from qwenasr_appliance.transcription.admission import AdmissionController
from qwenasr_appliance.transcription.pipeline import RequestStats, TranscriptionRequest, TranscriptionService
from qwenasr_appliance.transcription.types import StreamDelta, StreamDone, Transcript
from tests.doubles import DoubleBehaviour, TestDoubleEngine, double_factory
from tests.hardening import tone_wav

LOOP = ("and then we went home again ",) * 25
CASES: dict[str, tuple[tuple[str, ...], str | None, str, str]] = {
    # name: (engine tokens, forced language, prompt, expected text of one chunk)
    "loop": (("language English<asr_text>", *LOOP, "the", " end."), None, "", "and then we went home again " * 2 + "the end."),
    "loop forced": (("well ", *LOOP, "done"), "English", "", "well " + "and then we went home again " * 2 + "done"),
    "short loop": (("language English<asr_text>", *("ha",) * 40, " ok"), None, "", "haha ok"),
    "control tokens": (
        ("language English<asr_text>", "Hello", " <|im_end|>", " world", "<asr_", "text>", " again", "<|endoftext|>"),
        None, "", "Hello world again",
    ),
    "control token only": (("<asr_text>",), "English", "", ""),
    "header written again": (("one ", "language", " German", "<asr_text>", "zwei"), "English", "", "one zwei"),
    "cut-off tag": (("language German<asr_text>", "Hallo ", "<asr", "_te"), None, "", "Hallo"),
    "silence": (("language None", "<asr_text>"), None, "", ""),
    "context echo": (
        ("language English<asr_text>", "Speakers", " Alice", " and", " Bob,", " terms", " Kubernetes"),
        None, "Speakers: Alice and Bob. Terms: Kubernetes.", "",
    ),
    "hotword said": (("language English<asr_text>", "Kubernetes", " is", " fine"), None, "Terms: Kubernetes", "Kubernetes is fine"),
}  # fmt: skip


def _service(
    behaviour: DoubleBehaviour, **env: str
) -> tuple[TranscriptionService, EngineSupervisor, list[TestDoubleEngine]]:
    settings = load_settings({"DECODE_WORKERS": "1", **env})
    metrics = Metrics(CollectorRegistry())
    made, factory = double_factory(behaviour)
    supervisor = EngineSupervisor(
        settings,
        engine_factory=factory,  # type: ignore[arg-type]
        probe=VramProbe,
        metrics=metrics,
        vllm_available=False,
        cpu_available=True,
    )
    admission = AdmissionController(max_concurrent=4, max_queue=4, queue_timeout=10, metrics=metrics)
    return TranscriptionService(settings, supervisor, admission, metrics=metrics), supervisor, made


def _request(audio: bytes, language: str | None, prompt: str, *, stream: bool) -> TranscriptionRequest:
    return TranscriptionRequest(audio=audio, filename="a.wav", language=language, prompt=prompt,
                                temperature=0.0, stream=stream)  # fmt: skip


def _long_wav(chunks: int) -> bytes:
    """`chunks` pieces of 4 s of tone, each followed by 1 s of silence: cut into `chunks` chunks at 5 s."""
    rate = 16_000
    tone = np.frombuffer(tone_wav(4.0)[44:], dtype="<i2").astype(np.float32) / 32768
    piece = np.concatenate([tone, np.zeros(rate, dtype=np.float32)])
    out = io.BytesIO()
    sf.write(out, np.tile(piece, chunks), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


async def _both(service: TranscriptionService, supervisor: EngineSupervisor, audio: bytes, language: str | None,
                prompt: str) -> tuple[list[str], Transcript, Transcript]:  # fmt: skip
    await supervisor.start()
    assert await supervisor.wait_ready(5)
    try:
        deltas: list[str] = []
        done: Transcript | None = None
        async for event in service.stream(_request(audio, language, prompt, stream=True), "s", RequestStats()):
            if isinstance(event, StreamDelta):
                assert event.text
                deltas.append(event.text)
            else:
                assert isinstance(event, StreamDone)
                done = event.transcript
        assert done is not None
        whole = await service.transcribe(_request(audio, language, prompt, stream=False), "w", RequestStats())
        return deltas, done, whole
    finally:
        service.close()
        await supervisor.stop()


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_joined_deltas_equal_the_final_and_the_non_streamed_text(name: str, chunks: int) -> None:
    tokens, language, prompt, expected = CASES[name]
    service, supervisor, made = _service(DoubleBehaviour(script=tokens), CHUNK_SECONDS="5")
    audio = tone_wav(2.0) if chunks == 1 else _long_wav(chunks)
    deltas, done, whole = asyncio.run(_both(service, supervisor, audio, language, prompt))
    assert len(made[0].calls) == 2 * chunks  # the audio was really cut into `chunks` chunks, twice
    assert "".join(deltas) == done.text == whole.text
    assert done.text == " ".join([expected] * chunks if expected else [])
    assert done.segments == whole.segments
    if len(expected.split()) > 2:
        assert len(deltas) > 1  # streamed as it came, not all at the end


def test_silent_audio_streams_nothing_and_ends_empty() -> None:
    service, supervisor, made = _service(DoubleBehaviour())
    silence = io.BytesIO()
    sf.write(silence, np.zeros(32_000, dtype=np.float32), 16_000, format="WAV", subtype="PCM_16")
    deltas, done, whole = asyncio.run(_both(service, supervisor, silence.getvalue(), None, ""))
    assert deltas == [] and done.text == whole.text == "" and made[0].calls == []


def test_confidence_and_truncation_reach_the_segments() -> None:
    behaviour = DoubleBehaviour(script=("language English<asr_text>", "Hello", " world"), finish_reason="length")
    service, supervisor, _ = _service(behaviour)

    async def scenario() -> Transcript:
        await supervisor.start()
        assert await supervisor.wait_ready(5)
        try:
            request = TranscriptionRequest(audio=tone_wav(2.0), filename="a.wav", language=None, prompt="",
                                           temperature=0.0, stream=False, confidence=True)  # fmt: skip
            return await service.transcribe(request, "c", RequestStats())
        finally:
            service.close()
            await supervisor.stop()

    transcript = asyncio.run(scenario())
    [segment] = transcript.segments
    assert transcript.truncated and segment.truncated
    assert segment.avg_logprob == pytest.approx(-0.25)  # the header token is not part of the transcript
    assert segment.no_speech_prob == pytest.approx(0.125)
    assert [t.token for t in transcript.logprobs] == ["Hello", " world"]
