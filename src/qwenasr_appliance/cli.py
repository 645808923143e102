"""Command line: `qwenasr-appliance serve` starts the server under granian; `check-config` validates."""

from __future__ import annotations

import argparse
import os
import sys

from qwenasr_appliance import __version__
from qwenasr_appliance.config import ENV_VARIABLES, ConfigError, Settings, load_settings


def _serve(settings: Settings) -> int:
    from granian.constants import Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    from qwenasr_appliance.observability import granian_log_config

    server = Server(
        "qwenasr_appliance.app:create_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=1,  # one engine per process; scale with replicas, not workers
        log_level=LogLevels(settings.log_level),
        log_dictconfig=granian_log_config(settings.log_format),
        workers_kill_timeout=int(settings.shutdown_grace_seconds) + 5,
    )
    server.serve()
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
