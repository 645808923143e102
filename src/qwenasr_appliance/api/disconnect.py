"""Stop server-side work when the client goes away (or when the shutdown grace period ends)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from litestar.types import Receive

from qwenasr_appliance.api.shutdown import ServerStopping

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(receive: Receive, work: Awaitable[T], *, stop: asyncio.Event | None = None) -> T:
    """Run `work`; if the client disconnects first, cancel it (which aborts engine requests).

    When `stop` is set first (the shutdown grace period ended), cancel it too and raise `ServerStopping`.
    Call only after the request body has been read, so `receive` has nothing left but the disconnect.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    waiters = {task, watcher} if stopper is None else {task, watcher, stopper}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not any(waiter.done() for waiter in waiters):
            task.cancel()  # we were cancelled ourselves
            watcher.cancel()
        if stopper is not None:
            stopper.cancel()
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher.done():
        raise ClientDisconnected
    watcher.cancel()
    raise ServerStopping
