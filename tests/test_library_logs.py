"""Library output (Hugging Face, transformers, Python warnings, vLLM) appears once, in our log format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.servers import REPO

_CONFIGURED = """
import logging, warnings
from qwenasr_appliance.logs import adopt_library_loggers, configure_logging
configure_logging("info", "json")
import huggingface_hub, transformers  # each installs a raw stderr handler on its logger
adopt_library_loggers()
logging.getLogger("huggingface_hub.utils._http").warning("hub says: Retrying in 1s [Retry 1/5].")
transformers.utils.logging.get_logger("transformers.modeling_utils").warning("transformers says: weights")
warnings.warn("a library warns", UserWarning)
"""

_VLLM = """
import json, logging, logging.config, sys
from qwenasr_appliance.logs import vllm_logging_config
logging.config.dictConfig(json.loads(json.dumps(vllm_logging_config("info", sys.argv[1]))))
logging.getLogger("vllm.v1.worker.gpu_model_runner").info("Starting to load model /models/x...")
"""


def _run(code: str, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={"PYTHONPATH": f"{REPO / 'src'}", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def test_hugging_face_transformers_and_warnings_print_once_as_json() -> None:
    lines = _run(_CONFIGURED)
    for needle in ("hub says", "transformers says", "a library warns"):
        matching = [line for line in lines if needle in line]
        assert len(matching) == 1, f"{needle!r} printed {len(matching)} times: {lines}"
        record = json.loads(matching[0])
        assert record["level"] == "warning" and "timestamp" in record


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_vllm_logs_in_our_format(fmt: str) -> None:
    lines = _run(_VLLM, fmt)
    assert len(lines) == 1, lines
    if fmt == "json":
        record = json.loads(lines[0])
        assert record["event"].startswith("Starting to load model") and record["logger"].startswith("vllm.")
    else:
        assert "Starting to load model" in lines[0] and not lines[0].startswith("{")
