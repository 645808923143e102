from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenasr_appliance.config import ENV_FILE_VARIABLE, ENV_VARIABLES
from tests.servers import ServerProcess

pytest_plugins = ["tests.tiny_model", "tests.tiny_aligner"]


def _load_dynet_off_the_main_thread() -> None:
    """qwen-asr imports nagisa, whose DyNet library is built with -ffast-math: loading it turns on
    flush-to-zero in the loading thread, after which hypothesis' float strategies refuse to run. Loaded
    first in a throwaway thread, it leaves the test thread's floating point alone (3 ms)."""
    if importlib.util.find_spec("_dynet") is not None:
        thread = threading.Thread(target=importlib.import_module, args=("_dynet",), name="load-dynet")
        thread.start()
        thread.join()


_load_dynet_off_the_main_thread()

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "samples"  # real speech, licences in MANIFEST.md


@pytest.fixture(scope="session", autouse=True)
def _settings_only_from_the_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests and the servers they start see only the settings the tests give: none of the
    appliance's variables from the developer's shell, and no `.env` (ENV_FILE names an empty file).
    Nothing reaches the model hub (HF_HUB_OFFLINE): the tests of an unreachable hub set their own."""
    empty = tmp_path_factory.mktemp("settings") / "empty.env"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as patch:
        for name in [*ENV_VARIABLES, *(name for name in os.environ if name.startswith("DOUBLE_"))]:
            patch.delenv(name, raising=False)
        patch.setenv(ENV_FILE_VARIABLE, str(empty))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    assert SAMPLES.is_dir(), f"the speech samples are missing at {SAMPLES}"
    return SAMPLES


@pytest.fixture(scope="session")
def double_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """granian on 127.0.0.1 serving the real app around the test double engine."""
    log = tmp_path_factory.mktemp("double-server") / "server.log"
    server = ServerProcess.with_test_double(
        {"LOG_LEVEL": "info", "MAX_CONCURRENT_REQUESTS": "8", "MAX_QUEUE_SIZE": "16", "DECODE_WORKERS": "2"}, log
    )
    try:
        server.wait_until("/ready", timeout=60)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_server_url(double_server: ServerProcess) -> str:
    return double_server.url


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The product's own `qwenasr-appliance serve` with the CPU engine and the tiny real checkpoint."""
    log = tmp_path_factory.mktemp("tiny-server") / "server.log"
    env = {
        "MODEL_ID": str(tiny_model_dir),
        "SERVED_MODEL_NAME": "qwen3-asr-tiny",
        "ENGINE": "cpu",
        "CPU_THREADS": "1",
        "MAX_NEW_TOKENS": "12",
        "LOG_LEVEL": "info",
    }
    server = ServerProcess.appliance(env, log)
    try:
        server.wait_until("/ready", timeout=float(os.environ.get("TINY_SERVER_TIMEOUT", "240")))
        yield server
    finally:
        server.stop()
