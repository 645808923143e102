"""`GET /live`: a small page to try live transcription (microphone or a file), when LIVE_PAGE is on.

One static HTML file with its script inline (no CDN, no build step); it speaks the Realtime API to
`/v1/realtime` like any client, authenticating with the `openai-insecure-api-key.` subprotocol when a key
is entered. `?autostart` starts the microphone at once (the browser test uses it).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from litestar import MediaType, Response, get
from litestar.handlers import HTTPRouteHandler

from qwenasr_appliance.config import Settings


@cache
def _page() -> str:
    return resources.files("qwenasr_appliance.api").joinpath("static/live.html").read_text(encoding="utf-8")


@get("/live", include_in_schema=False, media_type=MediaType.HTML, sync_to_thread=False)
def live_page() -> Response[str]:
    return Response(_page(), media_type=MediaType.HTML, headers={"Cache-Control": "no-cache"})


def live_page_routes(settings: Settings) -> list[HTTPRouteHandler]:
    """The page's route when LIVE_PAGE is on, else none."""
    return [live_page] if settings.live_page else []
