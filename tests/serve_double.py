"""`python -m tests.serve_double`: the appliance's own granian configuration (cli.build_server: HTTP/1
timeouts and limits, kill timeout) serving the real app around the test double engine."""

from __future__ import annotations

import sys

from qwenasr_appliance.cli import build_server
from qwenasr_appliance.config import ConfigError, load_settings


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    build_server(settings, target="tests.doubles:create_test_app").serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
