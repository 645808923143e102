"""vLLM's start-up steps, as its log lines show them (its engine core runs in a child process whose
output the engine reads through `OutputTap`): weights, torch.compile, CUDA graphs, warm-up."""

from __future__ import annotations

import re
from typing import Final

from qwenasr_appliance.engines.progress import LoadProgress, LoadStep

# The first pattern a line matches names the step it shows (vLLM 0.2x V1 engine messages).
_LINE_STEPS: Final[tuple[tuple[re.Pattern[str], LoadStep], ...]] = (
    (re.compile(r"Capturing CUDA graph", re.IGNORECASE), "capturing_cuda_graphs"),
    (re.compile(r"Graph capturing finished|init engine \(", re.IGNORECASE), "warming_up"),
    (
        re.compile(r"torch\.compile|Dynamo bytecode transform|Compiling a graph|compile range", re.IGNORECASE),
        "compiling",
    ),
    (
        re.compile(r"Starting to load model|Loading (safetensors )?(checkpoint|weights)|Model loading took", re.I),
        "loading_weights",
    ),
)
_PREFIX = re.compile(r"^\(EngineCore[^)]*\)\s*")


def step_of_line(line: str) -> LoadStep | None:
    """The load step a line of vLLM's output shows, or None."""
    for pattern, step in _LINE_STEPS:
        if pattern.search(line):
            return step
    return None


class VllmStepObserver:
    """Turns vLLM's output lines into steps on `progress` (a callback for `OutputTap`)."""

    def __init__(self, progress: LoadProgress) -> None:
        self._progress = progress

    def __call__(self, line: str) -> None:
        step = step_of_line(line)
        if step is not None:
            self._progress.enter(step, _PREFIX.sub("", line.strip())[:200])
