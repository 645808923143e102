"""Optional API keys: `Authorization: Bearer <key>` compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from qwenasr_appliance.api.context import app_context
from qwenasr_appliance.api.errors import unauthorized


def _digest(value: str) -> bytes:
    # Hashing first makes every comparison the same length, so timing reveals nothing about key length.
    return hashlib.sha256(value.encode()).digest()


def key_matches(offered: str, keys: tuple[str, ...]) -> bool:
    offered_digest = _digest(offered)
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(offered_digest, _digest(key))
    return matched


def require_api_key(connection: ASGIConnection[BaseRouteHandler, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard for `/v1/*` (and the ops routes when PROTECT_OPS_ENDPOINTS is on)."""
    settings = app_context(connection.app.state).settings
    if not settings.api_keys:
        return
    header = connection.headers.get("authorization", "")
    scheme, _sep, token = header.partition(" ")
    if scheme.lower() != "bearer" or not key_matches(token.strip(), settings.api_keys):
        raise unauthorized()


def require_api_key_for_ops(
    connection: ASGIConnection[BaseRouteHandler, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    if app_context(connection.app.state).settings.protect_ops_endpoints:
        require_api_key(connection, handler)
