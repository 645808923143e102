"""Model names clients hard-code: several served names, local-path ids, a 404 that names what is served."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from qwenasr_appliance.config import load_settings
from tests.servers import ServerProcess

WAV = Path(__file__).resolve().parent / "fixtures" / "samples" / "ds_LDC93S1.wav"


def test_served_model_name_takes_a_comma_separated_list() -> None:
    settings = load_settings({"MODEL_ID": "/models/qwen3", "SERVED_MODEL_NAME": " qwen3-asr , whisper-1,, "})
    assert settings.served_model_names == ("qwen3-asr", "whisper-1")
    assert settings.model_name == "qwen3-asr"
    assert settings.accepted_model_names == ("qwen3-asr", "whisper-1", "/models/qwen3")
    unset = load_settings({"MODEL_ID": "/models/qwen3"})
    assert unset.served_model_names == unset.accepted_model_names == ("/models/qwen3",)


@pytest.fixture(scope="module")
def local_dir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """MODEL_ID a local directory, as on an air-gapped host; no SERVED_MODEL_NAME."""
    folder = tmp_path_factory.mktemp("local-model")
    model_dir = str(folder / "models" / "Qwen3-ASR-1.7B")
    server = ServerProcess.with_test_double({"MODEL_ID": model_dir, "DECODE_WORKERS": "1"}, folder / "server.log")
    try:
        server.wait_until("/ready", timeout=60)
        yield server, model_dir
    finally:
        server.stop()


@pytest.fixture(scope="module")
def aliased_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("aliased")
    env = {"MODEL_ID": "Qwen/Qwen3-ASR-0.6B", "SERVED_MODEL_NAME": "qwen3-asr,whisper-1", "DECODE_WORKERS": "1"}
    server = ServerProcess.with_test_double(env, folder / "server.log")
    try:
        server.wait_until("/ready", timeout=60)
        yield server
    finally:
        server.stop()


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.slow
def test_every_listed_local_path_id_can_be_retrieved(local_dir_server: tuple[ServerProcess, str]) -> None:
    server, model_dir = local_dir_server
    client = _client(server)
    listed = client.models.list().data
    assert [model.id for model in listed] == [model_dir]
    assert client.models.retrieve(listed[0].id).id == model_dir
    with WAV.open("rb") as audio:
        assert client.audio.transcriptions.create(model=listed[0].id, file=audio).text
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve(model_dir.lstrip("/"))  # the id without its leading slash is another id
    assert model_dir in missing.value.body["message"]  # type: ignore[index]


@pytest.mark.slow
def test_every_served_name_is_accepted_and_the_first_is_listed(aliased_server: ServerProcess) -> None:
    client = _client(aliased_server)
    assert [model.id for model in client.models.list().data] == ["qwen3-asr"]
    for name in ("qwen3-asr", "whisper-1", "Qwen/Qwen3-ASR-0.6B"):
        card = client.models.retrieve(name)
        assert card.id == name and card.root == "Qwen/Qwen3-ASR-0.6B"  # type: ignore[attr-defined]
        with WAV.open("rb") as audio:
            assert client.audio.transcriptions.create(model=name, file=audio, response_format="text")


@pytest.mark.slow
@pytest.mark.parametrize("call", ["retrieve", "transcribe"])
def test_an_unknown_model_is_answered_with_the_served_names(aliased_server: ServerProcess, call: str) -> None:
    client = _client(aliased_server)
    with pytest.raises(openai.NotFoundError) as missing:
        if call == "retrieve":
            client.models.retrieve("gpt-4o-transcribe")
        else:
            with WAV.open("rb") as audio:
                client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio)
    error = missing.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"  # type: ignore[index]
    for name in ("'gpt-4o-transcribe'", "'qwen3-asr'", "'whisper-1'", "'Qwen/Qwen3-ASR-0.6B'"):
        assert name in error["message"]  # type: ignore[index]
