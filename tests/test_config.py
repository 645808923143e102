from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from qwenasr_appliance.cli import main
from qwenasr_appliance.config import (
    ENV_VARIABLES,
    ConfigError,
    Settings,
    apply_env_file,
    load_settings,
    read_environment,
    truncation_risk,
)


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


def test_the_server_speaks_http1_only_unless_http2_is_asked_for() -> None:
    """Issue 12 (K3): granian's default mode also serves h2c, where the HTTP/1 limits do not apply."""
    from granian.constants import HTTPModes

    from qwenasr_appliance.cli import MAX_REQUEST_HEAD_BYTES, build_server

    default = build_server(load_settings({}))
    assert default.http == HTTPModes.http1
    with_http2 = build_server(load_settings({"HTTP2": "true", "CLIENT_TIMEOUT_SECONDS": "7"}))
    assert with_http2.http == HTTPModes.auto
    assert with_http2.http2_settings.max_headers_size == MAX_REQUEST_HEAD_BYTES
    assert (with_http2.http2_settings.keep_alive_interval, with_http2.http2_settings.keep_alive_timeout) == (7000, 7)


def test_the_worker_deadline_is_at_most_the_request_timeout() -> None:
    assert load_settings({"WORKER_TIMEOUT_SECONDS": "60", "REQUEST_TIMEOUT_SECONDS": "5"}).worker_job_timeout == 5
    assert load_settings({}).worker_job_timeout == 120


def test_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=9123\nLOG_FORMAT=console\nMODEL_ID=/models/from-file\nHF_HUB_OFFLINE=1\n")
    environment = read_environment({"PORT": "9555"}, cwd=tmp_path)
    settings = load_settings(environment.values)
    assert (settings.port, settings.log_format, settings.model_id) == (9555, "console", "/models/from-file")
    assert environment.env_file == tmp_path / ".env"
    assert [environment.source(v) for v in ("PORT", "LOG_FORMAT", "DTYPE")] == ["environment", ".env", "default"]
    assert environment.values["HF_HUB_OFFLINE"] == "1"  # other libraries' variables come from the file too


def test_env_file_named_by_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PORT=1111\n")
    (tmp_path / "prod.env").write_text("PORT=2222\nEMPTY\n")
    environment = read_environment({"ENV_FILE": "prod.env"}, cwd=tmp_path)
    assert load_settings(environment.values).port == 2222
    assert "EMPTY" not in environment.values
    with pytest.raises(ConfigError, match=r"^ENV_FILE:"):
        read_environment({"ENV_FILE": "missing.env"}, cwd=tmp_path)
    assert read_environment({}, cwd=tmp_path / "nowhere").env_file is None


def test_every_invalid_variable_is_reported() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"PORT": "eighty", "DTYPE": "fp64", "LOG_FORMAT": "xml", "MODEL_ID": "ok"})
    assert [variable for variable, _ in error.value.problems] == ["DTYPE", "PORT", "LOG_FORMAT"]
    assert all(name in str(error.value) for name in ("PORT", "DTYPE", "LOG_FORMAT"))


