"""`/docs` works without internet access: the page names no other host and its assets come from the server."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.servers import ServerProcess

pytestmark = pytest.mark.slow


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]


@pytest.mark.parametrize("page", ["/docs", "/docs/swagger"])
def test_docs_reference_no_external_host_and_the_assets_are_served(double_server: ServerProcess, page: str) -> None:
    response = httpx.get(double_server.url + page, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.IGNORECASE), "an external URL in the page"
    parser = _Links()
    parser.feed(html)
    assets = {urljoin(double_server.url + page, url) for url in parser.urls}
    kinds = {urlsplit(url).path.rsplit(".", 1)[-1] for url in assets}
    assert {"js", "css", "png"} <= kinds, parser.urls
    for url in assets:
        assert urlsplit(url).netloc == urlsplit(double_server.url).netloc
        asset = httpx.get(url, timeout=10)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100
        assert asset.headers["content-type"].split(";")[0] in {
            "text/javascript",
            "application/javascript",
            "text/css",
            "image/png",
        }


def test_the_bundle_is_swagger_ui_and_the_openapi_document_is_served(double_server: ServerProcess) -> None:
    bundle = httpx.get(double_server.url + "/docs/assets/swagger-ui-bundle.js", timeout=10)
    assert "SwaggerUIBundle" in bundle.text
    assert (
        httpx.get(double_server.url + "/docs/openapi.json", timeout=10).json()["info"]["title"] == "qwenasr-appliance"
    )
