"""The one audio representation that crosses module boundaries: 16 kHz mono float32 samples."""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

SAMPLE_RATE: Final = 16_000  # Hz: what the decoder produces and Qwen3-ASR's feature extractor expects
AudioArray = npt.NDArray[np.float32]  # shape (samples,), mono, float32 in [-1, 1]
