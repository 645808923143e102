"""The optional forced aligner (Qwen3-ForcedAligner): word and character timestamps."""

from qwenasr_appliance.aligner.base import (
    AlignedChunk,
    AlignedUnit,
    Aligner,
    AlignerDeadError,
    AlignerDescription,
    AlignerError,
    AlignerRequestError,
    merge_chunks,
)

__all__ = [
    "AlignedChunk",
    "AlignedUnit",
    "Aligner",
    "AlignerDeadError",
    "AlignerDescription",
    "AlignerError",
    "AlignerRequestError",
    "merge_chunks",
]
