"""What the CPU engine and the CPU forced aligner share: the dtype table, where a checkpoint is, how a
load failure is classified, and the one worker thread each model is loaded and run on."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qwenasr_appliance.engines.base import EngineLoadError, LoadFailureKind

# DTYPE setting -> torch dtype name on the CPU ("auto" is float32: bf16 matmuls are slow on most CPUs).
CPU_DTYPES = {"auto": "float32", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def load_failure_kind(exc: BaseException) -> LoadFailureKind:
    """Classify an exception raised while loading, for `EngineLoadError.kind`."""
    if isinstance(exc, ImportError):
        return "import"
    if isinstance(exc, MemoryError) or any(marker in str(exc).lower() for marker in _OOM_MARKERS):
        return "out_of_memory"
    if isinstance(exc, OSError):
        return "out_of_memory" if exc.errno == errno.ENOMEM else "model_not_found"
    # huggingface_hub rejects a path that is neither a directory nor a repo id with this ValueError.
    if type(exc).__name__ == "HFValidationError":
        return "model_not_found"
    return "other"


def _looks_local(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().exists()


def model_location(model_id: str) -> str:
    """What to hand to `from_pretrained`: a hub repo id as is, a local directory expanded and checked.

    A local path without a checkpoint fails here with a clear message instead of as a malformed repo id.
    """
    if not _looks_local(model_id):
        return model_id
    path = Path(model_id).expanduser()
    if not path.is_dir():
        raise EngineLoadError("model_not_found", f"model directory {model_id!r} does not exist")
    if not (path / "config.json").is_file():
        raise EngineLoadError("model_not_found", f"model directory {model_id!r} has no config.json")
    return str(path)


# An item on a request's output queue: an output, a failure, or None for "ended without a result".


async def load_on_own_thread(load: Callable[[], None], name: str) -> ThreadPoolExecutor:
    """Run the blocking `load` on a new single-thread executor and return it: the model then runs on the
    thread that loaded it. The executor is shut down when `load` raises (the exception propagates)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        await asyncio.get_running_loop().run_in_executor(executor, load)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return executor
