from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf
from litestar.testing import TestClient

from qwenasr_appliance.api.app import create_app
from qwenasr_appliance.api.auth import key_matches
from qwenasr_appliance.config import load_settings
from tests.doubles import DoubleBehaviour, double_factory

KEY = "sk-test-0123456789abcdef"


def _wav() -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(16_000, dtype=np.float32) + 0.1, 16_000, format="WAV")
    return out.getvalue()


def _client(**env: str) -> Iterator[TestClient]:  # type: ignore[type-arg]
    _, factory = double_factory(DoubleBehaviour())
    app = create_app(load_settings({"API_KEYS": KEY, **env}), engine_factory=factory)  # type: ignore[arg-type]
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    yield from _client()


@pytest.fixture
def protected_ops_client() -> Iterator[TestClient]:  # type: ignore[type-arg]
    yield from _client(PROTECT_OPS_ENDPOINTS="true")


def _transcribe(client: TestClient, headers: dict[str, str]) -> int:  # type: ignore[type-arg]
    response = client.post(
        "/v1/audio/transcriptions",
        files={"file": ("a.wav", _wav(), "audio/wav")},
        data={"model": "Qwen/Qwen3-ASR-1.7B"},
        headers=headers,
    )
    if response.status_code == 401:
        body = response.json()
        assert body["error"]["type"] == "authentication_error" and body["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    return int(response.status_code)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
)
def test_v1_routes_need_a_valid_bearer_key(client: TestClient, headers: dict[str, str]) -> None:  # type: ignore[type-arg]
    assert _transcribe(client, headers) == 401
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_valid_key_is_accepted_and_never_logged(
    client: TestClient,  # type: ignore[type-arg]
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert _transcribe(client, {"Authorization": f"Bearer {KEY}"}) == 200
    assert client.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert KEY not in caplog.text


def test_ops_routes_open_by_default_and_protectable(
    client: TestClient,  # type: ignore[type-arg]
    protected_ops_client: TestClient,  # type: ignore[type-arg]
) -> None:
    for path in ("/health", "/metrics", "/status"):
        assert client.get(path).status_code == 200
        assert protected_ops_client.get(path).status_code == 401
        assert protected_ops_client.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_key_comparison() -> None:
    assert key_matches("a", ("b", "a"))
    assert not key_matches("", ("a",))
    assert not key_matches("ab", ("a", "abc"))
