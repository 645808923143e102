"""`promtool check metrics` on a real /metrics scrape of a running server (granian serving the app with
the test double engine, from the `live_server_url` fixture of tests/conftest.py), after real traffic
so labelled families carry samples; and on the exposition of the metric definitions alone."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.ops.opstools import CHART, families, registry_exposition, tool


def promtool_check_metrics(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool", "PROMTOOL"), "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def live_scrape(live_server_url: str) -> httpx.Response:
    with httpx.Client(base_url=live_server_url, timeout=60) as client:
        models = client.get("/v1/models")
        assert models.status_code == 200, models.text
        model = models.json()["data"][0]["id"]
        clip = (CHART / "files" / "test-clip.wav").read_bytes()
        answer = client.post(
            "/v1/audio/transcriptions",
            data={"model": model, "response_format": "json"},
            files={"file": ("test-clip.wav", clip, "audio/wav")},
        )
        assert answer.status_code == 200, answer.text
        client.get("/ready")
        client.get("/v1/no-such-route")  # a 404 sample too
        return client.get("/metrics")


def test_live_scrape_passes_promtool_check_metrics(live_scrape: httpx.Response) -> None:
    assert live_scrape.status_code == 200
    assert live_scrape.headers["content-type"].startswith("text/plain"), live_scrape.headers["content-type"]
    body = live_scrape.text
    assert body.endswith("\n"), "promtool rejects an exposition without a trailing newline"
    result = promtool_check_metrics(body)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_live_scrape_carries_the_appliance_families(live_scrape: httpx.Response) -> None:
    defined = {name for name in families(registry_exposition()) if name.startswith("qwenasr_")}
    served = set(families(live_scrape.text))
    assert defined <= served, f"defined but not served: {sorted(defined - served)}"
    samples = [line for line in live_scrape.text.splitlines() if line.startswith("qwenasr_http_requests_total{")]
    assert any('route="/v1/audio/transcriptions"' in line and 'status="200"' in line for line in samples), samples
    assert any(line.startswith("qwenasr_real_time_factor_count ") for line in live_scrape.text.splitlines())


def test_metric_definitions_pass_promtool_check_metrics() -> None:
    result = promtool_check_metrics(registry_exposition())
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
