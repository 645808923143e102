"""Finding the checkpoint before any engine starts: a local directory, the Hugging Face cache, or a
download from the hub, with the step and the bytes in `/status` and a failure that says what to do.

The engines then load from the local directory this returns and never reach the hub themselves, so a
host without the hub fails here in seconds (one request with a short timeout, no retries) instead of
after a library's retries, and a download can be watched.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwenasr_appliance.engines.progress import LoadProgress
from qwenasr_appliance.logs import adopt_library_loggers

# One look at the hub: how long to wait for it before calling it unreachable.
HUB_TIMEOUT_SECONDS = 8.0
_POLL_SECONDS = 0.5
_TRUE = {"1", "true", "yes", "on"}
_ERRNO = re.compile(r"\[Errno -?\d+\] [^\"'\)\]]+")

ModelResolver = Callable[[str, LoadProgress], str]


class ModelSourceError(Exception):
    """The checkpoint cannot be had; the message says why and what to do. Permanent: retrying the same
    settings cannot succeed."""


def looks_local(model_id: str) -> bool:
    """True for a filesystem path (absolute, relative with ./ or ../, ~, or an existing directory)."""
    return model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().is_dir()


def _local_directory(model_id: str) -> str:
    path = Path(model_id).expanduser()
    if not path.is_dir():
        raise ModelSourceError(
            f"the model directory {model_id!r} does not exist: MODEL_ID must name a directory holding the "
            "checkpoint (config.json and *.safetensors) as the server sees it (mounted into the container?)"
        )
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"the model directory {model_id!r} has no config.json: it is not a checkpoint")
    return str(path)


def _offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _advice(model_id: str) -> str:
    return (
        f"On a host without the hub: set MODEL_ID=/path/to/dir (a directory holding the checkpoint, e.g. made "
        f"with `hf download {model_id} --local-dir DIR` where the hub is reachable), or fill the Hugging Face "
        "cache (HF_HOME) the same way and set HF_HUB_OFFLINE=1."
    )


def _cached(hub: Any, model_id: str) -> str | None:
    from huggingface_hub import constants

    try:
        return str(hub.snapshot_download(model_id, local_files_only=True, cache_dir=constants.HF_HUB_CACHE))
    except Exception:
        return None


def _why(exc: BaseException, timeout: float) -> str:
    """The gist of a connection failure (the HTTP libraries nest it several reprs deep)."""
    text = str(exc)
    errno = _ERRNO.search(text)
    if errno:
        return errno.group(0).strip()
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return f"no answer within {timeout:g} s"
    return f"{type(exc).__name__}: {text[:200]}"


def resolve_model(model_id: str, progress: LoadProgress, *, timeout: float = HUB_TIMEOUT_SECONDS) -> str:
    """A local directory with the checkpoint `model_id` names (a path, or a hub repo id: from the cache
    with HF_HUB_OFFLINE set or when the hub is unreachable, else downloaded). Blocking.

    Raises `ModelSourceError` (permanent) with what to do when the checkpoint cannot be had."""
    progress.enter("resolving_model", model_id)
    if looks_local(model_id):
        return _local_directory(model_id)
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    adopt_library_loggers()  # its warnings go through our log format, once
    if _offline():
        cached = _cached(hub, model_id)
        if cached is None:
            raise ModelSourceError(
                f"HF_HUB_OFFLINE is set and {model_id!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}). "
                + _advice(model_id)
            )
        return cached
    endpoint = constants.ENDPOINT
    progress.enter("resolving_model", f"asking {endpoint} for {model_id}")
    try:
        info = hub.HfApi().model_info(model_id, files_metadata=True, timeout=timeout)
    except HFValidationError as exc:
        raise ModelSourceError(
            f"MODEL_ID {model_id!r} is neither an existing directory nor a hub repo id ({exc})"
        ) from None
    except GatedRepoError:
        raise ModelSourceError(
            f"{model_id!r} on {endpoint} needs an access token: set HF_TOKEN, or MODEL_ID=/path/to/dir"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"there is no model {model_id!r} on {endpoint} (or it is private: set HF_TOKEN). Check MODEL_ID."
        ) from None
    except Exception as exc:
        cached = _cached(hub, model_id)
        reason = f"the model hub {endpoint} cannot be reached ({_why(exc, timeout)})"
        if cached is not None:
            progress.enter("resolving_model", f"{reason}; using the cached copy {cached}")
            return cached
        raise ModelSourceError(f"{reason} and {model_id!r} is not in the local cache. {_advice(model_id)}") from None
    total = sum(int(getattr(sibling, "size", 0) or 0) for sibling in info.siblings or [])
    progress.enter("downloading", f"{model_id} from {endpoint}", bytes_total=total or None)
    blobs = Path(constants.HF_HUB_CACHE) / ("models--" + model_id.replace("/", "--")) / "blobs"
    done = threading.Event()
    watcher = threading.Thread(target=_watch_bytes, args=(blobs, progress, done), name="model-download", daemon=True)
    watcher.start()
    try:
        path = str(hub.snapshot_download(model_id, revision=info.sha, cache_dir=constants.HF_HUB_CACHE))
    except Exception as exc:
        raise ModelSourceError(
            f"downloading {model_id!r} from {endpoint} failed: {type(exc).__name__}: {exc}"
        ) from None
    finally:
        done.set()
    progress.advance(_size_of(blobs))
    return path


def _size_of(folder: Path) -> int:
    try:
        return sum(entry.stat().st_size for entry in folder.iterdir() if entry.is_file())
    except OSError:
        return 0


def _watch_bytes(blobs: Path, progress: LoadProgress, done: threading.Event) -> None:
    """Report the bytes in the cache's blobs folder (finished files and `.incomplete` ones) until `done`."""
    while not done.wait(_POLL_SECONDS):
        progress.advance(_size_of(blobs))
