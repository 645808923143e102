"""`/docs`: the OpenAPI document and Swagger UI, with Swagger UI's assets served by the appliance itself
(vendored from npm `swagger-ui-dist`, see `static/swagger-ui/README.md`), so the page works on hosts
without internet access. Litestar's defaults would load them from public CDNs."""

from __future__ import annotations

from pathlib import Path

from litestar.datastructures import CacheControlHeader
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.router import Router
from litestar.static_files import create_static_files_router

from qwenasr_appliance import __version__

DOCS_PATH = "/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"
SWAGGER_UI_VERSION = "5.35.0"
SWAGGER_UI_DIR = Path(__file__).resolve().parent / "static" / "swagger-ui"


def openapi_config() -> OpenAPIConfig:
    """The OpenAPI document at `/docs/openapi.json` and Swagger UI at `/docs`, all from this server."""
    swagger = SwaggerRenderPlugin(
        version=SWAGGER_UI_VERSION,
        js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        css_url=f"{ASSETS_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>",
    )
    return OpenAPIConfig(
        title="qwenasr-appliance",
        version=__version__,
        description="OpenAI-compatible speech-to-text for Qwen3-ASR.",
        path=DOCS_PATH,
        render_plugins=[swagger],
    )


def docs_assets_router() -> Router:
    """Serves Swagger UI's files under `/docs/assets/` (cached for a day; they change only with a release)."""
    return create_static_files_router(
        path=ASSETS_PATH,
        directories=[SWAGGER_UI_DIR],
        cache_control=CacheControlHeader(max_age=86_400, public=True),
        include_in_schema=False,
        name="docs-assets",
    )
