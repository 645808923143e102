"""A tiny Qwen3-ASR checkpoint: the real architecture at toy sizes, random weights, a synthetic tokenizer.

`build_tiny_qwen3_asr(dir)` writes a directory that `qwen_asr.Qwen3ASRModel.from_pretrained(dir)` loads
and runs end to end (Whisper features -> audio encoder -> Qwen3 decoder -> text). The layout follows
`gpu/make_dummy_qwen3_asr.py` (same special tokens in the same order, same chat template), but
the special tokens sit right after the 256 byte symbols instead of at 151643, so the vocabulary and the
embeddings stay small.

The language model head only scores printable ASCII bytes: every other row is zero while the printable
rows are random and scaled up, so decoding (greedy, and in practice sampled) picks printable text, never
EOS and never `<asr_text>`. Generation therefore runs to `max_new_tokens` unless a repetition loop is cut
short, which keeps output lengths predictable in tests. Greedy output soon falls into such loops, as real
Qwen3-ASR sometimes does on long audio. Sizes: about 46k parameters, a 190 kB safetensors file.

Register the `tiny_model_dir` fixture with `pytest_plugins = ["tests.tiny_model"]` (or import it) in
`tests/conftest.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>",
    "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|reserved_0|>",
    "<|audio_pad|>", *(f"<|reserved_{i}|>" for i in range(1, 28)), "<asr_text>", "<timestamp>",
)  # fmt: skip
NOT_SPECIAL = frozenset({"<asr_text>"})  # the model's own output keeps it after skip_special_tokens
BYTE_SYMBOLS = 256
VOCAB_SIZE = 320  # 256 bytes + 63 added tokens, rounded up
TOKEN_IDS: dict[str, int] = {token: BYTE_SYMBOLS + index for index, token in enumerate(SPECIAL_TOKENS)}
SEED = 1234

# Byte-for-byte the dummy-model template, which reproduces the released checkpoints' prompt layout.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ['audio', 'audio_url'] %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

AUDIO_CONFIG: dict[str, Any] = {
    "num_mel_bins": 128,  # must match the feature extractor
    "d_model": 32,
    "encoder_layers": 1,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "output_dim": 32,  # = text hidden_size
    "downsample_hidden_size": 8,
    "max_source_positions": 1500,
    "n_window": 50,
    "n_window_infer": 800,
    "conv_chunksize": 500,
    "activation_function": "gelu",
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000,
    "hidden_act": "silu",
    "tie_word_embeddings": False,  # the head is edited below; tying would edit the embeddings too
    # head_dim / 2 = 8 frequencies split over the (t, h, w) sections, as [24, 20, 20] splits 64.
    "rope_scaling": {
        "rope_type": "default",
        "mrope_section": [4, 2, 2],
        "mrope_interleaved": True,
        "interleaved": True,
    },
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-symbol table, which Qwen2's byte-level BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[byte]) for byte in range(256)]


def _write_tokenizer(directory: Path) -> None:
    symbols = _bytes_to_unicode()
    vocab = {symbol: byte for byte, symbol in enumerate(symbols)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    added = {
        str(token_id): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": token not in NOT_SPECIAL}
        for token, token_id in TOKEN_IDS.items()
    }  # fmt: skip
    audio_tokens = {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                    "audio_eos_token": "<|audio_end|>"}  # fmt: skip
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "model_max_length": 65536,
        "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        **audio_tokens, "extra_special_tokens": audio_tokens, "chat_template": CHAT_TEMPLATE,
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}), encoding="utf-8")


def _write_preprocessor(directory: Path) -> None:
    config = {
        "feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "Qwen3ASRProcessor",
        "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 30,
        "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": True, "dither": 0.0,
    }  # fmt: skip
    (directory / "preprocessor_config.json").write_text(json.dumps(config), encoding="utf-8")


def _write_weights(directory: Path) -> None:
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    config = Qwen3ASRConfig(
        thinker_config={
            "audio_config": AUDIO_CONFIG,
            "text_config": TEXT_CONFIG,
            "audio_token_id": TOKEN_IDS["<|audio_pad|>"],
            "audio_start_token_id": TOKEN_IDS["<|audio_start|>"],
            "audio_end_token_id": TOKEN_IDS["<|audio_end|>"],
        },
        support_languages=["Chinese", "English"],
        architectures=["Qwen3ASRForConditionalGeneration"],
    )
    torch.manual_seed(SEED)
    model = Qwen3ASRForConditionalGeneration(config).eval()
    printable = [ord(" "), *range(ord("!"), ord("~") + 1)]
    with torch.no_grad():
        head = model.thinker.lm_head.weight
        keep = head[printable].clone()
        head.zero_()
        head[printable] = keep * 50.0  # logits of about +-10 dwarf the zeros, so sampling stays printable too
    model.generation_config.eos_token_id = [TOKEN_IDS["<|im_end|>"], TOKEN_IDS["<|endoftext|>"]]
    model.generation_config.pad_token_id = TOKEN_IDS["<|endoftext|>"]
    model.save_pretrained(directory, safe_serialization=True)


def build_tiny_qwen3_asr(directory: Path) -> Path:
    """Write the tiny checkpoint into `directory` (created if needed) and return it."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_weights(directory)
    _write_tokenizer(directory)
    _write_preprocessor(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-ASR checkpoint directory, built once per test session."""
    pytest.importorskip("qwen_asr")
    return build_tiny_qwen3_asr(tmp_path_factory.mktemp("tiny-qwen3-asr"))
