"""A folder served on several loopback addresses, each a separate host counting its peak connections.

`python -m bench.hosts_server FOLDER N` serves FOLDER on 127.0.1.1 ... 127.0.1.N (a thread per
connection) and prints one base URL per line. GET /_peak on a host answers its most
concurrent connections and the requests it answered since the last /_peak (JSON) and resets both:
the download and caption-first benchmarks read it after each contender. Runs in its own process, like bench.common.served.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = self.peak = self.requests = 0


class _Handler(BaseHTTPRequestHandler):
    folder: Path
    counter: _Counter

    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        with self.counter.lock:
            self.counter.open += 1
            self.counter.peak = max(self.counter.peak, self.counter.open)
        try:
            super().handle()
        finally:
            with self.counter.lock:
                self.counter.open -= 1

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        name = self.path.lstrip("/").split("?")[0]
        if name == "_peak":
            with self.counter.lock:
                # every contender opened at least one connection, so this lone one never set the peak
                peak, self.counter.peak = self.counter.peak, 0
                requests, self.counter.requests = self.counter.requests, 0
            return self._send(200, json.dumps({"peak": peak, "requests": requests}).encode())
        with self.counter.lock:
            self.counter.requests += 1
        path = self.folder / name
        if "/" in name or not path.is_file():
            return self._send(404, b"not found")
        self._send(200, path.read_bytes())


def main(folder: Path, count: int) -> None:
    servers = []
    for i in range(count):
        handler = type("Handler", (_Handler,), {"folder": folder, "counter": _Counter()})
        server = ThreadingHTTPServer((f"127.0.1.{1 + i}", 0), handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for server in servers:
        print(f"http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
