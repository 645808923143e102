"""The values of the transcription domain: what the pipeline takes, what it yields, what it records.

Times are seconds on the recording's time line (0 at the first sample of the upload). Languages are the
canonical names Qwen3-ASR writes (`"English"`, see `languages.py`); the API layer turns them into
OpenAI's fields and headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TranscriptWord:
    """One timed unit from the forced aligner: a word, or a single character in Chinese."""

    word: str
    start: float  # seconds
    end: float  # seconds


@dataclass(frozen=True)
class TokenConfidence:
    """One transcript token, its natural-log probability and the bytes it stands for (OpenAI's `logprobs`
    item: `token`, `logprob`, `bytes`; a piece of a multi-byte character has text U+FFFD and its own bytes)."""

    token: str
    logprob: float
    raw: bytes


@dataclass(frozen=True)
class TranscriptSegment:
    """The text of one piece of the recording (a chunk cut at a quiet point), with its confidence.

    `start` and `end` bound the sound in the chunk (`audio.split.speech_spans`), or the whole chunk when
    it has none; `speech` lists the sound's stretches between pauses (seconds, in order, within
    [start, end]), empty when unknown.

    `avg_logprob` and `no_speech_prob` are None when they were not computed (the request did not ask
    for confidence) or the engine could not tell; `compression_ratio` is always computed from the text
    (see `transcription.confidence`). `truncated`: generation hit `MAX_NEW_TOKENS`, the text may be cut.
    `loop_stopped`: the engine stopped a runaway loop early, text after it is lost.
    """

    start: float  # seconds
    end: float  # seconds
    text: str
    speech: tuple[tuple[float, float], ...] = ()
    avg_logprob: float | None = None
    compression_ratio: float = 0.0
    no_speech_prob: float | None = None
    truncated: bool = False
    loop_stopped: bool = False
    tokens: tuple[TokenConfidence, ...] = ()


@dataclass(frozen=True)
class Transcript:
    """A finished transcription of one recording."""

    text: str
    language: str  # canonical model name ("English"), "" when nothing was recognised
    duration: float  # seconds of decoded audio
    segments: list[TranscriptSegment] = field(default_factory=list)
    words: list[TranscriptWord] | None = None
    # Languages of the chunks left without word timestamps because the forced aligner does not support
    # them (`aligner.base.ALIGNER_LANGUAGES`); `words` holds the other chunks' words, None if none had any.
    unaligned_languages: tuple[str, ...] = ()
    # Every language spoken, longest first (`languages[0] == language`); empty when nothing was recognised.
    languages: tuple[str, ...] = ()

    @property
    def truncated(self) -> bool:
        """Some chunk ended on the token limit: text may be missing."""
        return any(segment.truncated for segment in self.segments)

    @property
    def logprobs(self) -> list[TokenConfidence]:
        """The transcript's tokens in order, when confidence was computed."""
        return [token for segment in self.segments for token in segment.tokens]


@dataclass(frozen=True)
class TranscriptionRequest:
    """A validated transcription request: the upload's bytes and what the caller asked for."""

    audio: bytes
    filename: str | None
    language: str | None  # canonical model language name, None to detect
    prompt: str
    temperature: float
    stream: bool
    word_timestamps: bool = False  # timestamp_granularities[]=word: align with the forced aligner
    subtitles: bool = False  # SRT/VTT: cue times from the forced aligner when it is loaded, else by proportion
    # Ask the engine for token log-probabilities (include[]=logprobs, or verbose_json's avg_logprob and
    # no_speech_prob). Off by default: it costs engine time.
    confidence: bool = False


@dataclass(frozen=True)
class StreamDelta:
    """More transcript text, in audio order."""

    text: str


@dataclass(frozen=True)
class StreamDone:
    """The end of a streamed transcription, with the whole transcript."""

    transcript: Transcript


StreamEvent = StreamDelta | StreamDone


@dataclass
class RequestStats:
    """Per-request numbers for the access log (seconds, unless named otherwise)."""

    audio_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_pieces: int = 0  # 1: decoded in one pass; more: a long file split across the decode workers
    audio_truncated: bool = False  # the upload's audio data broke off; what decoded before it was used
    queue_seconds: float = 0.0
    engine_seconds: float = 0.0
    chunks: int = 0
    language: str = ""
