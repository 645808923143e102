"""Finding the checkpoint before loading: local directories, the cache, an unreachable or absent hub."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants, file_download
from huggingface_hub.utils import reset_sessions

from qwenasr_appliance.engines.progress import LoadProgress
from qwenasr_appliance.supervisor.model_source import ModelSourceError, resolve_model
from tests.fake_hub import fake_hub
from tests.servers import loopback_only

REPO = "Qwen/Qwen3-ASR-1.7B"


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch, closed_port: int) -> Iterator[None]:
    """The hub allowed but unreachable: its endpoint a closed port on loopback."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    yield


def _cache_snapshot(cache: Path, repo: str) -> Path:
    """A cached snapshot as huggingface_hub lays it out (refs/main names the snapshot)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("a" * 40)
    return snapshot


def test_a_local_directory_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    progress = LoadProgress()
    assert resolve_model(str(tmp_path), progress) == str(tmp_path)
    reading = progress.reading()
    assert reading is not None and reading.step == "resolving_model"


@pytest.mark.parametrize(("make", "needle"), [(False, "does not exist"), (True, "has no config.json")])
def test_a_local_directory_without_a_checkpoint_is_a_clear_failure(tmp_path: Path, make: bool, needle: str) -> None:
    model = tmp_path / "model"
    if make:
        model.mkdir()
    with pytest.raises(ModelSourceError, match=needle):
        resolve_model(str(model), LoadProgress())


def test_offline_without_the_model_in_the_cache_says_what_to_do(hub_cache: Path) -> None:
    with pytest.raises(ModelSourceError) as error:
        resolve_model(REPO, LoadProgress())
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and str(hub_cache) in message
    assert "MODEL_ID=/path/to/dir" in message


def test_offline_with_the_model_in_the_cache_uses_it(hub_cache: Path) -> None:
    snapshot = _cache_snapshot(hub_cache, REPO)
    assert resolve_model(REPO, LoadProgress()) == str(snapshot)


@pytest.mark.usefixtures("online")
def test_an_unreachable_hub_is_reported_in_seconds_with_what_to_do(hub_cache: Path) -> None:
    began = time.monotonic()
    with pytest.raises(ModelSourceError) as error:
        resolve_model(REPO, LoadProgress(), timeout=5)
    assert time.monotonic() - began < 5  # one refused connection, no retries
    message = str(error.value)
    assert "cannot be reached" in message and "not in the local cache" in message
    assert "MODEL_ID=/path/to/dir" in message and "HF_HUB_OFFLINE=1" in message


@pytest.mark.usefixtures("online")
def test_an_unreachable_hub_falls_back_to_the_cached_copy(hub_cache: Path) -> None:
    snapshot, progress = _cache_snapshot(hub_cache, REPO), LoadProgress()
    assert resolve_model(REPO, progress) == str(snapshot)
    reading = progress.reading()
    assert reading is not None and "using the cached copy" in (reading.detail or "")


@pytest.mark.usefixtures("online", "hub_cache")
def test_a_name_that_is_no_repo_id_is_a_clear_failure() -> None:
    with pytest.raises(ModelSourceError, match="neither an existing directory nor a hub repo id"):
        resolve_model("not a repo id!", LoadProgress())


def test_a_download_shows_its_bytes_and_ends_in_the_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"config.json": b'{"model_type": "qwen3_asr"}', "model.safetensors": bytes(range(256)) * 4096}
    total = sum(len(data) for data in files.values())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with fake_hub(REPO, files, pause=0.05) as endpoint, loopback_only():
        # What HF_ENDPOINT and no HF_HUB_OFFLINE give when huggingface_hub is imported (as in the server).
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        reset_sessions()  # an HTTP session made while offline refuses every request
        progress = LoadProgress()
        result: list[str] = []
        worker = threading.Thread(target=lambda: result.append(resolve_model(REPO, progress)))
        worker.start()
        seen: list[tuple[int | None, int | None]] = []
        while worker.is_alive():
            reading = progress.reading()
            if reading is not None and reading.step == "downloading":
                seen.append((reading.bytes_done, reading.bytes_total))
            time.sleep(0.02)
        worker.join()
    reset_sessions()
    assert result, "the download failed"
    snapshot = Path(result[0])
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == files
    assert str(hub_cache) in result[0]
    assert seen and all(bytes_total == total for _, bytes_total in seen)
    assert any(0 < (done or 0) < total for done, _ in seen), f"no partial progress seen: {seen[:5]}...{seen[-5:]}"
    final = progress.reading()
    assert final is not None and final.bytes_done == total
