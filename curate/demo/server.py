"""A throw-away HTTP server on 127.0.0.1 that serves the demo corpus and its misbehaviours."""
from __future__ import annotations

import mimetypes
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(BaseHTTPRequestHandler):
    """Serves files from one folder; names starting with a server kind misbehave on purpose."""

    def __init__(self, *args, folder: Path, slow_seconds: float, **kwargs):
        self.folder = folder
        self.slow_seconds = slow_seconds
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:  # keep the demo's output readable
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the slow response is meant to time out)

    def do_GET(self) -> None:
        name = self.path.lstrip("/").split("?")[0]
        if name.startswith("http_404"):
            return self._send(404, b"not found", "text/plain")
        if name.startswith("http_500"):
            return self._send(500, b"server error", "text/plain")
        if name.startswith("html_page"):
            return self._send(200, b"<html><body>Access denied</body></html>", "image/jpeg")
        if name.startswith("slow"):
            time.sleep(self.slow_seconds)
            return self._send(200, b"too late", "image/jpeg")
        path = self.folder / name
        if "/" in name or not path.is_file():
            return self._send(404, b"not found", "text/plain")
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send(200, path.read_bytes(), ctype)


@contextmanager
def serve(folder: Path, slow_seconds: float = 30.0, port: int = 0) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 for the duration of the block; yields the base URL.

    `port` asks for a port (a re-run reuses the one its URL manifest names); a busy one
    falls back to a free port.
    """
    handler = partial(_Handler, folder=folder, slow_seconds=slow_seconds)
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
