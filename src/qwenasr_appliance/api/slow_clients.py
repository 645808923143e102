"""Slow clients: a request body that stalls gets 408 instead of holding its connection forever.

granian times the request head (`CLIENT_TIMEOUT_SECONDS`, see cli.py) but not the body: a client that
sends its headers and then a byte a minute (a slow POST, "R.U.D.Y.") would keep its connection and
its half-parsed upload as long as it likes. Here every read of the body must complete within the
timeout, like nginx's `client_body_timeout`: a slow but steady upload is fine, a stalled one is not.
"""

from __future__ import annotations

import asyncio

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send

from qwenasr_appliance.api.errors import APIError


def body_timeout_error(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request body stalled: no data arrived for {seconds:g} seconds.",
        param=None,
        code="request_timeout",
        headers={"Connection": "close"},
    )


class BodyReadTimeout(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        timeout = self.timeout_seconds
        body_done = False

        async def timed_receive() -> ReceiveMessage:
            nonlocal body_done
            if body_done:  # afterwards the app only waits for `http.disconnect`: no limit
                return await receive()
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                raise body_timeout_error(timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await next_app(scope, timed_receive, send)
