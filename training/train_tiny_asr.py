"""Train a small Qwen3-ASR (the real architecture) on espeak-ng English and German, then evaluate it.

    PYTHONPATH=src:. python -m training.train_tiny_asr --out tests/fixtures/tiny-asr-en-de \
        --fixtures tests/fixtures/speech-en-de

Steps: write the checkpoint skeleton (tokenizer, preprocessor and chat template of `tests.tiny_model`),
synthesize the data (`training.synthesize`), compute the log-mel features once with the checkpoint's own
processor (so training features equal the server's), train with AdamW on the server's exact prompt
(`qwenasr_appliance.engines.prompt.build_prompt`), save safetensors, and measure held-out WER through
the server's CPU engine. Targets are the released model's output form: `language English<asr_text>seven
three<|im_end|>` with no forced language, or the text alone when the prompt forces the language.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import random
import shutil
import subprocess
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tests.tiny_model import TOKEN_IDS, VOCAB_SIZE, _write_preprocessor, _write_tokenizer

from qwenasr_appliance.engines.prompt import AUDIO_PLACEHOLDER, build_prompt, parse_output
from training.synthesize import (
    HELDOUT_PER_LANGUAGE,
    SAMPLE_RATE,
    SEED,
    TRAIN_PER_LANGUAGE,
    VOCABULARY,
    Utterance,
    recipes,
    render,
    sentence_split,
    word_errors,
)

AUDIO_PAD = "<|audio_pad|>"
IM_END = "<|im_end|>"
# head_dim is 64 in the encoder (d_model / heads) and the decoder, as vLLM's GPU attention wants.
AUDIO_CONFIG: dict[str, Any] = {
    "num_mel_bins": 128,
    "d_model": 128,
    "encoder_layers": 3,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 512,
    "output_dim": 128,  # = text hidden_size
    "downsample_hidden_size": 32,
    "max_source_positions": 1500,
    "n_window": 50,  # 100-frame (1 s) chunks through the convolutions, as released
    "n_window_infer": 800,
    "conv_chunksize": 500,
    "activation_function": "gelu",
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    # head_dim / 2 = 32 rotary frequencies over the (t, h, w) sections, in the released [24, 20, 20]:64 ratio.
    "rope_scaling": {"rope_type": "default", "mrope_section": [12, 10, 10], "mrope_interleaved": True,
                     "interleaved": True},
}  # fmt: skip
LANGUAGES = ["English", "German"]
# Word -> CTC class (0 is the blank), over both vocabularies; used in training only, never saved.
WORD_INDEX = {word: index for index, word in enumerate(dict.fromkeys(w for ws in VOCABULARY.values() for w in ws), 1)}


@dataclass
class Example:
    """One training utterance: features (128, T) float16 and token ids for both prompt forms."""

    features: np.ndarray  # (128, T) log-mel, T = samples // 160
    auto_ids: list[int]  # prompt without a language, then `language X<asr_text>text<|im_end|>`
    auto_prompt: int  # how many of auto_ids are prompt (no loss)
    forced_ids: list[int]  # prompt ending in `language X<asr_text>`, then `text<|im_end|>`
    forced_prompt: int
    words: list[int]  # the text as indices into WORD_INDEX, targets of the auxiliary CTC loss


def audio_tokens(frames: int) -> int:
    """Audio placeholders for `frames` mel frames: qwen-asr's `_get_feat_extract_output_lengths`
    (three stride-2 convolutions per 100-frame chunk, 13 tokens per full chunk)."""
    leave = frames % 100
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (frames // 100) * 13


def build_model(seed: int) -> Any:
    """A freshly initialised Qwen3ASRForConditionalGeneration of the sizes above."""
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    config = Qwen3ASRConfig(
        thinker_config={
            "audio_config": AUDIO_CONFIG,
            "text_config": TEXT_CONFIG,
            "audio_token_id": TOKEN_IDS[AUDIO_PAD],
            "audio_start_token_id": TOKEN_IDS["<|audio_start|>"],
            "audio_end_token_id": TOKEN_IDS["<|audio_end|>"],
        },
        support_languages=LANGUAGES,
        architectures=["Qwen3ASRForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config)
    reinit_audio_frontend(model.thinker.audio_tower)
    model.generation_config.eos_token_id = [TOKEN_IDS[IM_END], TOKEN_IDS["<|endoftext|>"]]
    model.generation_config.pad_token_id = TOKEN_IDS["<|endoftext|>"]
    return model


def load_model(directory: Path) -> Any:
    """The Qwen3ASRForConditionalGeneration saved in `directory`, in float32, to train further."""
    from qwen_asr.core.transformers_backend import Qwen3ASRForConditionalGeneration

    return Qwen3ASRForConditionalGeneration.from_pretrained(directory, torch_dtype=torch.float32)


def reinit_audio_frontend(tower: Any) -> None:
    """He-initialise the audio tower's three stride-2 convolutions (zero bias) and their output projection.

    qwen-asr's `_init_weights` draws every weight from N(0, 0.02). Through convolutions of fan-in 9, 288
    and 288 with GELUs that shrinks the log-mel input about 10^4-fold relative to the sinusoidal position
    embedding added after `conv_out`, so the encoder starts out blind to the audio: in a first run the
    decoder never learned to use it. He initialisation (std sqrt(2 / fan_in), He et al. 2015) keeps the
    input's variance through the stack; the encoder's output then depends on the audio from the start.
    """
    for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3):
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
    torch.nn.init.kaiming_normal_(tower.conv_out.weight, nonlinearity="relu")


_PROCESSOR: Any = None
PAUSE_S = (0.1, 2.0)  # pauses between the utterances of a multi-utterance recording, seconds
PAUSE_NOISE_DBFS: tuple[float | None, ...] = (None, -70.0, -60.0, -50.0)  # None: digital silence


@dataclass(frozen=True)
class Recording:
    """A training example's audio: utterances one after another, each followed by a pause.

    A single utterance is a recording of one part and no pause. Longer recordings teach the model what
    the server gives it for long audio: chunks of up to CHUNK_SECONDS (30 s) holding several sentences.
    """

    parts: tuple[int, ...]  # indices into the training utterances
    pauses: tuple[float, ...]  # seconds after each part
    noise_dbfs: float | None  # level of the white noise in the pauses (dBFS RMS); None: silence
    seed: int  # the pauses' noise


def compose_recordings(utterances: Sequence[Utterance], count: int, max_seconds: float, seed: int) -> list[Recording]:
    """`count` multi-utterance recordings of the training utterances, each of a target length drawn
    uniformly from 4 s to `max_seconds` (estimated from words and speaking rate; the worker drops parts
    that overflow `max_seconds`). Half of them keep to one language, half mix both."""
    rng = random.Random(seed)
    by_language = {language: [i for i, u in enumerate(utterances) if u.language == language] for language in LANGUAGES}
    everyone = list(range(len(utterances)))
    recordings = []
    for _ in range(count):
        pool = by_language[rng.choice(LANGUAGES)] if rng.random() < 0.5 else everyone
        target = rng.uniform(4.0, max_seconds)
        parts: list[int] = []
        pauses: list[float] = []
        length = 0.0
        while length < target:
            index = rng.choice(pool)
            pause = rng.uniform(*PAUSE_S)
            parts.append(index)
            pauses.append(pause)
            length += len(utterances[index].text.split()) * 60 / utterances[index].speed + 0.5 + pause
        recordings.append(Recording(tuple(parts), tuple(pauses), rng.choice(PAUSE_NOISE_DBFS), rng.getrandbits(32)))
    return recordings


def assemble(pieces: Sequence[np.ndarray], recording: Recording, max_samples: int) -> tuple[np.ndarray, int]:
    """The recording's float32 samples at 16 kHz (the pieces with their pauses, stopping before a piece
    that would end past `max_samples`, keeping at least one) and how many parts it holds."""
    rng = np.random.default_rng(recording.seed)
    out: list[np.ndarray] = []
    length = kept = 0
    for piece, pause in zip(pieces, recording.pauses, strict=True):
        if kept and length + piece.size > max_samples:
            break
        gap = round(pause * SAMPLE_RATE)
        if recording.noise_dbfs is None:
            silence = np.zeros(gap, np.float32)
        else:
            silence = rng.normal(0.0, 10 ** (recording.noise_dbfs / 20), gap).astype(np.float32)
        out += [piece, silence]
        length += piece.size + gap
        kept += 1
    return np.concatenate(out)[:max_samples], kept


def _featurize(job: tuple[str, list[Utterance], list[bytes | None], Recording, int]) -> tuple[np.ndarray, int, int]:
    """Worker: render (or decode) a recording's utterances, assemble it and compute its features with the
    checkpoint's processor, exactly as the CPU engine calls it (one audio, `padding=True`).
    Returns ((128, T) float16, samples, parts kept)."""
    global _PROCESSOR
    directory, utterances, encoded, recording, max_samples = job
    if _PROCESSOR is None:
        from qwen_asr.core.transformers_backend import Qwen3ASRProcessor

        torch.set_num_threads(1)
        _PROCESSOR = Qwen3ASRProcessor.from_pretrained(directory)
    pieces = [render(u) if e is None else decode_cached(e) for u, e in zip(utterances, encoded, strict=True)]
    audio, kept = assemble(pieces, recording, max_samples)
    inputs = _PROCESSOR(text=[AUDIO_PLACEHOLDER], audio=[audio], return_tensors="np", padding=True)
    return inputs["input_features"][0].astype(np.float16), audio.shape[0], kept


def encode_cached(audio: np.ndarray) -> bytes:
    """One rendered utterance as Ogg Opus at about 20 kbit/s (2.6 kB per second of audio): what
    `--write-audio-cache` stores so the training audio fits the GPU machine's upload limit (that machine
    has no espeak-ng). Opus at this rate keeps the speech; the noise the recipe adds stays noise."""
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="OGG", subtype="OPUS", compression_level=0.95)
    return buffer.getvalue()


def decode_cached(encoded: bytes) -> np.ndarray:
    """Float32 mono samples at 16 kHz of one `encode_cached` utterance."""
    samples, rate = sf.read(io.BytesIO(encoded), dtype="float32")
    assert rate == SAMPLE_RATE, rate
    return np.asarray(samples, dtype=np.float32)


def read_audio_cache(path: Path, utterances: Sequence[Utterance]) -> list[bytes]:
    """The cached audio of `utterances` (a zip of `NNNNN.ogg`, written for exactly these recipes)."""
    with zipfile.ZipFile(path) as archive:
        recorded = json.loads(archive.read("utterances.json"))
        if recorded != [asdict(u) for u in utterances]:
            raise SystemExit(f"{path} was written for other utterances (another seed or size)")
        return [archive.read(f"{i:05d}.ogg") for i in range(len(utterances))]


def write_audio_cache(path: Path, utterances: Sequence[Utterance], workers: int) -> None:
    """Render `utterances` (in `workers` processes) and store them with their recipes in a zip."""
    with ProcessPoolExecutor(workers) as pool:
        encoded = list(pool.map(_render_encoded, utterances, chunksize=32))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("utterances.json", json.dumps([asdict(u) for u in utterances]))
        for i, data in enumerate(encoded):
            archive.writestr(f"{i:05d}.ogg", data)


def _render_encoded(utterance: Utterance) -> bytes:
    return encode_cached(render(utterance))


def make_examples(
    directory: Path,
    utterances: Sequence[Utterance],
    recordings: Sequence[Recording],
    workers: int,
    cached: Sequence[bytes] | None = None,
    max_seconds: float = 30.0,
) -> list[Example]:
    """Features and token ids of every recording (rendered in `workers` processes). A recording's text is
    its utterances' texts joined by spaces; its language is the one most of its words are in."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    jobs = [
        (str(directory), [utterances[i] for i in r.parts], [None if cached is None else cached[i] for i in r.parts],
         r, round(max_seconds * SAMPLE_RATE))
        for r in recordings
    ]  # fmt: skip
    with ProcessPoolExecutor(workers) as pool:
        rendered = list(pool.map(_featurize, jobs, chunksize=16))
    examples = []
    for recording, (features, _, kept) in zip(recordings, rendered, strict=True):
        spoken = [utterances[i] for i in recording.parts[:kept]]
        text = " ".join(u.text for u in spoken)
        words = {language: sum(len(u.text.split()) for u in spoken if u.language == language) for language in LANGUAGES}
        language = max(LANGUAGES, key=lambda name: (words[name], name == spoken[0].language))
        placeholder = AUDIO_PLACEHOLDER.replace(AUDIO_PAD, AUDIO_PAD * audio_tokens(features.shape[1]))
        auto = encode(build_prompt("", None).replace(AUDIO_PLACEHOLDER, placeholder))
        forced = encode(build_prompt("", language).replace(AUDIO_PLACEHOLDER, placeholder))
        examples.append(Example(
            features=features,
            auto_ids=auto + encode(f"language {language}<asr_text>{text}{IM_END}"),
            auto_prompt=len(auto),
            forced_ids=forced + encode(f"{text}{IM_END}"),
            forced_prompt=len(forced),
            words=[WORD_INDEX[word] for word in text.split()],
        ))  # fmt: skip
    return examples


