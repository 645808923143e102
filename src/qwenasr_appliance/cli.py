"""Command line: `qwenasr-appliance serve` starts the server under granian; `check-config` validates."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from qwenasr_appliance import __version__
from qwenasr_appliance.api.request_head import MAX_REQUEST_HEAD_BYTES
from qwenasr_appliance.config import (
    ENV_FILE_VARIABLE,
    ENV_VARIABLES,
    ConfigError,
    Environment,
    Settings,
    apply_env_file,
    load_settings,
    read_environment,
)

APP_TARGET = "qwenasr_appliance.api.app:create_app"
# Most concurrent streams on one HTTP/2 connection (granian's default is 200): far more than one client
# needs, and each stream is a request the HTTP/1 path would have needed a connection for.
MAX_HTTP2_STREAMS = 100


# After the drain: the lifespan shutdown closes the engine (vLLM's engine core takes seconds) before
# granian's kill. The chart's terminationGracePeriodSeconds leaves drain + 15 s after SIGTERM, compose
# stop_grace_period as much: the kill comes first, the orchestrator's SIGKILL after.
ENGINE_STOP_SECONDS = 10


def kill_timeout_seconds(settings: Settings) -> int:
    """granian's `workers_kill_timeout`: SHUTDOWN_GRACE_SECONDS (rounded up) + `ENGINE_STOP_SECONDS`."""
    return math.ceil(settings.shutdown_grace_seconds) + ENGINE_STOP_SECONDS


def build_server(settings: Settings, target: str = APP_TARGET) -> Any:
    """granian's server for `target` (an app factory) as the appliance runs it; the tests reuse it."""
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings, HTTP2Settings
    from granian.log import LogLevels
    from granian.server import Server

    from qwenasr_appliance.logs import granian_log_config

    return Server(
        target,
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=1,  # one engine per process; scale with replicas, not workers
        log_level=LogLevels(settings.log_level),
        log_dictconfig=granian_log_config(settings.log_format),
        # Slow clients: the request head must arrive within CLIENT_TIMEOUT_SECONDS (slowloris), and an
        # idle keep-alive connection is closed after as long. The body is timed by the app.
        http1_settings=HTTP1Settings(
            header_read_timeout=round(settings.client_timeout_seconds * 1000),
            keep_alive=True,
            # hyper checks this cap before each read, so heads up to about twice it may pass here: the app
            # enforces it exactly (api/request_head.py).
            max_buffer_size=MAX_REQUEST_HEAD_BYTES,
        ),
        # The app answers what is still running when SHUTDOWN_GRACE_SECONDS end (see api/shutdown.py); this
        # kill is the backstop for a worker that is stuck.
        workers_kill_timeout=kill_timeout_seconds(settings),
        # granian's default mode `auto` also serves plain HTTP/2 (h2c), where none of the HTTP/1 limits
        # above apply (measured: an 8 MB header block answered 200, an idle connection outlived the
        # client timeout). HTTP/2 only when asked for, and then with the same head cap and timeouts.
        http=HTTPModes.auto if settings.http2 else HTTPModes.http1,
        http2_settings=_http2_settings(settings, HTTP2Settings),
    )


def _http2_settings(settings: Settings, http2_settings: Any) -> Any:
    """granian's HTTP/2 settings carrying the HTTP/1 limits (used only with HTTP2=true): the same cap on
    a request's header block, and a connection whose client stops answering pings within
    CLIENT_TIMEOUT_SECONDS is closed (HTTP/2 has no header read timeout of its own)."""
    timeout = max(1, round(settings.client_timeout_seconds))
    return http2_settings(
        max_headers_size=MAX_REQUEST_HEAD_BYTES,
        max_concurrent_streams=MAX_HTTP2_STREAMS,
        keep_alive_interval=min(60_000, timeout * 1000),
        keep_alive_timeout=timeout,
    )


def _serve(settings: Settings) -> int:
    server = build_server(settings)
    try:
        server.serve()
    except (RuntimeError, OSError) as exc:
        # granian binds the socket in Rust and raises the OS error as text ("Address already in use (os
        # error 98)"): one line naming the address and what to change, not a traceback.
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        if "os error" not in text and not isinstance(exc, OSError):
            raise
        print(
            f"qwenasr-appliance: cannot listen on {settings.host}:{settings.port}: {text}. "
            "Another process may hold the port: set PORT (or --port) to a free one, or stop that process.",
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenasr-appliance",
        description="OpenAI-compatible speech-to-text server for Qwen3-ASR (vLLM on GPU, transformers on CPU).",
        epilog="Configuration comes from environment variables, over `.env` in the working directory (or the file "
        f"named by {ENV_FILE_VARIABLE}): " + ", ".join(ENV_VARIABLES) + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server (granian) and load the model in the background")
    serve.add_argument("--host", help="listen address (default: $HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default: $PORT or 8001)")
    commands.add_parser(
        "check-config",
        help="validate the settings (environment over .env) and print them as JSON with where each came from",
    )
    return parser


def _report_errors(error: ConfigError, environment: Environment | None) -> None:
    for warning in environment.file_warnings if environment is not None else ():
        print(f"qwenasr-appliance: warning: {warning}", file=sys.stderr)
    print("qwenasr-appliance: configuration error:", file=sys.stderr)
    for variable, message in error.problems:
        where = ""
        if environment is not None and variable in ENV_VARIABLES:
            source = environment.source(variable)
            where = f" (from {environment.env_file})" if source == ".env" else f" (from the {source})"
        print(f"  {variable}{where}: {message}", file=sys.stderr)


def _check_config(settings: Settings, environment: Environment) -> str:
    """check-config's JSON: the settings (keys redacted), the file read and each variable's source."""
    import msgspec

    redacted = msgspec.structs.replace(settings, api_keys=tuple("***" for _ in settings.api_keys))
    report = {
        "env_file": str(environment.env_file) if environment.env_file else None,
        "settings": redacted,
        "sources": {name: environment.source(name) for name in ENV_VARIABLES},
        "warnings": list(environment.file_warnings),
    }
    return msgspec.json.encode(report).decode()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "host", None):
        os.environ["HOST"] = args.host
    if getattr(args, "port", None):
        os.environ["PORT"] = str(args.port)
    environment: Environment | None = None
    try:
        environment = read_environment()
        settings = load_settings(environment.values)
    except ConfigError as exc:
        _report_errors(exc, environment)
        return 2
    for warning in environment.file_warnings:
        print(f"qwenasr-appliance: warning: {warning}", file=sys.stderr)
    if args.command == "check-config":
        print(_check_config(settings, environment))
        return 0
    apply_env_file(environment)  # granian's worker and vLLM's engine core read the environment too
    return _serve(settings)
