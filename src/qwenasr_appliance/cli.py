"""Command line: `qwenasr-appliance serve` starts the server under granian; `check-config` validates."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from qwenasr_appliance import __version__
from qwenasr_appliance.config import ENV_VARIABLES, ConfigError, Settings, load_settings

APP_TARGET = "qwenasr_appliance.api.app:create_app"
# granian's HTTP/1 read buffer: the largest request head (request line and headers) it reads, larger
# ones get 431, and the largest piece of body per read. Nothing this API takes needs a head over a few
# kilobytes (granian's default buffer is about 400 KiB); below 128 KiB uploads stream measurably slower.
MAX_REQUEST_HEAD_BYTES = 128 * 1024


# After the drain: the lifespan shutdown closes the engine (vLLM's engine core takes seconds) before
# granian's kill. The chart's terminationGracePeriodSeconds leaves drain + 15 s after SIGTERM, compose
# stop_grace_period as much: the kill comes first, the orchestrator's SIGKILL after.
ENGINE_STOP_SECONDS = 10


def kill_timeout_seconds(settings: Settings) -> int:
    """granian's `workers_kill_timeout`: SHUTDOWN_GRACE_SECONDS (rounded up) + `ENGINE_STOP_SECONDS`."""
    return math.ceil(settings.shutdown_grace_seconds) + ENGINE_STOP_SECONDS


def build_server(settings: Settings, target: str = APP_TARGET) -> Any:
    """granian's server for `target` (an app factory) as the appliance runs it; the tests reuse it."""
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
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
            max_buffer_size=MAX_REQUEST_HEAD_BYTES,
        ),
        # The app answers what is still running when SHUTDOWN_GRACE_SECONDS end (see api/shutdown.py); this
        # kill is the backstop for a worker that is stuck.
        workers_kill_timeout=kill_timeout_seconds(settings),
    )


def _serve(settings: Settings) -> int:
    build_server(settings).serve()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenasr-appliance",
        description="OpenAI-compatible speech-to-text server for Qwen3-ASR (vLLM on GPU, transformers on CPU).",
        epilog="Configuration comes from environment variables: " + ", ".join(ENV_VARIABLES) + ".",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server (granian) and load the model in the background")
    serve.add_argument("--host", help="listen address (default: $HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="listen port (default: $PORT or 8001)")
    commands.add_parser("check-config", help="validate the environment's settings and print them as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "host", None):
        os.environ["HOST"] = args.host
    if getattr(args, "port", None):
        os.environ["PORT"] = str(args.port)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"qwenasr-appliance: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import msgspec

        redacted = msgspec.structs.replace(settings, api_keys=tuple("***" for _ in settings.api_keys))
        print(msgspec.json.encode(redacted).decode())
        return 0
    return _serve(settings)
