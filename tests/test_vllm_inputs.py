"""Engine inputs built from worker features must be what vLLM's renderer would have made.

The pure parts run everywhere. The last test builds vLLM 0.26's real renderer on a dummy Qwen3-ASR
directory and compares; it runs where vLLM is installed (the GPU host) and is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from qwenasr_appliance.audio.features import LogMelExtractor
from qwenasr_appliance.engines.prompt import build_prompt
from qwenasr_appliance.engines.vllm.common import audio_tokens
from qwenasr_appliance.engines.vllm.inputs import (
    FEATURE_TOLERANCE,
    ChunkFeatures,
    EngineInputBuilder,
    bfloat16_bits,
    chunk_features,
    differences,
    expand_placeholder,
    placeholder_tokens,
)

PAD = 9
MAKE_DUMMY = Path(__file__).resolve().parents[1] / "gpu" / "make_dummy_qwen3_asr.py"


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16_000)) * 0.1).astype(np.float32)


def test_placeholder_tokens_follow_the_encoder() -> None:
    assert placeholder_tokens(3000) == 390  # 30 s
    assert placeholder_tokens(237) == 31  # what vLLM 0.26 inserted for 2.37 s
    assert placeholder_tokens(100) == 13
    assert placeholder_tokens(1) == 1
    for frames in range(1, 3001, 7):
        assert placeholder_tokens(frames) == audio_tokens(frames / 100)


def test_the_one_placeholder_is_expanded_in_place() -> None:
    expanded, offset = expand_placeholder([1, 2, PAD, 3], PAD, 4)
    assert expanded == [1, 2, PAD, PAD, PAD, PAD, 3] and offset == 2


@pytest.mark.parametrize("tokens", [[1, 2, 3], [PAD, 1, PAD]])
def test_a_prompt_without_exactly_one_placeholder_is_refused(tokens: list[int]) -> None:
    with pytest.raises(ValueError, match="one audio placeholder"):
        expand_placeholder(tokens, PAD, 4)


def test_audio_too_short_for_the_encoder_is_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        expand_placeholder([PAD], PAD, 0)


def test_worker_features_are_the_extractors_and_the_hash_follows_the_samples() -> None:
    audio = noise(1.5)
    chunk = chunk_features(LogMelExtractor(), audio)
    np.testing.assert_array_equal(chunk.features, LogMelExtractor()(audio))
    assert chunk.frames == 150
    assert chunk.digest == chunk_features(LogMelExtractor(), audio.copy()).digest
    changed = audio.copy()
    changed[-1] += 1e-3
    assert chunk_features(LogMelExtractor(), changed).digest != chunk.digest
    assert chunk.digest.startswith("qwenasr-")


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_workers_cast_features_exactly_as_torch_casts_them(dtype: str, torch_dtype: torch.dtype) -> None:
    chunk = chunk_features(LogMelExtractor(), noise(2.37), dtype)
    reference = torch.from_numpy(LogMelExtractor()(noise(2.37))).to(torch_dtype)
    ours = torch.from_numpy(chunk.features)
    if dtype == "bfloat16":
        ours = ours.view(torch.bfloat16)
    assert chunk.dtype == dtype and chunk.features.flags.c_contiguous and ours.shape == reference.shape
    assert torch.equal(ours.view(torch.int16), reference.view(torch.int16))  # bit for bit


def test_bfloat16_rounding_ties_go_to_even() -> None:
    # float32 patterns exactly halfway between two bfloat16 values, below and above, both signs
    patterns = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000], dtype=np.uint32)
    values = patterns.view(np.float32)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bfloat16_bits(values), expected)


def test_the_builder_tokenizes_each_prompt_once_and_expands_the_placeholder() -> None:
    calls: list[str] = []
    built: list[tuple[str, list[int], int, int, ChunkFeatures]] = []

    async def tokenize(prompt: str) -> list[int]:
        calls.append(prompt)
        return [len(prompt), PAD, 0]

    def assemble(prompt: str, ids: list[int], offset: int, length: int, chunk: ChunkFeatures) -> str:
        built.append((prompt, ids, offset, length, chunk))
        return "input"

    async def main() -> None:
        builder = EngineInputBuilder(tokenize, assemble, PAD)
        chunk = chunk_features(LogMelExtractor(), noise(2.37))
        for prompt in ("a", "bb", "a", "a"):
            assert await builder.build(prompt, chunk) == "input"

    asyncio.run(main())
    assert calls == ["a", "bb"]
    prompt, ids, offset, length, _ = built[0]
    assert (prompt, offset, length) == ("a", 1, 31)
    assert ids == [1, *([PAD] * 31), 0]


def test_the_prompt_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qwenasr_appliance.engines.vllm.inputs.PROMPT_CACHE_SIZE", 2)
    calls: list[str] = []

    async def tokenize(prompt: str) -> list[int]:
        calls.append(prompt)
        return [PAD]

    async def main() -> None:
        builder = EngineInputBuilder(tokenize, lambda *args: None, PAD)
        for prompt in ("a", "b", "a", "c", "a", "b"):
            await builder.prompt_tokens(prompt)

    asyncio.run(main())
    assert calls == ["a", "b", "c", "b"]  # "a" was used more recently than "b" when "c" came: "b" was dropped


# -- comparing with the renderer's output ---------------------------------------------------------


class Batched:
    pass


class Flat:
    pass


def engine_input(features: torch.Tensor, tokens: list[int] | None = None, offset: int = 1) -> dict[str, Any]:
    frames = features.shape[1]
    return {
        "type": "multimodal",
        "prompt_token_ids": tokens if tokens is not None else [1, *([PAD] * placeholder_tokens(frames)), 2],
        "mm_placeholders": {"audio": [SimpleNamespace(offset=offset, length=placeholder_tokens(frames))]},
        "mm_kwargs": {
            "audio": [
                {
                    "input_audio_features": SimpleNamespace(field=Flat(), data=features),
                    "feature_attention_mask": SimpleNamespace(field=Batched(), data=torch.ones(frames)),
                    "audio_feature_lengths": SimpleNamespace(field=Batched(), data=torch.tensor(frames)),
                }
            ]
        },
    }


FEATURES = torch.from_numpy(LogMelExtractor()(noise(2.37))).to(torch.bfloat16)


def test_identical_inputs_have_no_differences() -> None:
    assert differences(engine_input(FEATURES), engine_input(FEATURES.clone())) == []


def test_features_one_bf16_step_apart_count_as_equal() -> None:
    nudged = FEATURES.clone()
    nudged[0, 0] = nudged[0, 0].float() + FEATURE_TOLERANCE / 2
    assert differences(engine_input(FEATURES), engine_input(nudged)) == []


@pytest.mark.parametrize(
    ("theirs", "expected"),
    [
        (engine_input(FEATURES, tokens=[1, PAD, 2]), "prompt_token_ids"),
        (engine_input(FEATURES, offset=2), "mm_placeholders"),
        (engine_input(FEATURES.float()), "!= (128, 237) torch.float32"),
        (engine_input(FEATURES[:80]), "!= (80, 237) torch.bfloat16"),
        (engine_input(FEATURES + 0.5), "input_audio_features: values differ"),
    ],
)
def test_differences_are_named(theirs: dict[str, Any], expected: str) -> None:
    found = differences(engine_input(FEATURES), theirs)
    assert any(expected in line for line in found), found


def test_a_missing_field_or_item_is_a_difference() -> None:
    theirs = engine_input(FEATURES)
    del theirs["mm_kwargs"]["audio"][0]["feature_attention_mask"]
    assert differences(engine_input(FEATURES), theirs)[0].startswith("mm_kwargs fields")
    theirs["mm_kwargs"]["audio"] = []
    assert differences(engine_input(FEATURES), theirs)[0].startswith("mm_kwargs: not one audio item")


def test_a_different_field_kind_is_a_difference() -> None:
    theirs = engine_input(FEATURES)
    theirs["mm_kwargs"]["audio"][0]["audio_feature_lengths"].field = Flat()
    assert differences(engine_input(FEATURES), theirs) == ["audio_feature_lengths: field kinds differ"]


# -- against vLLM's own renderer (where vLLM is installed) -----------------------------------------


def test_inputs_built_here_equal_vllms_renderer(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    if not MAKE_DUMMY.is_file():
        pytest.skip(f"needs {MAKE_DUMMY}")
    from bench.engine_inputs import vllm_renderer

    from qwenasr_appliance.engines.vllm.inputs import vllm_input_builder

    subprocess.run([sys.executable, str(MAKE_DUMMY), str(tmp_path / "model"), "0.6b"], check=True)
    llm = vllm_renderer(tmp_path / "model")
    builder = vllm_input_builder(llm)

    async def main() -> None:
        cases = [(2.37, "", None), (30.0, "names: Zoë, Ødegaard", "English"), (0.5, "", "Chinese"), (17.013, "", None)]
        for seconds, context, language in cases:
            audio = noise(seconds, seed=int(seconds * 1000))
            prompt = build_prompt(context, language)
            (theirs,) = await llm.renderer.render_cmpl_async(
                [{"prompt": prompt, "multi_modal_data": {"audio": (audio, 16_000)}}]
            )
            ours = await builder.build(prompt, chunk_features(LogMelExtractor(), audio, builder.feature_dtype))
            assert differences(ours, theirs) == [], seconds
            float32 = await builder.build(prompt, chunk_features(LogMelExtractor(), audio))  # cast here instead
            assert differences(float32, theirs) == [], seconds
        # and a real difference is seen: 80 mel bands where the model wants 128
        audio = noise(3.0)
        (theirs,) = await llm.renderer.render_cmpl_async(
            [{"prompt": build_prompt("", None), "multi_modal_data": {"audio": (audio, 16_000)}}]
        )
        ours = await builder.build(build_prompt("", None), chunk_features(LogMelExtractor(n_mels=80), audio))
        assert differences(ours, theirs) == [
            "input_audio_features: (80, 300) torch.bfloat16 != (128, 300) torch.bfloat16"
        ]

    asyncio.run(main())