def single_recordings(count: int) -> list[Recording]:
    """Each of `count` utterances as a recording of its own (no pause after it)."""
    return [Recording((i,), (0.0,), None, 0) for i in range(count)]


def collate(batch: Sequence[Example], forced: Sequence[bool]) -> dict[str, torch.Tensor]:
    """A right-padded batch: features concatenated over time (128, sum T) with lengths (B,), input_ids,
    attention_mask and labels (B, L) with -100 on the prompt and the padding."""
    rows = [
        (e.forced_ids, e.forced_prompt) if f else (e.auto_ids, e.auto_prompt)
        for e, f in zip(batch, forced, strict=True)
    ]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), TOKEN_IDS["<|endoftext|>"], dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, prompt) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt : len(ids)] = torch.tensor(ids[prompt:])
        mask[row, : len(ids)] = 1
    features = torch.from_numpy(np.concatenate([e.features for e in batch], axis=1)).float()
    lengths = torch.tensor([e.features.shape[1] for e in batch])
    words = torch.tensor([w for e in batch for w in e.words])
    word_counts = torch.tensor([len(e.words) for e in batch])
    return {"features": features, "lengths": lengths, "input_ids": input_ids, "mask": mask, "labels": labels,
            "words": words, "word_counts": word_counts}  # fmt: skip


