"""`Content-Language` carries a language tag (RFC 9110) while `verbose_json.language` keeps OpenAI's name."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "Qwen/Qwen3-ASR-1.7B"
WAV = (Path(__file__).resolve().parent / "fixtures" / "samples" / "ds_LDC93S1.wav").read_bytes()


@pytest.mark.parametrize(
    ("language", "tag", "name"),
    [(None, "en", "english"), ("de", "de", "german"), ("French", "fr", "french"), ("zh-yue", "yue", "cantonese")],
)
@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
def test_content_language_is_a_tag(
    double_server: ServerProcess, language: str | None, tag: str, name: str, response_format: str
) -> None:
    data = {"model": MODEL, "response_format": response_format, **({"language": language} if language else {})}
    response = httpx.post(
        double_server.url + "/v1/audio/transcriptions", files={"file": ("a.wav", WAV)}, data=data, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-language"] == tag
    if response_format == "verbose_json":
        assert response.json()["language"] == name
