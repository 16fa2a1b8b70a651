"""A folder served on several loopback addresses, each a separate host counting its peak connections.

`python -m bench.hosts_server FOLDER N [TARPITS [DRIP_BYTES]]` serves FOLDER on 127.0.1.1 ... 127.0.1.N
(a thread per connection) and prints one base URL per line. The last TARPITS hosts are slow-drip
tarpits: every request gets its headers at once, then DRIP_BYTES bytes one every DRIP_SECONDS. GET /_peak on a host
answers its most concurrent connections and the requests it answered since the last /_peak (JSON) and resets both:
the download and caption-first benchmarks read it after each contender. Runs in its own process, like
bench.common.served.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Counter:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = self.peak = self.requests = self.robots = 0


DRIP_BYTES = 40
DRIP_SECONDS = 0.5      # 20 s a request, however short the client's per-read timeout


class _Handler(BaseHTTPRequestHandler):
    folder: Path
    counter: _Counter
    tarpit: bool = False
    drip_bytes: int = DRIP_BYTES

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
                robots, self.counter.robots = self.counter.robots, 0
            return self._send(200, json.dumps({"peak": peak, "requests": requests, "robots": robots}).encode())
        with self.counter.lock:   # robots.txt is counted apart: it is not a request for a row
            if name == "robots.txt":
                self.counter.robots += 1
            else:
                self.counter.requests += 1
        if self.tarpit:
            return self._drip()
        path = self.folder / name
        if "/" in name or not path.is_file():
            return self._send(404, b"not found")
        self._send(200, path.read_bytes())


    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(self.drip_bytes))
        self.end_headers()
        try:
            for _ in range(self.drip_bytes):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(DRIP_SECONDS)
        except (BrokenPipeError, ConnectionResetError):   # the client's deadline passed
            pass


def main(folder: Path, count: int, tarpits: int = 0, drip_bytes: int = DRIP_BYTES) -> None:
    servers = []
    for i in range(count):
        handler = type("Handler", (_Handler,), {"folder": folder, "counter": _Counter(),
                                                 "tarpit": i >= count - tarpits, "drip_bytes": drip_bytes})
        server = ThreadingHTTPServer((f"127.0.1.{1 + i}", 0), handler)
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for server in servers:
        print(f"http://{server.server_address[0]}:{server.server_address[1]}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), *(int(a) for a in sys.argv[3:5]))
