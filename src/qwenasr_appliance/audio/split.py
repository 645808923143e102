"""Long audio -> chunks the model can take, cut where the signal is quietest.

Each cut is searched only in the last `search_seconds` before the chunk limit, so the work is
proportional to the number of chunks, not to the length of the audio (a 2-hour file costs a few
hundred small vectorised searches, no full-length temporary array).

qwen-asr (`split_audio_into_chunks`) searches 5 s on both sides of its target length, so its chunks
can run 5 s over it. Here the limit is a hard ceiling (the engine's token budget, `MAX_MODEL_LEN`, and
the forced aligner's 180 s are sized from `CHUNK_SECONDS`), so the search window has the same 10 s
width but lies wholly before the limit: a pause 5-10 s before it is found too, where a 5 s search
would cut through a word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Final

import numpy as np

from qwenasr_appliance.audio.samples import SAMPLE_RATE, AudioArray

__all__ = ["AudioChunk", "is_silent", "pad_to_min", "speech_spans", "split_at_quiet_points"]


# Energies within this fraction of the loudest candidate window count as equally quiet, so a cut
# lands in the middle of a pause instead of at its first sample.
_TIE_TOLERANCE: Final = 1e-9
_SILENCE_BLOCK_WINDOWS: Final = 1024  # windows per block in is_silent: bounded temporary memory


@dataclass(frozen=True, slots=True, eq=False)
class AudioChunk:
    start_sample: int
    end_sample: int  # exclusive
    offset_seconds: float  # start_sample / sample_rate
    samples: AudioArray  # a view of the input, not a copy


def split_at_quiet_points(
    samples: AudioArray,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_chunk_seconds: float = 30.0,
    search_seconds: float = 10.0,
    min_chunk_seconds: float = 0.5,
    window_seconds: float = 0.1,
) -> list[AudioChunk]:
    """Split 1-D audio into contiguous chunks of at most `max_chunk_seconds`.

    Each cut is at the centre of the quietest `window_seconds` window (mean square) among the
    positions in the last `search_seconds` before the limit (the middle of the longest run of
    equally quiet positions, e.g. digital silence). Chunks cover the input exactly, in order, and
    are views of it. Empty input gives no chunks.

    The last cut is searched so that the final chunk keeps at least `min_chunk_seconds`. Only when
    `search_seconds` is shorter than that can a shorter final chunk remain; it is kept, because
    merging it would exceed `max_chunk_seconds` (every cut is made where the rest was longer than
    the limit). The caller pads short chunks (`pad_to_min`).
    """
    if samples.ndim != 1:
        raise ValueError(f"samples must be one-dimensional, got shape {samples.shape}")
    if sample_rate <= 0:
        raise ValueError("sample_rate must be positive")
    if not (max_chunk_seconds > 0 and search_seconds >= 0 and min_chunk_seconds >= 0 and window_seconds > 0):
        raise ValueError("chunk, search and window lengths must be positive")
    total = int(samples.shape[0])
    max_len = math.floor(max_chunk_seconds * sample_rate)
    if max_len < 1:
        raise ValueError("max_chunk_seconds is shorter than one sample")
    if total == 0:
        return []
    search_len = min(round(search_seconds * sample_rate), max_len - 1)
    min_len = round(min_chunk_seconds * sample_rate)
    window = max(1, round(window_seconds * sample_rate))

    bounds = [0]
    start = 0
    while total - start > max_len:
        limit = start + max_len
        lowest = limit - search_len
        # Keep the remainder at least min_len long when that still leaves room to search.
        highest = min(limit, total - min_len) if total - min_len >= lowest else limit
        start = _quietest_point(samples, lowest, highest, window)
        bounds.append(start)
    bounds.append(total)
    return [
        AudioChunk(start_sample=a, end_sample=b, offset_seconds=a / sample_rate, samples=samples[a:b])
        for a, b in pairwise(bounds)
    ]


def _quietest_point(samples: AudioArray, lowest: int, highest: int, window: int) -> int:
    """The cut position in [lowest, highest] whose centred window has the least mean square."""
    total = samples.shape[0]
    half = window // 2
    first = max(0, lowest - half)
    last = min(total, highest + half)
    segment = samples[first:last].astype(np.float64)
    cumulative = np.zeros(segment.shape[0] + 1, dtype=np.float64)
    np.cumsum(segment * segment, out=cumulative[1:])

    positions = np.arange(lowest, highest + 1)
    left = np.maximum(positions - half, first) - first
    right = np.minimum(positions + half, last) - first
    width = np.maximum(right - left, 1)  # windows are clipped at the ends of the signal
    energy = (cumulative[right] - cumulative[left]) / width

    quiet = energy <= energy.min() + _TIE_TOLERANCE * energy.max()
    edges = np.flatnonzero(np.diff(np.concatenate(([False], quiet, [False])).astype(np.int8)))
    run_starts, run_ends = edges[0::2], edges[1::2]
    longest = int(np.argmax(run_ends - run_starts))
    return lowest + int(run_starts[longest] + run_ends[longest] - 1) // 2


def pad_to_min(samples: AudioArray, min_seconds: float = 0.5, *, sample_rate: int = SAMPLE_RATE) -> AudioArray:
    """Zero-pad at the end to at least `min_seconds` (Qwen3-ASR needs >= 0.5 s); longer input is returned as is."""
    needed = math.ceil(min_seconds * sample_rate)
    if samples.shape[0] >= needed:
        return samples
    padded = np.zeros(needed, dtype=np.float32)
    padded[: samples.shape[0]] = samples
    return padded


def is_silent(
    samples: AudioArray,
    threshold_dbfs: float = -60.0,
    *,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = 0.1,
) -> bool:
    """True when no `window_seconds` window reaches `threshold_dbfs` RMS (full scale = 1.0).

    The loudest window decides, not the average over the whole input, so one short word in a long
    quiet stretch still counts as sound.
    """
    total = samples.shape[0]
    if total == 0:
        return True
    threshold = 10.0 ** (threshold_dbfs / 10.0)  # mean square
    window = max(1, round(window_seconds * sample_rate))
    block_len = window * _SILENCE_BLOCK_WINDOWS
    for block_start in range(0, total, block_len):
        block = samples[block_start : block_start + block_len].astype(np.float64)
        block *= block
        starts = np.arange(0, block.shape[0], window)
        sums = np.add.reduceat(block, starts)
        counts = np.diff(np.append(starts, block.shape[0]))
        if float((sums / counts).max()) >= threshold:
            return False
    return True


def speech_spans(
    samples: AudioArray,
    *,
    sample_rate: int = SAMPLE_RATE,
    window_seconds: float = 0.025,
    relative_db: float = 30.0,
    floor_dbfs: float = -60.0,
    min_gap_seconds: float = 0.3,
) -> list[tuple[int, int]]:
    """Where the signal is sound rather than pause: [start, end) sample ranges, in order.

    An energy gate, not a voice detector: a `window_seconds` window (mean square) is sound when it is
    within `relative_db` of the loudest window and above `floor_dbfs` (full scale = 1.0); pauses shorter
    than `min_gap_seconds` (stops, short breaths) are filled. Used to place segment times and to time
    subtitle words without the forced aligner. Silence gives no spans.
    """
    total = int(samples.shape[0])
    window = max(1, round(window_seconds * sample_rate))
    if total == 0:
        return []
    starts = np.arange(0, total, window)
    squared = samples.astype(np.float64)
    squared *= squared
    energy = np.add.reduceat(squared, starts) / np.diff(np.append(starts, total))
    threshold = max(10.0 ** (floor_dbfs / 10.0), float(energy.max()) * 10.0 ** (-relative_db / 10.0))
    loud = energy >= threshold
    if not loud.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], loud, [False])).astype(np.int8)))
    spans: list[tuple[int, int]] = []
    max_gap = round(min_gap_seconds * sample_rate)
    for first, last in zip(edges[0::2], edges[1::2], strict=True):
        begin, end = int(starts[first]), min(total, int(last) * window)
        if spans and begin - spans[-1][1] < max_gap:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((begin, end))
    return spans
