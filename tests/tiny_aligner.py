"""A tiny Qwen3-ForcedAligner checkpoint: the real architecture at toy sizes, random weights, the tiny
ASR checkpoint's synthetic tokenizer.

Qwen3-ForcedAligner-0.6B is a Qwen3-ASR model whose thinker config says `model_type:
"qwen3_forced_aligner"` and whose LM head is a `classify_num`-way classifier over time bins of
`timestamp_segment_time` ms, read at each `<timestamp>` token (`timestamp_token_id` at the top level).
`build_tiny_forced_aligner(dir)` writes that layout so `qwen_asr.Qwen3ForcedAligner.from_pretrained(dir)`
loads it and aligns end to end (Whisper features -> audio encoder -> Qwen3 decoder -> time bins), and
vLLM's `Qwen3ASRForcedAlignerForTokenClassification` can load it too (pass head sizes vLLM's attention
kernels accept, e.g. `text_sizes=GPU_TEXT_SIZES`).

transformers writes a sub-config's class `model_type` when saving, so the thinker's
"qwen3_forced_aligner" is patched into config.json afterwards (the released checkpoint has it there).
With random weights the predicted bins are anywhere in [0, classify_num): the package's repair makes
them non-decreasing, and the appliance must keep them inside the audio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_model import AUDIO_CONFIG, TEXT_CONFIG, TOKEN_IDS, _write_preprocessor, _write_tokenizer

CLASSIFY_NUM = 512  # x 80 ms: up to 41 s, longer than the 30 s chunks (the released model: 5000)
SEGMENT_MS = 80
KEPT_BINS = 100  # bins the tiny head predicts: the first 8 s
SEED = 4321
# Sizes for loading the checkpoint in vLLM on a GPU: attention head size 64 instead of 16.
GPU_AUDIO_SIZES: dict[str, Any] = {"d_model": 128, "encoder_attention_heads": 2, "encoder_ffn_dim": 256,
                                   "output_dim": 128}  # fmt: skip
GPU_TEXT_SIZES: dict[str, Any] = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "head_dim": 64,
                                  "rope_scaling": {"rope_type": "default", "mrope_section": [16, 8, 8],
                                                   "mrope_interleaved": True, "interleaved": True}}  # fmt: skip


def _calibrate_head(model: Any, directory: Path) -> None:
    """Make the random classifier's answers vary from slot to slot, within the first `KEPT_BINS` bins.

    At toy sizes every timestamp slot's hidden state is nearly the same vector, so a random head picks
    the same bin everywhere. Removing that common direction from the head leaves the small differences
    between slots (what attention gathered from the audio and the words before) to decide: the bins
    then jump around and go backwards at times, which the aligner's repair has to fix.
    """
    import numpy as np
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRProcessor

    processor = Qwen3ASRProcessor.from_pretrained(str(directory))
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "runs", "far", "away"]
    text = "<|audio_start|><|audio_pad|><|audio_end|>" + "".join(f"{w}<timestamp><timestamp>" for w in words)
    audio = np.random.default_rng(SEED).standard_normal(3 * 16_000).astype(np.float32) * 0.1
    inputs = processor(text=[text], audio=[audio], return_tensors="pt", padding=True)
    captured: list[Any] = []
    hook = model.thinker.lm_head.register_forward_hook(lambda _m, args, _out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model.thinker(**inputs)
    finally:
        hook.remove()
    slots = captured[0][0][inputs["input_ids"][0] == TOKEN_IDS["<timestamp>"]]
    common = slots.mean(dim=0)
    with torch.no_grad():
        head = model.thinker.lm_head.weight
        head -= torch.outer(head @ common, common) / common.dot(common)
        head[KEPT_BINS:] = 0.0


def _write_weights(directory: Path, audio_sizes: dict[str, Any], text_sizes: dict[str, Any]) -> None:
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    thinker = {
        "model_type": "qwen3_forced_aligner",
        "classify_num": CLASSIFY_NUM,
        "audio_config": {**AUDIO_CONFIG, **audio_sizes},
        "text_config": {**TEXT_CONFIG, **text_sizes},
        "audio_token_id": TOKEN_IDS["<|audio_pad|>"],
        "audio_start_token_id": TOKEN_IDS["<|audio_start|>"],
        "audio_end_token_id": TOKEN_IDS["<|audio_end|>"],
    }
    config = Qwen3ASRConfig(
        thinker_config=thinker,
        support_languages=["Chinese", "English"],
        architectures=["Qwen3ASRForConditionalGeneration"],
        timestamp_token_id=TOKEN_IDS["<timestamp>"],
        timestamp_segment_time=SEGMENT_MS,
    )
    torch.manual_seed(SEED)
    model = Qwen3ASRForConditionalGeneration(config).eval()
    assert model.thinker.lm_head.out_features == CLASSIFY_NUM, "the thinker did not build the classifier head"
    _calibrate_head(model, directory)
    model.save_pretrained(directory, safe_serialization=True)
    path = directory / "config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved["thinker_config"]["model_type"] = "qwen3_forced_aligner"
    saved["timestamp_token_id"] = TOKEN_IDS["<timestamp>"]
    saved["timestamp_segment_time"] = SEGMENT_MS
    path.write_text(json.dumps(saved, indent=2), encoding="utf-8")


def build_tiny_forced_aligner(
    directory: Path, *, audio_sizes: dict[str, Any] | None = None, text_sizes: dict[str, Any] | None = None
) -> Path:
    """Write the tiny aligner checkpoint into `directory` (created if needed) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(directory)
    _write_preprocessor(directory)
    _write_weights(directory, audio_sizes or {}, text_sizes or {})
    return directory


@pytest.fixture(scope="session")
def tiny_aligner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-ForcedAligner checkpoint directory, built once per test session."""
    pytest.importorskip("qwen_asr")
    return build_tiny_forced_aligner(tmp_path_factory.mktemp("tiny-forced-aligner"))


if __name__ == "__main__":  # python -m tests.tiny_aligner DIR [gpu]: a checkpoint for the GPU smoke run
    import sys

    gpu = len(sys.argv) > 2 and sys.argv[2] == "gpu"
    sizes = {"audio_sizes": GPU_AUDIO_SIZES, "text_sizes": GPU_TEXT_SIZES} if gpu else {}
    print(build_tiny_forced_aligner(Path(sys.argv[1]), **sizes))
