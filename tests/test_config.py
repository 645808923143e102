from __future__ import annotations

from pathlib import Path

import pytest

from qwenasr_appliance.cli import main
from qwenasr_appliance.config import ENV_VARIABLES, ConfigError, Settings, load_settings, truncation_risk


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
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({variable: value})
    assert error.value.variable == variable
    assert str(error.value).startswith(f"{variable}:")


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


def test_truncation_risk_is_none_with_the_defaults_and_named_when_chunks_outgrow_the_token_limit() -> None:
    assert truncation_risk(Settings()) is None  # 30 s chunks: 248 tokens needed, 512 allowed
    risk = truncation_risk(Settings(chunk_seconds=1200.0, max_new_tokens=512))
    assert risk is not None
    assert "MAX_NEW_TOKENS=512" in risk and "1200 s" in risk and "9608" in risk
    assert truncation_risk(Settings(chunk_seconds=1200.0, max_new_tokens=9608)) is None
