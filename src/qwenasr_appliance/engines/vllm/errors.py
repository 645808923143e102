"""Sorting vLLM's failures into the engine errors the supervisor acts on.

Pure functions of exception objects and text, so they run without vLLM. Two facts shape them:

* vLLM builds its configuration in this process (a missing model, an unknown quantization method, a
  dtype the GPU lacks fail here, as ordinary Python exceptions), but loads the weights, profiles memory
  and allocates the KV cache in its engine-core child process. When that fails, this process only
  sees `RuntimeError("Engine core initialization failed. See root cause above. ...")`: the root cause
  is in the child's output, which `VLLMEngine` captures while loading and passes here as `output`.
* At run time an engine-core death reaches every waiting request as vLLM's own `EngineDeadError`;
  anything else that fails inside `AsyncLLM.generate` is re-raised as `EngineGenerateError`, or as the
  original `ValueError` when the request itself was invalid.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from qwenasr_appliance.engines.base import (
    EngineDeadError,
    EngineError,
    EngineLoadError,
    EngineRequestError,
    LoadFailureKind,
)

# Matched case-insensitively against the exception chain and the tail of the engine core's output.
# The first kind with a matching pattern wins, in this order.
_PATTERNS: tuple[tuple[LoadFailureKind, tuple[str, ...]], ...] = (
    (
        "out_of_memory",
        (
            "out of memory",  # torch.OutOfMemoryError "CUDA out of memory", "CUDA error: out of memory"
            "outofmemoryerror",
            "no available memory for the cache blocks",
            "less than desired gpu memory utilization",
            "larger than the available kv cache memory",
            "cudaerrormemoryallocation",
            "cublas_status_alloc_failed",
            "not enough memory",
            "insufficient memory",
        ),
    ),
    (
        "model_not_found",
        (
            "invalid repository id or local directory",
            "cannot find any model weights",
            "could not detect config format",
            "repositorynotfounderror",
            "localentrynotfounderror",
            "is not a local folder and is not a valid model identifier",
            "does not appear to have a file named",
            "gatedrepoerror",
            "repo id must be in the form",  # HFValidationError: a local path that does not exist
            "hfvalidationerror",
            "offlinemodeisenabled",
            "cannot find the requested files in the local cache",
            "outgoing traffic has been disabled",
        ),
    ),
    (
        "import",
        (
            "please install bitsandbytes",
            "bitsandbytes version is wrong",
            "no module named",
            "cannot import name",
            "undefined symbol",
            "modulenotfounderror",
            "importerror",
        ),
    ),
    (
        "unsupported",
        (
            "unknown quantization method",
            "is not supported for the current gpu",
            "is not supported for quantization method",
            "bfloat16 is only supported on gpus",
            "no cuda gpus are available",
            "found no nvidia driver",
            "are not supported for now",  # "Model architectures [...] are not supported for now."
            "cuda driver version is insufficient",
            "no kernel image is available",
        ),
    ),
)

_ENGINE_CORE_FAILED = "enginecore failed to start"
_TRACEBACK = "traceback (most recent call last)"
_ERROR_LINE = re.compile(r"\b((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception)): (\S.*)$")
_MAX_MESSAGE = 600


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes and contexts, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _has_class_named(exc: BaseException, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def failure_region(output: str) -> str:
    """The part of the engine core's output that describes why it failed.

    The text after the last "EngineCore failed to start" (vLLM logs that line and the traceback when the
    child fails while starting), else after the last traceback header, else the last few lines.
    """
    lowered = output.lower()
    for marker in (_ENGINE_CORE_FAILED, _TRACEBACK):
        index = lowered.rfind(marker)
        if index >= 0:
            return output[index:]
    return output[-4000:]


def root_cause_line(text: str) -> str | None:
    """The last `SomeError: message` line of `text` (a traceback's final line), without log prefixes."""
    for line in reversed(text.splitlines()):
        match = _ERROR_LINE.search(line.strip())
        if match:
            return f"{match.group(1)}: {match.group(2)}"[:_MAX_MESSAGE]
    return None


def _chain_text(exc: BaseException) -> str:
    return "\n".join(f"{type(e).__module__}.{type(e).__name__}: {e}" for e in exception_chain(exc))


def classify_text(text: str) -> LoadFailureKind:
    """The failure kind that `text` (exception messages, log output) describes; "other" when unknown."""
    lowered = text.lower()
    for kind, patterns in _PATTERNS:
        if any(pattern in lowered for pattern in patterns):
            return kind
    return "other"


def classify_load_failure(exc: BaseException, output: str = "") -> EngineLoadError:
    """Turn a failure of `AsyncLLM.from_engine_args` (plus the engine core's captured output) into an
    `EngineLoadError` whose kind tells the supervisor whether another plan can help."""
    if isinstance(exc, EngineLoadError):
        return exc
    region = failure_region(output) if output else ""
    chain = _chain_text(exc)
    kind: LoadFailureKind
    if isinstance(exc, MemoryError) or any(_has_class_named(e, "OutOfMemoryError") for e in exception_chain(exc)):
        kind = "out_of_memory"
    else:
        # The child's root cause is more specific than this process's generic RuntimeError, so look there
        # first; this process's own exception decides when the child said nothing useful.
        kind = classify_text(region) if region else "other"
        if kind == "other":
            kind = classify_text(chain)
    cause = root_cause_line(region) if region else None
    message = f"{type(exc).__name__}: {exc}"
    if cause and cause not in message:
        message = f"{message} (engine core: {cause})"
    return EngineLoadError(kind, message[: 2 * _MAX_MESSAGE])


def is_engine_dead(exc: BaseException) -> bool:
    """Whether `exc` (or anything in its chain) is vLLM's `EngineDeadError`."""
    return any(_has_class_named(e, "EngineDeadError") for e in exception_chain(exc))


def map_request_error(exc: BaseException, *, engine_errored: bool = False) -> EngineError:
    """Turn an exception raised while streaming one request into `EngineDeadError` (the engine is gone:
    restart it) or `EngineRequestError` (this request failed, the engine still serves)."""
    if isinstance(exc, EngineError):
        return exc
    if engine_errored or is_engine_dead(exc):
        return EngineDeadError(f"the vLLM engine died: {_describe(exc)}")
    if isinstance(exc, ValueError):
        return EngineRequestError(f"vLLM rejected the request: {exc}")
    return EngineRequestError(f"the request failed inside vLLM: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    """The most informative message in the chain (vLLM's wrappers carry a fixed text)."""
    parts = [f"{type(e).__name__}: {e}" if str(e) else type(e).__name__ for e in exception_chain(exc)]
    return " <- ".join(parts)[:_MAX_MESSAGE]
