from __future__ import annotations

from pathlib import Path

import pytest

from qwenasr_appliance.cli import main
from qwenasr_appliance.config import ENV_VARIABLES, ConfigError, load_settings


def test_defaults_keep_the_original_server_names_and_port() -> None:
    settings = load_settings({})
    assert settings.port == 8001
    assert settings.model_id == "Qwen/Qwen3-ASR-1.7B"
    assert settings.model_name == settings.model_id
    assert settings.quant_mode == "auto"
    assert settings.max_upload_bytes == 25 * 1024 * 1024


def test_original_variables_are_read() -> None:
    settings = load_settings(
        {
            "MODEL_ID": "Qwen/Qwen3-ASR-0.6B",
            "DTYPE": "float16",
            "QUANT_MODE": "bnb-4bit",
            "GPU_MEMORY_UTILIZATION": "0.5",
            "HOST": "127.0.0.1",
            "PORT": "9000",
            "SERVED_MODEL_NAME": "whisper-1",
        }
    )
    assert (settings.model_id, settings.dtype, settings.quant_mode) == ("Qwen/Qwen3-ASR-0.6B", "float16", "bnb-4bit")
    assert (settings.gpu_memory_utilization, settings.host, settings.port) == (0.5, "127.0.0.1", 9000)
    assert settings.model_name == "whisper-1"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("GPU_MEMORY_UTILIZATION", "1.5"),
        ("GPU_MEMORY_UTILIZATION", "0"),
        ("GPU_MEMORY_UTILIZATION", "nan"),
        ("QUANT_MODE", "int8"),
        ("DTYPE", "fp64"),
        ("ENGINE", "tpu"),
        ("MAX_UPLOAD_BYTES", "-1"),
        ("MAX_AUDIO_SECONDS", "0"),
        ("LOG_FORMAT", "xml"),
        ("ENFORCE_EAGER", "maybe"),
        ("MODEL_ID", "   "),
        ("CHUNK_SECONDS", "2"),
        ("EXPECT_GPU", "perhaps"),
        ("GPU_FALLBACK", "cpu"),
        ("SHUTDOWN_GRACE_SECONDS", "7200"),
        ("SHUTDOWN_GRACE_SECONDS", "soon"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({variable: value})
    assert error.value.variable == variable
    assert str(error.value).startswith(f"{variable}:")


def test_a_gpu_is_not_expected_unless_told() -> None:
    settings = load_settings({})
    assert (settings.expect_gpu, settings.gpu_fallback) == (False, "degraded")
    told = load_settings({"EXPECT_GPU": "true", "GPU_FALLBACK": "NOT_READY"})
    assert (told.expect_gpu, told.gpu_fallback) == (True, "not_ready")


def test_the_drain_defaults_to_queue_wait_plus_request_time() -> None:
    """A rollout lets every admitted request finish: SHUTDOWN_GRACE_SECONDS unset (or empty, as in a
    copied .env.example) is QUEUE_TIMEOUT_SECONDS + REQUEST_TIMEOUT_SECONDS, at most an hour."""
    assert load_settings({}).shutdown_grace_seconds == 930.0
    assert load_settings({"SHUTDOWN_GRACE_SECONDS": ""}).shutdown_grace_seconds == 930.0
    derived = load_settings({"QUEUE_TIMEOUT_SECONDS": "10", "REQUEST_TIMEOUT_SECONDS": "120"})
    assert derived.shutdown_grace_seconds == 130.0
    assert load_settings({"REQUEST_TIMEOUT_SECONDS": "86400"}).shutdown_grace_seconds == 3600.0
    assert load_settings({"SHUTDOWN_GRACE_SECONDS": "5"}).shutdown_grace_seconds == 5.0


def test_granian_kills_after_the_drain_and_the_engine_stop() -> None:
    from qwenasr_appliance.cli import ENGINE_STOP_SECONDS, kill_timeout_seconds

    assert kill_timeout_seconds(load_settings({})) == 930 + ENGINE_STOP_SECONDS
    assert kill_timeout_seconds(load_settings({"SHUTDOWN_GRACE_SECONDS": "1.5"})) == 2 + ENGINE_STOP_SECONDS
    # The chart's terminationGracePeriodSeconds leaves drain + 15 s after SIGTERM: granian's kill comes first.
    assert ENGINE_STOP_SECONDS < 15


def test_api_keys_from_list_and_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# comment\nfile-key-1\n\nfile-key-2\n")
    settings = load_settings({"API_KEYS": "a, b,", "API_KEYS_FILE": str(keys)})
    assert settings.api_keys == ("a", "b", "file-key-1", "file-key-2")
    with pytest.raises(ConfigError, match="API_KEYS_FILE"):
        load_settings({"API_KEYS_FILE": str(tmp_path / "missing")})


def test_env_example_documents_every_variable() -> None:
    example = (Path(__file__).resolve().parents[1] / ".env.example").read_text()
    documented = {line.split("=", 1)[0].lstrip("# ").strip() for line in example.splitlines() if "=" in line}
    assert set(ENV_VARIABLES) <= documented


def test_cli_reports_bad_configuration(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PORT", "not-a-port")
    assert main(["check-config"]) == 2
    assert "PORT" in capsys.readouterr().err


def test_cli_check_config_redacts_keys(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("API_KEYS", "super-secret")
    assert main(["check-config"]) == 0
    out = capsys.readouterr().out
    assert "super-secret" not in out and '"***"' in out


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "serve" in capsys.readouterr().out