def train_step(
    model: Any, batch: dict[str, torch.Tensor], ctc_head: torch.nn.Linear | None, ctc_weight: float
) -> torch.Tensor:
    """Loss of one batch: the audio tower runs once over all utterances (its attention is block-diagonal
    per utterance through `cu_seqlens`, as for one utterance at a time), its outputs replace the audio
    placeholders, and the decoder's causal LM loss is the mean cross-entropy over the target tokens.

    With `ctc_head`, `ctc_weight` times a word-level CTC loss on the audio tower's outputs (12.5 per
    second) is added: the hybrid CTC/attention objective (Watanabe et al. 2017), which makes the encoder
    learn where the words are long before the decoder's attention would. The head is not saved."""
    thinker = model.thinker
    audio = thinker.audio_tower(batch["features"], feature_lens=batch["lengths"]).last_hidden_state
    ctc = audio.new_zeros(())
    if ctc_head is not None:
        counts = [audio_tokens(int(n)) for n in batch["lengths"]]
        per_utterance = torch.nn.utils.rnn.pad_sequence(list(ctc_head(audio).split(counts)))  # (T, B, classes)
        ctc = torch.nn.functional.ctc_loss(per_utterance.log_softmax(-1), batch["words"], torch.tensor(counts, device=audio.device),
                                           batch["word_counts"], zero_infinity=True)  # fmt: skip
    embeds = thinker.get_input_embeddings()(batch["input_ids"])
    assert int((batch["input_ids"] == TOKEN_IDS[AUDIO_PAD]).sum()) == audio.shape[0], "placeholders != audio outputs"
    slots = (batch["input_ids"] == TOKEN_IDS[AUDIO_PAD]).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, audio.to(embeds.dtype))
    output = thinker(inputs_embeds=embeds, attention_mask=batch["mask"], labels=batch["labels"])
    return output.loss + ctc_weight * ctc


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps to `peak`, then cosine decay to a tenth of it as `progress`
    (the larger of the shares of steps and of the time budget used) goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(model: Any, examples: list[Example], args: argparse.Namespace) -> dict[str, float]:
    """AdamW over `args.steps` batches of `args.batch` utterances; a share `args.forced` of rows uses the
    forced-language prompt. Batches are drawn from length-sorted pools of 50 batches to limit padding."""
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed + 3)
    device = torch.device(args.device)
    model.to(device)
    ctc_head = torch.nn.Linear(AUDIO_CONFIG["output_dim"], len(WORD_INDEX) + 1) if args.ctc_weight > 0 else None
    if ctc_head is not None:
        ctc_head.to(device)
    parameters = [*model.parameters(), *(ctc_head.parameters() if ctc_head is not None else ())]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    budget = args.minutes * 60
    model.train()
    order: list[int] = []
    started = time.perf_counter()
    smoothed = 0.0
    step = 0
    while True:
        progress = max(step / args.steps, (time.perf_counter() - started) / budget)
        if progress >= 1:
            break
        if not order:
            order = list(range(len(examples)))
            rng.shuffle(order)
            pools = [order[i : i + 50 * args.batch] for i in range(0, len(order), 50 * args.batch)]
            batches = []
            for pool in pools:
                pool.sort(key=lambda i: examples[i].features.shape[1])
                batches += [pool[i : i + args.batch] for i in range(0, len(pool), args.batch)]
            rng.shuffle(batches)
            order = [i for b in batches for i in b]
        picked, order = order[: args.batch], order[args.batch :]
        batch = collate([examples[i] for i in picked], [rng.random() < args.forced for _ in picked])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, args.lr, args.warmup)
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = train_step(model, batch, ctc_head, args.ctc_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        value = float(loss.detach())
        smoothed = value if step == 0 else 0.95 * smoothed + 0.05 * value
        step += 1
        if step % 25 == 0:
            elapsed = time.perf_counter() - started
            print(
                f"step {step} loss {value:.4f} smoothed {smoothed:.4f} lr {optimizer.param_groups[0]['lr']:.2e} {elapsed:.0f}s",
                flush=True,
            )
    model.eval()
    model.to("cpu")
    return {"train_seconds": time.perf_counter() - started, "final_loss": smoothed, "steps": step}


def transcribe_all(
    directory: Path, audios: Sequence[np.ndarray], max_new_tokens: int = 128
) -> list[tuple[str, str, float]]:
    """Greedy (language, text, seconds) of each float32 16 kHz audio through the server's CPU engine."""
    from qwenasr_appliance.config import Settings
    from qwenasr_appliance.engines.base import TranscribeOptions, run_to_completion
    from qwenasr_appliance.engines.cpu.engine import CPUEngine

    async def run() -> list[tuple[str, str, float]]:
        engine = CPUEngine(Settings(model_id=str(directory), cpu_threads=1, max_new_tokens=max_new_tokens))
        await engine.load()
        results = []
        try:
            for index, audio in enumerate(audios):
                started = time.perf_counter()
                options = TranscribeOptions(max_new_tokens=max_new_tokens)
                output = await run_to_completion(engine, audio, options, f"eval-{index}")
                parsed = parse_output(output.raw_text, None)
                results.append((parsed.language, parsed.text, time.perf_counter() - started))
        finally:
            await engine.close()
        return results

    return asyncio.run(run())


def evaluate(directory: Path, utterances: Sequence[Utterance], audios: Sequence[np.ndarray]) -> dict[str, Any]:
    """Greedy transcription of every utterance through the server's CPU engine, with WER per language
    (word edits / reference words) and the share of utterances whose language was named correctly."""
    results = transcribe_all(directory, audios)
    report: dict[str, Any] = {"utterances": len(utterances), "per_language": {}, "errors": []}
    totals = [0, 0, 0]
    for language in LANGUAGES:
        edits = words = right = count = 0
        for utterance, (named, text, _) in zip(utterances, results, strict=True):
            if utterance.language != language:
                continue
            reference = utterance.text.split()
            distance = word_errors(reference, text.lower().split())
            edits, words, count = edits + distance, words + len(reference), count + 1
            right += named == language
            if distance or named != language:
                report["errors"].append(
                    {"reference": utterance.text, "language": named, "text": text, "voice": utterance.voice}
                )
        report["per_language"][language] = {"wer": edits / max(1, words), "language_accuracy": right / max(1, count),
                                            "utterances": count, "words": words, "word_errors": edits}  # fmt: skip
        totals = [totals[0] + edits, totals[1] + words, totals[2] + right]
    report["wer"] = totals[0] / max(1, totals[1])
    report["language_accuracy"] = totals[2] / max(1, len(utterances))
    report["seconds_per_utterance"] = sum(r[2] for r in results) / max(1, len(results))
    return report


def evaluate_recordings(
    directory: Path,
    utterances: Sequence[Utterance],
    audios: Sequence[np.ndarray],
    count: int,
    seed: int,
    max_seconds: float,
) -> dict[str, Any]:
    """WER of `count` multi-utterance recordings composed of the held-out utterances (as in training:
    4 s to `max_seconds`, pauses of 0.1-2 s, one or both languages), each transcribed whole."""
    recordings = compose_recordings(utterances, count, max_seconds, seed)
    assembled = [assemble([audios[i] for i in r.parts], r, round(max_seconds * SAMPLE_RATE)) for r in recordings]
    results = transcribe_all(directory, [audio for audio, _ in assembled], max_new_tokens=512)
    edits = words = 0
    errors = []
    for recording, (audio, kept), (_, text, _) in zip(recordings, assembled, results, strict=True):
        reference = " ".join(utterances[i].text for i in recording.parts[:kept]).split()
        distance = word_errors(reference, text.lower().split())
        edits, words = edits + distance, words + len(reference)
        if distance:
            errors.append({"seconds": round(audio.size / SAMPLE_RATE, 1), "word_errors": distance,
                           "reference": " ".join(reference), "text": text})  # fmt: skip
    return {"recordings": count, "words": words, "word_errors": edits, "wer": edits / max(1, words),
            "audio_seconds": round(sum(a.size for a, _ in assembled) / SAMPLE_RATE, 1), "errors": errors}  # fmt: skip


def write_fixtures(directory: Path, utterances: Sequence[Utterance], audios: Sequence[np.ndarray]) -> None:
    """The held-out utterances as 16 kHz mono 16-bit FLAC files with a manifest.json."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = []
    for index, (utterance, audio) in enumerate(zip(utterances, audios, strict=True)):
        name = f"{index:02d}-{utterance.language[:2].lower()}.flac"
        sf.write(directory / name, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        manifest.append({"file": name, "text": utterance.text, "language": utterance.language,
                         "voice": utterance.voice, "speed": utterance.speed, "pitch": utterance.pitch,
                         "snr_db": utterance.snr_db, "duration_s": round(audio.shape[0] / SAMPLE_RATE, 3)})  # fmt: skip
    (directory / "manifest.json").write_text(
        json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def evaluate_checkpoint(out: Path, args: argparse.Namespace) -> None:
    """`--eval-only`: the held-out evaluation of a checkpoint trained elsewhere (on the GPU machine with
    `--no-eval`), merged into its `training_report.json` with the training run's own numbers."""
    held, _ = sentence_split(args.seed, args.heldout_per_language, args.train_per_language)
    held_utts = list(recipes(held, args.seed + 2))
    report_path = out / "training_report.json"
    trained = json.loads(report_path.read_text(encoding="utf-8")) if report_path.exists() else {}
    held_audio = [render(u) for u in held_utts]
    report = {**trained, **evaluate(out, held_utts, held_audio)}
    if args.eval_recordings:
        report["recordings"] = evaluate_recordings(out, held_utts, held_audio, args.eval_recordings, args.seed + 5,
                                                   args.max_seconds)  # fmt: skip
    report["safetensors_bytes"] = (out / "model.safetensors").stat().st_size
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--fixtures", type=Path, help="write the held-out fixture utterances here")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--train-per-language", type=int, default=TRAIN_PER_LANGUAGE)
    parser.add_argument("--heldout-per-language", type=int, default=HELDOUT_PER_LANGUAGE)
    parser.add_argument("--fixtures-per-language", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=25.0, help="training time budget; the schedule ends at it")
    parser.add_argument("--ctc-weight", type=float, default=0.5, help="auxiliary word-level CTC loss (0: off)")
    parser.add_argument("--forced", type=float, default=0.25, help="share of rows with the forced-language prompt")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="torch device to train on (cuda on the GPU machine)")
    parser.add_argument("--write-audio-cache", type=Path, help="render the training audio into this zip and stop")
    parser.add_argument("--audio-cache", type=Path, help="train on the audio of this zip instead of rendering it")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (no CPU engine there)")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --out (trained elsewhere)")
    parser.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (fine-tuning)")
    parser.add_argument("--multi", type=int, default=0, help="multi-utterance recordings added to the training set")
    parser.add_argument(
        "--max-seconds", type=float, default=30.0, help="longest recording (the server's CHUNK_SECONDS)"
    )
    parser.add_argument(
        "--eval-recordings", type=int, default=0, help="held-out multi-utterance recordings to evaluate"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out: Path = args.out
    if args.eval_only:
        evaluate_checkpoint(out, args)
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    _write_tokenizer(out)
    _write_preprocessor(out)

    held, training = sentence_split(args.seed, args.heldout_per_language, args.train_per_language)
    train_utts = list(recipes(training, args.seed + 1))
    held_utts = list(recipes(held, args.seed + 2))
    if args.write_audio_cache is not None:
        write_audio_cache(args.write_audio_cache, train_utts, args.workers)
        print(f"wrote {len(train_utts)} utterances to {args.write_audio_cache}", flush=True)
        return
    cached = read_audio_cache(args.audio_cache, train_utts) if args.audio_cache is not None else None
    started = time.perf_counter()
    recordings = single_recordings(len(train_utts))
    recordings += compose_recordings(train_utts, args.multi, args.max_seconds, args.seed + 4)
    examples = make_examples(out, train_utts, recordings, args.workers, cached, args.max_seconds)
    data_seconds = time.perf_counter() - started
    print(f"{len(examples)} training recordings in {data_seconds:.0f}s, "
          f"{sum(e.features.shape[1] for e in examples) / 100 / 3600:.2f} h of audio", flush=True)  # fmt: skip

    model = build_model(args.seed) if args.init_from is None else load_model(args.init_from)
    parameters = sum(p.numel() for p in model.parameters())
    stats = train(model, examples, args)
    model.save_pretrained(out, safe_serialization=True)
    print(f"saved: {parameters} parameters, {(out / 'model.safetensors').stat().st_size} bytes", flush=True)

    if args.no_eval:
        trained = {**stats, "parameters": parameters, "data_seconds": data_seconds,
                   "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        (out / "training_report.json").write_text(json.dumps(trained, indent=1) + "\n", encoding="utf-8")
        return
    held_audio = [render(u) for u in held_utts]
    report = evaluate(out, held_utts, held_audio)
    if args.eval_recordings:
        report["recordings"] = evaluate_recordings(out, held_utts, held_audio, args.eval_recordings, args.seed + 5,
                                                   args.max_seconds)  # fmt: skip
    report.update(stats, parameters=parameters, data_seconds=data_seconds, args={k: str(v) for k, v in vars(args).items()},
                  safetensors_bytes=(out / "model.safetensors").stat().st_size,
                  script_commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())  # fmt: skip
    (out / "training_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "errors"}, indent=1), flush=True)
    if args.fixtures is not None:
        count = args.fixtures_per_language
        picked = [
            i for language in LANGUAGES for i in [j for j, u in enumerate(held_utts) if u.language == language][:count]
        ]
        write_fixtures(args.fixtures, [held_utts[i] for i in picked], [held_audio[i] for i in picked])


if __name__ == "__main__":
    main()
