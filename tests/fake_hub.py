"""A model hub on 127.0.0.1 that answers what huggingface_hub asks while it downloads a snapshot:
the model's info (`/api/models/REPO`, with file sizes) and its files (`/REPO/resolve/REV/FILE`, HEAD
and GET), sent in slices with a pause between them so that a download can be watched."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SHA = "0123456789abcdef0123456789abcdef01234567"


def _handler(repo: str, files: dict[str, bytes], pause: float) -> type[BaseHTTPRequestHandler]:
    info = {
        "id": repo,
        "modelId": repo,
        "sha": SHA,
        "siblings": [{"rfilename": name, "size": len(data)} for name, data in files.items()],
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

        def _file(self) -> tuple[str, bytes] | None:
            prefix = f"/{repo}/resolve/"
            if not self.path.startswith(prefix):
                return None
            name = self.path[len(prefix) :].split("/", 1)[-1]
            return (name, files[name]) if name in files else None

        def _send_head(self) -> bytes | None:
            if self.path.split("?")[0] in (f"/api/models/{repo}", f"/api/models/{repo}/revision/{SHA}"):
                body = json.dumps(info).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return body
            found = self._file()
            if found is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            _, data = found
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("X-Repo-Commit", SHA)
            self.end_headers()
            return data

        def do_HEAD(self) -> None:
            self._send_head()

        def do_GET(self) -> None:
            body = self._send_head()
            for start in range(0, len(body or b""), 64 * 1024):
                self.wfile.write((body or b"")[start : start + 64 * 1024])
                self.wfile.flush()
                time.sleep(pause)

    return Handler


@contextmanager
def fake_hub(repo: str, files: dict[str, bytes], pause: float = 0.0) -> Iterator[str]:
    """Serve `files` as the model `repo`; yields the endpoint (http://127.0.0.1:PORT)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(repo, files, pause))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
