"""Start real server processes (granian on 127.0.0.1) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def loopback_only() -> Iterator[None]:
    """Within: every name lookup and connection for anything but this machine fails the test (in this
    process)."""
    original = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in {"127.0.0.1", "::1", "localhost"}:
            raise AssertionError(f"the test tried to reach {address!r}: tests stay on 127.0.0.1")
        original(sock, address)

    original_lookup = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in {"127.0.0.1", "::1", "localhost", None}:
            raise AssertionError(f"the test tried to look up {host!r}: tests stay on 127.0.0.1")
        return original_lookup(host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    try:
        yield
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]
        socket.getaddrinfo = original_lookup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A server subprocess with its output captured to a log file, run in the log file's folder (so that
    a `.env` in the repository is never read), `env` over the test process's environment (None: unset)."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str | None], port: int, log_path: Path, cwd: Path | None = None
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        merged = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}", **env}
        full_env = {name: value for name, value in merged.items() if value is not None}
        self.process = subprocess.Popen(
            argv, env=full_env, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd or log_path.parent
        )

    @classmethod
    def appliance(cls, env: dict[str, str], log_path: Path) -> ServerProcess:
        """The product's own entry point: `qwenasr-appliance serve`."""
        port = free_port()
        argv = [sys.executable, "-m", "qwenasr_appliance", "serve", "--host", "127.0.0.1", "--port", str(port)]
        return cls(argv, env, port, log_path)

    @classmethod
    def appliance_in(cls, folder: Path, env: Mapping[str, str | None], port: int, log_path: Path) -> ServerProcess:
        """`qwenasr-appliance serve` started in `folder` with no arguments: its settings come from `env`
        and whatever `.env` the folder has (the caller knows which `port` that names)."""
        return cls([sys.executable, "-m", "qwenasr_appliance", "serve"], env, port, log_path, cwd=folder)

    @classmethod
    def with_test_double(cls, env: dict[str, str], log_path: Path, *granian_options: str) -> ServerProcess:
        """granian serving the real app around the test double engine (`granian_options`: more of its
        command line options, e.g. `--loop asyncio`)."""
        port = free_port()
        argv = [
            sys.executable, "-m", "granian", "--interface", "asgi", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *granian_options,
            "tests.doubles:create_test_app",
        ]  # fmt: skip
        return cls(argv, env, port, log_path)

    @classmethod
    def product_with_test_double(cls, env: dict[str, str], log_path: Path) -> ServerProcess:
        """The appliance's own granian configuration (cli.build_server) around the test double engine."""
        port = free_port()
        argv = [sys.executable, "-m", "tests.serve_double"]
        return cls(argv, {"HOST": "127.0.0.1", "PORT": str(port), **env}, port, log_path)

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_until(self, path: str, status: int | tuple[int, ...] = 200, timeout: float = 120.0) -> None:
        """Until `path` answers `status` (or one of several)."""
        wanted = (status,) if isinstance(status, int) else status
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            try:
                response = httpx.get(self.url + path, timeout=2)
                if response.status_code in wanted:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(f"{path} did not answer {status} within {timeout}s (last: {last}):\n{self.logs()[-4000:]}")

    def wait_until_answering(self, timeout: float = 60.0) -> None:
        """Until the HTTP server answers `/health` at all: 200, or 503 once the engine failed for good."""
        self.wait_until("/health", (200, 503), timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return int(self.process.returncode)
