"""Building and tearing down vLLM's `AsyncLLM`: shared by the ASR engine and the forced aligner."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

from qwenasr_appliance.engines.base import EngineLoadError
from qwenasr_appliance.engines.vllm.errors import classify_load_failure

if TYPE_CHECKING:
    from qwenasr_appliance.engines.vllm.common import OutputTap


def import_vllm() -> str:
    """Import vLLM as the appliance runs it and return its version (seconds: call it off the event loop).

    Raises `EngineLoadError` when vLLM is missing or its install is broken."""
    # vLLM reports usage statistics to its authors unless told not to; an appliance does not phone home.
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The engine core is started from a worker thread while the event loop and other threads run:
    # forking such a process can leave the child waiting on a lock another thread held (stdout's
    # buffer, a handler's). A spawned child starts clean, at the price of importing vLLM again.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    try:
        import vllm
    except ImportError as exc:
        raise EngineLoadError("import", f"vLLM cannot be imported: {exc}") from exc
    except Exception as exc:  # a broken install (CUDA libraries, torch mismatch) fails on import
        raise classify_load_failure(exc) from exc
    return str(getattr(vllm, "__version__", ""))


async def build_llm(
    factory: Callable[[dict[str, Any]], Any], engine_args: Mapping[str, Any], tap: OutputTap | None
) -> Any:
    """`factory(engine_args)` in a thread, with the engine core's output captured by `tap`.

    Failures are raised as classified `EngineLoadError`s. A cancelled build cannot be interrupted: the
    engine is shut down once it exists."""
    if tap:
        tap.start()
    try:
        future = asyncio.get_running_loop().run_in_executor(None, factory, dict(engine_args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_shutdown_when_built)
            raise
    except EngineLoadError:
        raise
    except Exception as exc:
        raise classify_load_failure(exc, tap.text() if tap else "") from exc
    finally:
        if tap:
            tap.stop()


async def shut_down_llm(llm: Any, active: Collection[str]) -> None:
    """Abort the requests still open, then shut the engine core down. The caller drops its reference
    and calls `release_torch_cache` after this."""
    if active:
        # Ends every open stream (vLLM sends each a final "abort" output); shutting down first would
        # leave them waiting forever.
        with contextlib.suppress(Exception):
            await llm.abort(list(active))
        await asyncio.sleep(0)
    shutdown = getattr(llm, "shutdown", None)
    if shutdown is None:
        return
    # Blocking (it joins the engine-core process); vLLM closes its sockets on the loop thread itself.
    with contextlib.suppress(Exception):
        await asyncio.to_thread(shutdown)


async def release_llm(take: Callable[[], Any], active: Collection[str]) -> None:
    """Shut down the `AsyncLLM` that `take()` hands over (and forgets; None: nothing to do), then free
    torch's cached memory once no reference to it is left."""
    llm = take()
    if llm is None:
        return
    await shut_down_llm(llm, active)
    del llm
    release_torch_cache()


def release_torch_cache() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    with contextlib.suppress(Exception):
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def attr(obj: Any, path: str) -> Any:
    """`obj.a.b.c` for `path` "a.b.c", or None where a link is missing (fakes and vLLM versions differ)."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _shutdown_when_built(future: asyncio.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    shutdown = getattr(future.result(), "shutdown", None)
    if shutdown is not None:
        threading.Thread(target=shutdown, name="vllm-late-shutdown", daemon=True).start()
