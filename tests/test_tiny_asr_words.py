"""The trained tiny English/German checkpoint transcribes held-out espeak-ng speech through the CPU engine.

`tests/fixtures/tiny-asr-en-de` was trained by `training/train_tiny_asr.py` (see its TRAINING.md) on
sentences that exclude every sentence in `tests/fixtures/speech-en-de`; CI only runs it. Greedy decoding
must reach a word error rate of at most 5% over all utterances and name each utterance's language.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from training.synthesize import HELDOUT_PER_LANGUAGE, SEED, TRAIN_PER_LANGUAGE, sentence_split, word_errors

from qwenasr_appliance.config import Settings
from qwenasr_appliance.engines.base import TranscribeOptions, run_to_completion
from qwenasr_appliance.engines.cpu.engine import CPUEngine
from qwenasr_appliance.engines.prompt import parse_output

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "tiny-asr-en-de"
SPEECH = FIXTURES / "speech-en-de"
MAX_WER = 0.05


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads((SPEECH / "manifest.json").read_text(encoding="utf-8"))
    return entries


def load(entry: dict[str, Any]) -> np.ndarray:
    audio, rate = sf.read(SPEECH / entry["file"], dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return audio


@pytest.fixture(scope="module")
def engine() -> Iterator[CPUEngine]:
    pytest.importorskip("qwen_asr")
    if not (CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"no trained checkpoint at {CHECKPOINT}: see training/README.md")
    import torch

    threads = torch.get_num_threads()
    loaded = CPUEngine(Settings(model_id=str(CHECKPOINT), cpu_threads=1, max_new_tokens=96))
    asyncio.run(loaded.load())
    yield loaded
    asyncio.run(loaded.close())
    torch.set_num_threads(threads)


def transcribe(engine: CPUEngine, audio: np.ndarray, language: str | None, request_id: str) -> tuple[str, str]:
    options = TranscribeOptions(language=language, max_new_tokens=96)
    output = asyncio.run(run_to_completion(engine, audio, options, request_id))
    parsed = parse_output(output.raw_text, language)
    return parsed.language, parsed.text


def test_fixtures_are_held_out_and_cover_both_languages() -> None:
    entries = manifest()
    assert len(entries) >= 30
    assert {e["language"] for e in entries} == {"English", "German"}
    assert len({e["voice"] for e in entries}) >= 4
    assert len({e["text"] for e in entries}) == len(entries)
    # The recipe's split, redrawn: every fixture sentence is held out and none is a training sentence.
    held, training = sentence_split(SEED, HELDOUT_PER_LANGUAGE, TRAIN_PER_LANGUAGE)
    for entry in entries:
        assert entry["text"] in held[entry["language"]]
        assert entry["text"] not in training[entry["language"]]


def test_held_out_speech_is_transcribed_with_its_language(engine: CPUEngine) -> None:
    edits = words = 0
    wrong: list[str] = []
    for index, entry in enumerate(manifest()):
        language, text = transcribe(engine, load(entry), None, f"words-{index}")
        reference = entry["text"].split()
        distance = word_errors(reference, text.lower().split())
        edits, words = edits + distance, words + len(reference)
        if language != entry["language"] or distance:
            wrong.append(f"{entry['file']}: {entry['language']} {entry['text']!r} -> {language} {text!r}")
        assert language == entry["language"], wrong[-1]
    assert edits / words <= MAX_WER, "\n".join(wrong)


def test_a_forced_language_gives_the_text_alone(engine: CPUEngine) -> None:
    entries = manifest()
    for entry in [next(e for e in entries if e["language"] == lang) for lang in ("English", "German")]:
        language, text = transcribe(engine, load(entry), entry["language"], f"forced-{entry['file']}")
        assert language == entry["language"]
        assert "<asr_text>" not in text and not text.startswith("language")
        assert word_errors(entry["text"].split(), text.split()) <= 1, text