def test_check_config_reports_sources_and_every_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_text("PORT=9123\nLOG_FORMAT=console\nAPI_KEYS=from-file-secret\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENV_FILE")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert main(["check-config"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["env_file"] == str(tmp_path / ".env")
    assert report["settings"]["port"] == 9123 and report["settings"]["log_level"] == "debug"
    assert report["sources"]["PORT"] == ".env" and report["sources"]["LOG_LEVEL"] == "environment"
    assert report["sources"]["DTYPE"] == "default"
    assert report["settings"]["api_keys"] == ["***"]
    (tmp_path / ".env").write_text("PORT=eighty\nDTYPE=fp64\n")
    monkeypatch.setenv("LOG_FORMAT", "xml")
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert f"PORT (from {tmp_path / '.env'})" in err and "DTYPE (from" in err
    assert "LOG_FORMAT (from the environment)" in err


def test_dot_env_is_git_ignored() -> None:
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_truncation_risk_is_none_with_the_defaults_and_named_when_chunks_outgrow_the_token_limit() -> None:
    assert truncation_risk(Settings()) is None  # 30 s chunks: 248 tokens needed, 512 allowed
    risk = truncation_risk(Settings(chunk_seconds=1200.0, max_new_tokens=512))
    assert risk is not None
    assert "MAX_NEW_TOKENS=512" in risk and "1200 s" in risk and "9608" in risk
    assert truncation_risk(Settings(chunk_seconds=1200.0, max_new_tokens=9608)) is None


# -- empty values: docker compose's ${VAR:-}, Helm templates and .env files give them; they mean "unset" --

BLANKS = ["", "   ", "\t"]
# One setting of each kind, with a value other than its default (the file's value in the layering test).
KINDS = {
    "VERBOSE_JSON_CONFIDENCE": "false",  # bool whose default is true: empty used to turn it off
    "EXPECT_GPU": "true",  # bool
    "PORT": "9000",  # int
    "MAX_CONCURRENT_REQUESTS": "3",  # int whose default 0 means "derived"
    "GPU_MEMORY_UTILIZATION": "0.5",  # float
    "SHUTDOWN_GRACE_SECONDS": "5",  # float whose default is derived from two others
    "ENGINE": "cpu",  # choice
    "LOG_LEVEL": "debug",  # choice
    "MODEL_ID": "/models/qwen3-asr",  # path or repo id
    "HOST": "127.0.0.1",  # text
    "ALIGNER_MODEL_ID": "/models/aligner",  # path; empty documented as "no aligner", which is the default
    "API_KEYS": "k1,k2",  # keys; empty documented as "no authentication", which is the default
    "SERVED_MODEL_NAME": "whisper-1",  # names
}


@pytest.mark.parametrize("blank", BLANKS)
@pytest.mark.parametrize("variable", ENV_VARIABLES)
def test_an_empty_value_of_any_setting_is_its_default(variable: str, blank: str) -> None:
    assert load_settings({variable: blank}) == load_settings({})


@pytest.mark.parametrize("blank", BLANKS)
def test_empty_values_keep_the_derived_defaults(blank: str) -> None:
    settings = load_settings(
        {"SHUTDOWN_GRACE_SECONDS": blank, "QUEUE_TIMEOUT_SECONDS": "10", "REQUEST_TIMEOUT_SECONDS": "20"}
    )
    assert settings.shutdown_grace_seconds == 30.0
    assert load_settings({"VERBOSE_JSON_CONFIDENCE": blank}).verbose_json_confidence is True
    assert load_settings({"ALIGNER_MODEL_ID": blank}).aligner_model_id == ""
    assert load_settings({"API_KEYS": blank, "API_KEYS_FILE": blank}).api_keys == ()
    assert load_settings({"SERVED_MODEL_NAME": blank}).served_model_names == ("Qwen/Qwen3-ASR-1.7B",)


@pytest.mark.parametrize("blank", ["", "   "])
def test_empty_values_in_the_environment_are_defaults_and_reported_so(tmp_path: Path, blank: str) -> None:
    environment = read_environment({name: blank for name in KINDS}, cwd=tmp_path)
    assert load_settings(environment.values) == load_settings({})
    assert {name: environment.source(name) for name in KINDS} == dict.fromkeys(KINDS, "default")


@pytest.mark.parametrize("line", ["{name}=", "{name}=   ", '{name}="  "', "{name}=''"])
def test_empty_values_in_the_env_file_are_defaults_and_reported_so(tmp_path: Path, line: str) -> None:
    (tmp_path / ".env").write_text("\n".join(line.format(name=name) for name in ENV_VARIABLES) + "\n")
    environment = read_environment({}, cwd=tmp_path)
    assert load_settings(environment.values) == load_settings({})
    assert {environment.source(name) for name in ENV_VARIABLES} == {"default"}


def test_an_empty_value_in_the_environment_leaves_the_env_file_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty means unset: the file's value applies, as it would with the variable absent."""
    (tmp_path / ".env").write_text("".join(f"{name}={value}\n" for name, value in KINDS.items()))
    environment = read_environment(dict.fromkeys(KINDS, ""), cwd=tmp_path)
    settings = load_settings(environment.values)
    assert load_settings(KINDS) == settings
    assert (settings.port, settings.engine, settings.verbose_json_confidence) == (9000, "cpu", False)
    assert {environment.source(name) for name in KINDS} == {".env"}
    # ... and is what child processes (granian's workers) are given.
    for name in KINDS:
        monkeypatch.setenv(name, "")
    apply_env_file(environment)
    assert {name: os.environ[name] for name in KINDS} == KINDS


def test_empty_values_elsewhere_keep_their_meaning(tmp_path: Path) -> None:
    """Only the appliance's settings: CUDA_VISIBLE_DEVICES= still hides every GPU from CUDA."""
    (tmp_path / ".env").write_text("CUDA_VISIBLE_DEVICES=0\n")
    assert read_environment({"CUDA_VISIBLE_DEVICES": ""}, cwd=tmp_path).values["CUDA_VISIBLE_DEVICES"] == ""


def test_an_empty_api_keys_file_in_the_environment_leaves_the_env_file_one(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("from-file\n")
    (tmp_path / ".env").write_text(f"API_KEYS_FILE={keys}\n")
    environment = read_environment({"API_KEYS_FILE": " "}, cwd=tmp_path)
    assert load_settings(environment.values).api_keys == ("from-file",)


def test_check_config_reports_empty_values_as_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_text("PORT=\nLOG_LEVEL=   \nVERBOSE_JSON_CONFIDENCE=\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENV_FILE", raising=False)
    for name in ("ENGINE", "MAX_NUM_SEQS", "API_KEYS", "HOST"):
        monkeypatch.setenv(name, "")
    assert main(["check-config"]) == 0
    report = json.loads(capsys.readouterr().out)
    defaults = json.loads(msgspec.json.encode(load_settings({})))
    for name, field in [
        ("PORT", "port"),
        ("LOG_LEVEL", "log_level"),
        ("VERBOSE_JSON_CONFIDENCE", "verbose_json_confidence"),
        ("ENGINE", "engine"),
        ("MAX_NUM_SEQS", "max_num_seqs"),
        ("API_KEYS", "api_keys"),
        ("HOST", "host"),
    ]:
        assert report["sources"][name] == "default", name
        assert report["settings"][field] == defaults[field], name


@pytest.mark.slow
@pytest.mark.parametrize("rust_backtrace", ["0", "1"])
def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, rust_backtrace: str) -> None:
    """granian raises the bind error as a RuntimeError from Rust (with RUST_BACKTRACE=1, the backtrace in
    its text): the user gets one line naming the address and what to change, exit status 1."""
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "RUST_BACKTRACE": rust_backtrace,
        }
        env.pop("ENV_FILE", None)  # cwd is an empty folder: no .env
        result = subprocess.run(
            [sys.executable, "-c", "from qwenasr_appliance.cli import main; raise SystemExit(main(['serve']))"],
            env=env, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "backtrace" not in result.stderr.lower()
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("qwenasr-appliance:")]
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line and "PORT" in line


def test_check_config_warns_of_what_the_env_file_holds_that_nothing_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelled setting in .env was silently ignored (the setting meant stayed off), and a line that
    does not parse only drew python-dotenv's warning without the file's name."""
    import json

    (tmp_path / ".env").write_text(
        "PROT_OPS_ENDPOINTS=true\nthis is not a setting\nHF_HUB_OFFLINE=1\nVLLM_USE_V1=1\nUNKNOWN_VAR=1\nPORT=9000\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENV_FILE", raising=False)
    assert main(["check-config"]) == 0
    captured = capsys.readouterr()
    warnings = json.loads(captured.out)["warnings"]
    env = tmp_path / ".env"
    assert warnings == [
        f"{env}, line 1: PROT_OPS_ENDPOINTS is not a setting of the appliance; did you mean PROTECT_OPS_ENDPOINTS?",
        f"{env}, line 2: not a NAME=value line; it is ignored",
        f"{env}, line 5: UNKNOWN_VAR is not a setting of the appliance (see .env.example for the settings)",
    ]
    assert [line for line in captured.err.splitlines() if "warning:" in line] == [
        f"qwenasr-appliance: warning: {w}" for w in warnings
    ]
    assert "could not parse" not in captured.err  # python-dotenv's own, file-less warning


def test_env_example_draws_no_warning() -> None:
    from qwenasr_appliance.config import env_file_warnings

    assert env_file_warnings(Path(__file__).resolve().parents[1] / ".env.example") == ()
