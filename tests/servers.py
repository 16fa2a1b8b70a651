"""A misbehaving HTTP server on a loopback address, for the fetch, politeness, hostile-input and fault tests.

Routes: /img/NAME serves a file; /noai/NAME adds `X-Robots-Tag: noai` (or the header given
by ?tag=); /slow/NAME waits `delay` seconds first; /redirect?to=URL answers 302;
/big?mb=N streams N MB of zeros in 1 MB chunks (never held in memory), with
Content-Length only when ?declare=1; /status/CODE always answers CODE; /once/CODE/NAME answers
CODE to the first request of that exact path and serves the file after (CODE `reset` resets
the connection instead); ?after=N adds `Retry-After: N` to those answers; /drip/NAME sends the
headers and then the file one byte every `drip` seconds (a tarpit). Every request is counted in
`hits` (with its time in `times`), and the requests being answered at once in `peak`, except
/robots.txt: those are counted in `robots` alone, and answer `robots` (a body, an HTTP status
code, or 404 when None; a list gives one answer per request, the last one repeated). Several
servers on 127.0.0.2, 127.0.0.3, ... act as separate hosts (`serve_hosts`). `tls` serves HTTPS
(tests/tls.py makes the certificate).

`serve_proxy` is a forward proxy on a loopback address: absolute-form GETs and CONNECT tunnels,
to loopback targets only (anything else is answered 403 and never contacted), each request
logged in `hits` as "GET http://..." or "CONNECT host:port".
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = b"\0" * (1 << 20)


@dataclass
class Served:
    base: str
    hits: list[str] = field(default_factory=list)
    times: list[tuple[float, str]] = field(default_factory=list)   # (time.monotonic(), path) per request
    open: int = 0
    peak: int = 0
    robots: list[str] = field(default_factory=list)   # robots.txt requests, by User-Agent
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    folder: Path
    delay: float
    drip: float
    robots: list
    served: Served

    def log_message(self, *args) -> None:
        pass

    _counted = False

    def _enter(self) -> None:
        """Counts the requests being answered at once: from arrival until the answer starts. The
        client's slot for a host spans that whole interval, and it cannot reuse the slot before it
        has the answer, so this count never overtakes a cap by lag (counting whole connections did:
        the server closes a socket after the client has moved on)."""
        with self.served.lock:
            self.served.open += 1
            self.served.peak = max(self.served.peak, self.served.open)
        self._counted = True

    def _leave(self) -> None:
        if self._counted:
            self._counted = False
            with self.served.lock:
                self.served.open -= 1

    def send_response(self, code, message=None) -> None:
        self._leave()
        super().send_response(code, message)

    def _answer(self, code: str, after: str | None) -> None:
        if code == "reset":   # RST instead of an answer: linger 0, then the server closes the socket
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.send_response(int(code))
        if after is not None:
            self.send_header("Retry-After", after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _file(self, name: str, headers: dict[str, str]) -> None:
        path = self.folder / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        for k, v in {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out first: as intended
            pass

    def _big(self, mb: int, declare: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if declare:
            self.send_header("Content-Length", str(mb * len(CHUNK)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(mb):
                self.wfile.write(CHUNK)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: as intended
            pass

    def _drip(self, name: str) -> None:
        body = (self.folder / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(self.drip)
        except (BrokenPipeError, ConnectionResetError):  # the client's deadline passed: as intended
            pass

    def _robots(self) -> None:
        with self.served.lock:
            self.served.robots.append(self.headers.get("User-Agent", ""))
            answer = self.robots[min(len(self.served.robots), len(self.robots)) - 1]
        if isinstance(answer, str):
            body = answer.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._answer(str(answer or 404), None)

    def do_GET(self) -> None:
        if self.path == "/robots.txt":
            return self._robots()
        self._enter()
        try:
            self._get()
        finally:
            self._leave()   # a reset sends no answer

    def _get(self) -> None:
        with self.served.lock:
            first = self.path not in self.served.hits
            self.served.hits.append(self.path)
            self.served.times.append((time.monotonic(), self.path))
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        route, _, name = parts.path.lstrip("/").partition("/")
        if route == "img":
            self._file(name, {})
        elif route == "noai":
            self._file(name, {"X-Robots-Tag": query.get("tag", "noai")})
        elif route == "slow":
            time.sleep(self.delay)
            self._file(name, {})
        elif route == "drip":
            self._drip(name)
        elif route == "redirect":
            self.send_response(302)
            self.send_header("Location", query["to"])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif route == "big":
            self._big(int(query.get("mb", "100")), query.get("declare") == "1")
        elif route == "status":
            self._answer(name, query.get("after"))
        elif route == "once":
            code, _, file = name.partition("/")
            if first:
                self._answer(code, query.get("after"))
            else:
                self._file(file, {})
        else:
            self.send_error(404)


@contextmanager
def serve(folder: Path, host: str = "127.0.0.1", delay: float = 0.0, drip: float = 0.5,
          robots: str | int | list | None = None, tls: ssl.SSLContext | None = None) -> Iterator[Served]:
    """Serve `folder` on host:<free port> for the block; only loopback hosts are accepted."""
    assert host.startswith("127."), "test servers stay on 127.0.0.0/8"
    served = Served("")
    answers = robots if isinstance(robots, list) else [robots]
    handler = type("Handler", (_Handler,), {"folder": folder, "delay": delay, "drip": drip, "robots": answers,
                                             "served": served})
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    served.base = f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serve_hosts(folder: Path, count: int, delay: float = 0.0, **kwargs) -> Iterator[list[Served]]:
    """`count` servers of `folder` on 127.0.0.2, 127.0.0.3, ...: separate hosts, each counting its own."""
    with ExitStack() as stack:
        yield [stack.enter_context(serve(folder, host=f"127.0.0.{2 + i}", delay=delay, **kwargs))
               for i in range(count)]


def _loopback(host: str) -> bool:
    return host.startswith("127.")


class _Proxy(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, *args) -> None:
        pass

    def _log(self, line: str) -> None:
        with self.served.lock:
            self.served.hits.append(line)
            self.served.times.append((time.monotonic(), line))

    def _refuse(self) -> None:
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._log(f"GET {self.path}")
        parts = urllib.parse.urlsplit(self.path)
        if parts.scheme != "http" or not _loopback(parts.hostname or ""):
            return self._refuse()
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=10) as upstream:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items() if k.lower() != "connection")
            upstream.sendall(f"GET {target or '/'} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
            self._pipe(upstream)
        self.close_connection = True

    def do_CONNECT(self) -> None:
        self._log(f"CONNECT {self.path}")
        host, _, port = self.path.rpartition(":")
        if not _loopback(host.strip("[]")):
            return self._refuse()
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10) as upstream:
            self.send_response(200, "Connection established")
            self.end_headers()
            self._tunnel(upstream)
        self.close_connection = True

    def _pipe(self, upstream: socket.socket) -> None:
        while chunk := upstream.recv(1 << 16):
            self.wfile.write(chunk)

    def _tunnel(self, upstream: socket.socket) -> None:
        ends = [self.connection, upstream]
        while True:
            readable, _, _ = select.select(ends, [], [], 10)
            if not readable:
                return
            for end in readable:
                data = end.recv(1 << 16)
                if not data:
                    return
                (upstream if end is self.connection else self.connection).sendall(data)


@contextmanager
def serve_proxy(host: str = "127.0.0.1") -> Iterator[Served]:
    """A logging forward proxy on host:<free port> (see the module docstring)."""
    assert host.startswith("127."), "test servers stay on 127.0.0.0/8"
    served = Served("")
    server = ThreadingHTTPServer((host, 0), type("Proxy", (_Proxy,), {"served": served}))
    server.daemon_threads = True
    served.base = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
