"""Speech data for the tiny English/German ASR model: espeak-ng reading sentences of a small vocabulary.

Each utterance is a sentence of 2-8 words drawn from one language's vocabulary (digits and a few dozen
words), read by espeak-ng with one of several voices (a language voice such as `en-us` plus a variant
such as `+f2`), a speed in words per minute and a pitch (espeak's 0-99 scale), resampled from espeak's
22,050 Hz to 16 kHz mono with soxr, given random leading and trailing silence, a random peak level and,
for most utterances, background noise at a fixed signal-to-noise ratio.

Sentences are drawn with a fixed seed. `sentence_split` returns a held-out set and a training set that
share no sentence, so the evaluation measures sentences the model never heard.
"""

from __future__ import annotations

import io
import random
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000  # Hz, what the Whisper feature extractor of the checkpoint expects
ESPEAK_RATE = 22_050  # Hz, espeak-ng's output rate
FloatArray = npt.NDArray[np.float32]

# Language name (as the model writes it after `language `) -> vocabulary. Digits first, then words.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "English": (
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "apple", "water", "house", "green", "red", "blue", "yellow", "black", "white", "cat", "dog",
        "bird", "fish", "tree", "river", "mountain", "morning", "evening", "today", "open", "close",
        "left", "right", "up", "down", "yes", "no", "stop", "go", "please", "thank", "you", "good", "night",
    ),
    "German": (
        "null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
        "apfel", "wasser", "haus", "grün", "rot", "blau", "gelb", "schwarz", "weiß", "katze", "hund",
        "vogel", "baum", "fluss", "berg", "morgen", "abend", "heute", "öffnen", "schließen", "links",
        "rechts", "oben", "unten", "ja", "nein", "bitte", "danke", "gut", "nacht", "hallo", "tür", "schön",
    ),
}  # fmt: skip
DIGITS = 10  # the first ten words of each vocabulary
# espeak-ng language voices per language, and the variants (voice timbres) combined with them.
VOICES: dict[str, tuple[str, ...]] = {"English": ("en-us", "en-gb"), "German": ("de",)}
VARIANTS: tuple[str, ...] = ("", "+m1", "+m3", "+m7", "+f1", "+f2", "+f4", "+klatt")
SPEEDS_WPM = (130, 200)  # espeak-ng -s, words per minute, drawn uniformly
PITCHES = (25, 75)  # espeak-ng -p, 0-99 (50 is the voice's default), drawn uniformly
SNRS_DB: tuple[float | None, ...] = (None, 30.0, 20.0, 12.0)  # None: no noise
SILENCE_S = (0.05, 0.4)  # leading and trailing silence, seconds, each drawn uniformly
PEAK = (0.3, 0.95)  # peak amplitude after scaling, drawn uniformly
WORDS = (2, 8)  # sentence length in words, inclusive
DIGIT_SHARE = 0.4  # probability that a word is a digit
# The committed recipe's defaults (the training script's options); the tests redraw the split from them.
SEED = 16
HELDOUT_PER_LANGUAGE = 100
TRAIN_PER_LANGUAGE = 5000


@dataclass(frozen=True)
class Utterance:
    """One synthesized utterance's recipe (the audio is rendered by `render`)."""

    text: str
    language: str  # "English" or "German"
    voice: str  # espeak-ng voice, e.g. "en-gb+f2"
    speed: int  # words per minute
    pitch: int  # 0-99
    snr_db: float | None  # None: no noise
    seed: int  # noise, silence and level

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def random_sentence(rng: random.Random, language: str) -> str:
    """A sentence of `WORDS` words: each a digit with probability `DIGIT_SHARE`, else a vocabulary word."""
    words = VOCABULARY[language]
    count = rng.randint(*WORDS)
    return " ".join(
        rng.choice(words[:DIGITS]) if rng.random() < DIGIT_SHARE else rng.choice(words[DIGITS:]) for _ in range(count)
    )


def sentence_split(seed: int, held_out: int, train: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per language, `held_out` distinct held-out sentences and `train` training sentences none of which
    is held out (training sentences may repeat each other; they are read by different voices)."""
    held: dict[str, list[str]] = {}
    training: dict[str, list[str]] = {}
    for index, language in enumerate(VOCABULARY):
        rng = random.Random(seed * 1000 + index)
        unique: dict[str, None] = {}
        while len(unique) < held_out:
            unique[random_sentence(rng, language)] = None
        held[language] = list(unique)
        excluded = set(unique)
        sentences: list[str] = []
        while len(sentences) < train:
            sentence = random_sentence(rng, language)
            if sentence not in excluded:
                sentences.append(sentence)
        training[language] = sentences
    return held, training


def recipes(sentences: dict[str, list[str]], seed: int) -> Iterator[Utterance]:
    """One utterance recipe per sentence, with voice, speed, pitch and noise drawn from `seed`."""
    rng = random.Random(seed)
    for language, texts in sentences.items():
        for text in texts:
            yield Utterance(
                text=text,
                language=language,
                voice=rng.choice(VOICES[language]) + rng.choice(VARIANTS),
                speed=rng.randint(*SPEEDS_WPM),
                pitch=rng.randint(*PITCHES),
                snr_db=rng.choice(SNRS_DB),
                seed=rng.getrandbits(32),
            )


def espeak(text: str, voice: str, speed: int, pitch: int) -> FloatArray:
    """espeak-ng's reading of `text`: float32 mono samples in [-1, 1] at `ESPEAK_RATE` Hz."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
    ).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == ESPEAK_RATE, rate
    return np.asarray(samples, dtype=np.float32)


def render(utterance: Utterance) -> FloatArray:
    """The utterance's audio: float32 mono at 16 kHz, peak in `PEAK`.

    Noise is white Gaussian noise scaled so that 10*log10(P_speech / P_noise) = snr_db, with P the mean
    square over the speech (before the silence is added); the silence gets the same noise.
    """
    rng = np.random.default_rng(utterance.seed)
    speech = espeak(utterance.text, utterance.voice, utterance.speed, utterance.pitch)
    speech = soxr.resample(speech, ESPEAK_RATE, SAMPLE_RATE).astype(np.float32)
    speech = _trim(speech)
    lead, trail = (int(rng.uniform(*SILENCE_S) * SAMPLE_RATE) for _ in range(2))
    audio = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(trail, np.float32)])
    if utterance.snr_db is not None:
        power = float(np.mean(speech.astype(np.float64) ** 2)) or 1e-10
        sigma = np.sqrt(power / 10 ** (utterance.snr_db / 10))
        audio = audio + rng.normal(0.0, sigma, audio.shape).astype(np.float32)
    peak = float(np.max(np.abs(audio))) or 1.0
    return (audio * (rng.uniform(*PEAK) / peak)).astype(np.float32)


def _trim(speech: FloatArray, threshold: float = 1e-3) -> FloatArray:
    """`speech` without the leading and trailing samples below `threshold` (espeak's own silence)."""
    loud = np.flatnonzero(np.abs(speech) > threshold)
    return speech[loud[0] : loud[-1] + 1] if loud.size else speech


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions), the numerator of WER."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]
