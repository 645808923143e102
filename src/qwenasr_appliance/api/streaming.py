"""`stream=true`: the pipeline's events as Server-Sent Events in OpenAI's transcription stream shape
(`transcript.text.delta`, `transcript.text.done`, and `error` when the request fails midway)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from qwenasr_appliance.api.error_mapping import outcome, to_api_error
from qwenasr_appliance.api.render import to_logprobs
from qwenasr_appliance.api.shutdown import ServerStopping
from qwenasr_appliance.metrics import METRICS
from qwenasr_appliance.transcription.types import StreamDelta, StreamDone, StreamEvent


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _next_event(rest: AsyncIterator[StreamEvent], stop: asyncio.Event) -> StreamEvent | None:
    """The next event, or `ServerStopping` when the shutdown grace period ends first."""
    if stop.is_set():
        raise ServerStopping
    following = asyncio.ensure_future(anext(rest, None))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({following, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not following.done():
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
    if following.cancelled():
        raise ServerStopping
    return following.result()


async def sse_events(
    first: StreamEvent, rest: AsyncIterator[StreamEvent], stop: asyncio.Event, *, logprobs: bool = False
) -> AsyncIterator[bytes]:
    """The response body: `first`, then the rest of the events until done, the grace period ends (`stop`)
    or the pipeline fails; counts the request's outcome. `logprobs` (include[]=logprobs) adds the
    transcript's token log-probabilities to `transcript.text.done`."""
    event: StreamEvent | None = first
    try:
        while event is not None:
            if isinstance(event, StreamDelta):
                yield _sse({"type": "transcript.text.delta", "delta": event.text})
            elif isinstance(event, StreamDone):
                transcript = event.transcript
                done: dict[str, Any] = {"type": "transcript.text.done", "text": transcript.text}
                if logprobs:
                    done["logprobs"] = msgspec.to_builtins(to_logprobs(transcript))
                done["usage"] = {"type": "duration", "seconds": round(transcript.duration, 3)}
                yield _sse(done)
            event = await _next_event(rest, stop)
        METRICS.transcriptions.labels(outcome="ok").inc()
    except Exception as exc:
        error = to_api_error(exc)
        METRICS.transcriptions.labels(outcome=outcome(error)).inc()
        yield _sse(
            {
                "type": "error",
                "error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code},
            }
        )
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
