"""Fetching one URL safely: http(s) only, no private addresses, one deadline, bounded memory, opt-outs honoured.

The client is our own, a few calls on `http.client.HTTPResponse` over sockets it opens itself,
so nothing the standard library reads from the environment applies: `http_proxy`,
`https_proxy`, `ALL_PROXY` and `no_proxy` are never consulted. A proxy is used only when
the config names one (`download.proxy`).

The address guard: every connection (the first and each redirect's) takes its host's addresses
from the task's `Resolver`, which looked them up once, checked every one (IPv4 embedded in
IPv6 unwrapped first), and connects to one of them: the address checked is the address
connected to. Through a proxy the target is checked the same way before the request; HTTPS
goes through a CONNECT tunnel to the checked address (TLS still verifies the host name), and
plain HTTP sends the name to the proxy, which resolves it again (docs/politeness.md). The
proxy's own address is allowed by `download.proxy` alone.

One `Deadline` per fetch bounds every connect, TLS handshake, header and body byte of it and
of its redirects: each socket operation gets the time that is left, so a server dripping a
byte at a time fails as `timeout` at the deadline. Bodies stream in chunks into a `Body` that
holds them in memory while the task's `Budget` allows and in a temporary file past it.

A fetch never raises: its `Fetched` names the error kind (manifests/schema.py ERROR_KINDS)
and, for a 429 or 503, the Retry-After the server asked for, so the caller can schedule a retry.
"""
from __future__ import annotations

import concurrent.futures
import email.utils
import http.client
import ipaddress
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import IO, Iterable

from curate.config import proxy_address


def opted_out(headers, token: str | None, directives) -> bool:
    """An X-Robots-Tag opt-out: each header value is `[agent:] directive, ...`, and applies when it
    names no agent or ours (`token`, lower case). Ours rather than img2dataset's, whose import pulls
    in torch and costs seconds in every process that downloads."""
    for value in headers.get_all("X-Robots-Tag") or []:
        agent, sep, rest = value.partition(":")
        named = agent.strip().lower() if sep else None
        found = {d.strip().lower() for d in (rest if sep else value).split(",")}
        if (named is None or named == token) and not found.isdisjoint(directives):
            return True
    return False


ALLOWED_SCHEMES = ("http", "https")
# Never fetched unless the config allows them: private, loopback, link-local (cloud
# metadata at 169.254.169.254), carrier-grade NAT, multicast and reserved ranges.
BLOCKED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
))
# IPv6 prefixes that carry an IPv4 address a gateway forwards to: NAT64 (RFC 6052, RFC 8215) and
# 6to4 (RFC 3056); Teredo (RFC 4380) is read by ipaddress itself. Both addresses must pass.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
USER_AGENT = "Mozilla/5.0 (compatible; curate-zh)"
MAX_REDIRECTS = 10
CHUNK = 1 << 16                      # bytes read from a socket at a time
_REDIRECTS = (301, 302, 303, 307, 308)
# HTTP statuses with a kind of their own; the others fall into http_4xx, http_5xx or http_other.
_NAMED_STATUSES = {403: "http_403", 404: "http_404", 410: "http_410", 429: "http_429", 503: "http_503"}
# getaddrinfo errors that mean the name does not exist (or has no address): final. Others are transient.
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}
# Request-target characters sent as they are; others (spaces, controls, non-ASCII) are percent-encoded.
_SAFE_TARGET = "".join(chr(c) for c in range(0x21, 0x7F))


class Refused(Exception):
    """The URL, or where it redirects, is not fetched; the message says why, `kind` names it."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def scheme_error(url: str | None) -> str | None:
    """Why a URL is not fetched at all (scheme), or None when it may be."""
    if not url:
        return "empty URL"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"URL scheme not allowed: {scheme or '(none)'}"
    return None


def host_of(url: str) -> str | None:
    """The host name a URL is fetched from (lower case), None when it has none or is not fetched."""
    if scheme_error(url):
        return None
    try:
        return urllib.parse.urlsplit(url).hostname or None
    except ValueError:
        return None


# -- the address guard ------------------------------------------------------------------------------

def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address | None, bool]:
    """The IPv4 address an IPv6 address carries, and whether the IPv6 form is only a way of writing
    it (mapped ::ffff:a.b.c.d, translated ::ffff:0:a.b.c.d, compatible ::a.b.c.d) rather than an
    address of its own that a gateway forwards (NAT64, 6to4, Teredo)."""
    n = int(ip)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped, True
    if n >> 32 == 0 or n >> 32 == 0xFFFF0000:
        return ipaddress.IPv4Address(n & 0xFFFFFFFF), True
    if ip in _NAT64:
        return ipaddress.IPv4Address(n & 0xFFFFFFFF), False
    if ip in _NAT64_LOCAL:   # /48 prefix: the IPv4 bits straddle the reserved u octet (bits 64-71)
        b = ip.packed
        return ipaddress.IPv4Address(b[6:8] + b[9:11]), False
    if ip.sixtofour is not None:
        return ip.sixtofour, False
    if ip.teredo is not None:
        return ip.teredo[1], False   # the client; the server half is a public relay
    return None, False


def _blocked(ip, allowed: tuple) -> bool:
    if any(ip.version == n.version and ip in n for n in allowed):
        return False
    return not ip.is_global or any(ip.version == n.version and ip in n for n in BLOCKED_NETWORKS)


def address_blocked(address: str, allowed: Iterable[ipaddress._BaseNetwork] = ()) -> bool:
    """True when a resolved address must not be contacted. An IPv4 address written in IPv6 is checked
    as itself. One a gateway forwards to (NAT64, 6to4, Teredo) must be public whatever the allow list
    says (it names hosts reached directly, not the gateway's neighbours), and the IPv6 form must pass too."""
    allowed = tuple(allowed)
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        inner, notation = embedded_ipv4(ip)
        if inner is not None and notation:
            return _blocked(inner, allowed)
        if inner is not None:
            return _blocked(inner, ()) or _blocked(ip, allowed)
    return _blocked(ip, allowed)


def _host(url: str) -> urllib.parse.SplitResult:
    err = scheme_error(url)
    if err:
        raise Refused(err, "bad_url")
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = parts.hostname, parts.port   # .port raises on a bad port: a bad URL, not a crash
    except ValueError as exc:
        raise Refused(f"bad URL: {exc}", "bad_url") from None
    if not host:
        raise Refused("URL has no host", "bad_url")
    return parts


def _ascii_host(host: str) -> str:
    try:
        return host if host.isascii() else host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise Refused(f"bad host name {host!r}: {exc}", "bad_url") from None


def resolve_checked(host: str, port: int, allowed: Iterable[ipaddress._BaseNetwork] = ()) -> list[str]:
    """The host's addresses from one lookup (no time limit: for checks outside a fetch), refused
    unless every one is allowed."""
    try:
        infos = socket.getaddrinfo(_ascii_host(host), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Refused(f"cannot resolve {host}: {exc}", "dns_failed") from None
    return _checked(host, infos, tuple(allowed))


def _checked(host: str, infos: list, allowed: tuple) -> list[str]:
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        if address_blocked(address, allowed):
            raise Refused(f"address not allowed: {host} resolves to {address}", "refused_address")
    return addresses


def check_url(url: str, allowed: Iterable[ipaddress._BaseNetwork] = ()) -> None:
    """Raise Refused unless the URL's scheme is allowed and every address of its host is public."""
    parts = _host(url)
    resolve_checked(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allowed)


# -- time: one deadline per fetch -------------------------------------------------------------------

class Deadline:
    """When a fetch must be over. `left()` is what the next socket operation may take, and raises
    TimeoutError once nothing is left."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self.seconds:g} s")
        return left

    def extend(self, seconds: float) -> None:
        self.at += seconds


class _DeadlineSocket(socket.socket):
    """A TCP socket whose every send and receive gets the time left on its fetch's deadline."""
    deadline: Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.left())

    def recv_into(self, *args, **kwargs):
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._arm()
        return super().send(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self._arm()
        return super().sendall(*args, **kwargs)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The same for TLS (set as the context's sslsocket_class); the handshake is bounded by one
    timeout as a whole, set from the deadline just before it."""
    deadline: Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.left())

    def recv_into(self, *args, **kwargs):
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._arm()
        return super().send(*args, **kwargs)


def tls_context(context: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """A verifying TLS context whose sockets keep to their fetch's deadline."""
    context = context or ssl.create_default_context()
    context.sslsocket_class = _DeadlineSSLSocket
    return context


# -- DNS --------------------------------------------------------------------------------------------

class Resolver:
    """One task's DNS: each (host, port) is looked up and checked once, and the outcome (its checked
    addresses, or a refusal) reused for `ttl` seconds. Connections only ever go to addresses that
    this cache checked, so caching cannot let an unchecked address through; concurrent misses of one
    host share a single lookup.

    getaddrinfo has no timeout of its own, so lookups run on this resolver's threads, `threads` of
    them (the task sizes it above its fetch threads: a lookup that timed out keeps its thread until
    the system resolver gives up, and the others must still find one free). A lookup's limit starts
    when a thread starts it, never while it waits for one. A lookup that timed out or failed
    temporarily is not cached: the next fetch of that host looks it up again (`dns_timeout`, retried
    like other transient failures); only a name that does not exist is `dns_failed`, and cached.
    """

    def __init__(self, allowed: tuple, ttl: float, threads: int = 8, clock=time.monotonic):
        self.allowed = allowed
        self.ttl = ttl
        self.clock = clock
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="curate-dns")
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int, bool], tuple[float, concurrent.futures.Future]] = {}

    def addresses(self, host: str, port: int, deadline: Deadline | None, check: bool = True) -> list[str]:
        """The checked addresses of host:port (`check` False: unchecked, for the configured proxy only)."""
        key = (host.lower(), port, check)
        with self._lock:
            entry = self._entries.get(key)
            mine = entry is None or entry[0] <= self.clock()
            if mine:
                future: concurrent.futures.Future = concurrent.futures.Future()
                self._entries[key] = (self.clock() + self.ttl, future)
            else:
                future = entry[1]
        if mine:
            try:
                infos = self._lookup(host, port, deadline)
                future.set_result(_checked(host, infos, self.allowed) if check else
                                  list(dict.fromkeys(info[4][0] for info in infos)))
            except Refused as exc:
                if exc.kind != "dns_failed" and exc.kind != "refused_address":   # transient: not kept
                    with self._lock:
                        if self._entries.get(key, (0, None))[1] is future:
                            del self._entries[key]
                future.set_exception(exc)
        return future.result()

    def _lookup(self, host: str, port: int, deadline: Deadline | None) -> list:
        started = threading.Event()

        def lookup() -> list:
            started.set()
            return socket.getaddrinfo(_ascii_host(host), port, type=socket.SOCK_STREAM)

        queued = time.monotonic()
        job = self.pool.submit(lookup)
        started.wait()
        if deadline is not None:
            deadline.extend(time.monotonic() - queued)   # waiting for a thread is not the lookup's time
        limit = None if deadline is None else max(deadline.at - time.monotonic(), 0.0)
        try:
            return job.result(limit)
        except concurrent.futures.TimeoutError:
            raise Refused(f"cannot resolve {host}: lookup timed out after {limit:.3g} s", "dns_timeout") from None
        except socket.gaierror as exc:
            kind = "dns_failed" if exc.errno in _NO_SUCH_NAME else "dns_timeout"
            raise Refused(f"cannot resolve {host}: {exc}", kind) from None

    def close(self) -> None:
        """Let go of the lookup threads; one still waiting on the system resolver ends on its own."""
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- memory: bodies in a bounded buffer -------------------------------------------------------------

class Budget:
    """The bytes of response bodies one task holds in memory at once (download.memory_mb, less
    the decode reserve); a body that would pass it goes to a temporary file in `spill_dir`."""

    def __init__(self, limit: float, spill_dir: str | None = None):
        self.limit = limit
        self.spill_dir = spill_dir
        self.used = 0
        self.peak = 0
        self.spilled = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


UNBOUNDED = Budget(float("inf"))


class Body:
    """One response body as it streams in: chunks in memory while the budget allows, then a file."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.size = 0
        self._chunks: list[bytes] = []
        self._held = 0
        self._file: IO[bytes] | None = None

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is None and self.budget.take(len(chunk)):
            self._chunks.append(chunk)
            self._held += len(chunk)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.budget.spill_dir)
            self.budget.spilled += 1
            for c in self._chunks:
                self._file.write(c)
            self._release()
        self._file.write(chunk)

    def truncate(self, size: int) -> None:
        """Keep the first `size` bytes (a robots.txt past its cap)."""
        data = self.read()[:size]
        self.close()
        self.size = 0
        self.write(data)

    def read(self) -> bytes:
        """The whole body (one copy, made by the one thread that decodes it)."""
        if self._file is None:
            return b"".join(self._chunks)
        self._file.seek(0)
        return self._file.read()

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def _release(self) -> None:
        self.budget.give(self._held)
        self._chunks, self._held = [], 0

    def close(self) -> None:
        self._release()
        if self._file is not None:
            self._file.close()
            self._file = None


# -- outcomes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fetched:
    """One request's outcome: the body, or the error with its kind (and a Retry-After in seconds)."""
    body: Body | None = None
    error: str | None = None
    kind: str | None = None
    retry_after: float | None = None
    status: int | None = None


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def http_kind(code: int) -> str:
    if code in _NAMED_STATUSES:
        return _NAMED_STATUSES[code]
    return "http_5xx" if 500 <= code < 600 else "http_4xx" if 400 <= code < 500 else "http_other"


def failure(exc: BaseException) -> Fetched:
    """The kind of a failed request, from the exception itself (never from its message)."""
    if isinstance(exc, Refused):
        return Fetched(error=str(exc), kind=exc.kind)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        kind = "timeout"
    elif isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.IncompleteRead,
                          http.client.BadStatusLine)):
        kind = "connection_reset"
    elif isinstance(exc, OSError):
        kind = "connection_failed"
    else:
        kind = "error"
    return Fetched(error=str(exc) or type(exc).__name__, kind=kind)


def _status(resp: http.client.HTTPResponse) -> Fetched:
    code = resp.status
    wait = retry_after(resp.getheader("Retry-After")) if code in (429, 503) else None
    return Fetched(error=f"HTTP {code}: {resp.reason}", kind=http_kind(code), retry_after=wait, status=code)


def _authority(host: str, port: int, scheme: str) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


def _target(parts: urllib.parse.SplitResult) -> str:
    path = urllib.parse.quote(parts.path or "/", safe=_SAFE_TARGET)
    query = urllib.parse.quote(parts.query, safe=_SAFE_TARGET)
    return f"{path}?{query}" if query else path


class Fetcher:
    """Fetches URLs behind our guards; one per download task, sharing its DNS cache across threads.

    `proxy` is download.proxy (None: direct). `tls` replaces the system's trust store (tests).
    """

    def __init__(self, allowed_networks: Iterable[str], max_bytes: int, dns_ttl: float = 300.0, *,
                 proxy: str | None = None, lookup_threads: int = 8, tls: ssl.SSLContext | None = None,
                 budget: Budget = UNBOUNDED):
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.max_bytes = max_bytes
        self.resolver = Resolver(self.allowed, dns_ttl, lookup_threads)
        self.proxy = proxy_address(proxy) if proxy else None
        self.tls = tls_context(tls)
        self.budget = budget

    def __call__(self, url: str, timeout: float, user_agent_token: str | None = None,
                 disallowed_header_directives: Iterable[str] = (), *, limit: int | None = None,
                 truncate: bool = False) -> Fetched:
        """GET `url` within one deadline of `timeout` seconds. A body over `limit` (default max_bytes)
        is too_large, or with `truncate` cut to it."""
        agent = USER_AGENT if not user_agent_token else f"{USER_AGENT} ({user_agent_token})"
        directives = {d.strip().lower() for d in disallowed_header_directives}
        token = user_agent_token.strip().lower() if user_agent_token else None
        limit = self.max_bytes if limit is None else limit
        deadline = Deadline(timeout)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                parts = _host(url)
                sock, resp = self._request(parts, agent, deadline)
                try:
                    location = resp.getheader("Location")
                    if resp.status in _REDIRECTS and location:
                        url = urllib.parse.urljoin(url, location.strip())
                        continue
                    if not 200 <= resp.status < 300:
                        return _status(resp)
                    if directives and opted_out(resp.headers, token, directives):
                        return Fetched(error="opted out by X-Robots-Tag", kind="opted_out", status=resp.status)
                    return self._body(resp, limit, truncate)
                finally:
                    resp.close()
                    sock.close()
            return Fetched(error=f"more than {MAX_REDIRECTS} redirects", kind="http_other")
        except Exception as exc:  # every failure is a row's error and kind, never a crash
            return failure(exc)

    def close(self) -> None:
        self.resolver.close()

    def _body(self, resp: http.client.HTTPResponse, limit: int, truncate: bool) -> Fetched:
        too_large = Fetched(error=f"response larger than {limit} bytes", kind="too_large", status=resp.status)
        declared = resp.getheader("Content-Length")
        if not truncate and declared and declared.isdigit() and int(declared) > limit:
            return too_large
        body = Body(self.budget)
        try:
            while body.size <= limit:
                chunk = resp.read(min(CHUNK, limit + 1 - body.size))
                if not chunk:
                    break
                body.write(chunk)
        except BaseException:
            body.close()
            raise
        if body.size > limit:
            if not truncate:
                body.close()
                return too_large
            body.truncate(limit)
        return Fetched(body=body, status=resp.status)

    # -- connections ------------------------------------------------------------------------------

    def _request(self, parts: urllib.parse.SplitResult, agent: str,
                 deadline: Deadline) -> tuple[socket.socket, http.client.HTTPResponse]:
        """Open the connection for one hop (direct, tunnelled or through the proxy), send the GET,
        read the status and headers."""
        host = _ascii_host(parts.hostname)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = _target(parts)
        if self.proxy is None:
            sock = self._connect_checked(host, port, deadline)
        elif parts.scheme == "https":
            sock = self._tunnel(host, port, agent, deadline)
        else:   # the proxy gets the name; its addresses were checked first
            self.resolver.addresses(host, port, deadline)
            sock = self._connect_proxy(deadline)
            target = f"http://{_authority(host, port, 'http')}{target}"
        if parts.scheme == "https":
            sock = self._tls(sock, host, deadline)
        try:
            head = (f"GET {target} HTTP/1.1\r\nHost: {_authority(host, port, parts.scheme)}\r\n"
                    f"User-Agent: {agent}\r\nAccept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n")
            sock.sendall(head.encode("ascii"))
            resp = http.client.HTTPResponse(sock, method="GET")
            resp.begin()
        except BaseException:
            sock.close()
            raise
        return sock, resp

    def _open(self, address: str, port: int, deadline: Deadline) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.left())
            sock.connect((address, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        sock.deadline = deadline
        return sock

    def _connect_checked(self, host: str, port: int, deadline: Deadline) -> socket.socket:
        """A socket to an address of `host` that the resolver checked: no lookup happens between the
        check and the connection, so DNS rebinding cannot slip past the guard."""
        error: OSError | None = None
        for address in self.resolver.addresses(host, port, deadline):
            try:
                return self._open(address, port, deadline)
            except TimeoutError:
                raise
            except OSError as exc:
                error = exc
        raise error or OSError(f"cannot connect to {host}")

    def _connect_proxy(self, deadline: Deadline) -> socket.socket:
        host, port = self.proxy
        error: OSError | None = None
        for address in self.resolver.addresses(host, port, deadline, check=False):
            try:
                return self._open(address, port, deadline)
            except TimeoutError:
                raise
            except OSError as exc:
                error = exc
        raise error or OSError(f"cannot connect to the proxy {host}")

    def _tunnel(self, host: str, port: int, agent: str, deadline: Deadline) -> socket.socket:
        """A CONNECT tunnel through the proxy to a checked address of `host` (the address, not the name,
        so the proxy cannot resolve it to another)."""
        error: Exception | None = None
        for address in self.resolver.addresses(host, port, deadline):
            authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            sock = self._connect_proxy(deadline)
            try:
                sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {agent}\r\n\r\n"
                             .encode("ascii"))
                resp = http.client.HTTPResponse(sock, method="CONNECT")
                resp.begin()
                resp.close()   # closes its file only; the tunnel is the socket
                if resp.status == 200:
                    return sock
                error = ConnectionRefusedError(f"the proxy refused CONNECT {authority}: HTTP {resp.status} {resp.reason}")
            except BaseException:
                sock.close()
                raise
            sock.close()
        raise error or OSError(f"cannot tunnel to {host}")

    def _tls(self, sock: socket.socket, host: str, deadline: Deadline) -> ssl.SSLSocket:
        """TLS over `sock`, verifying the certificate against the host name; the handshake gets what
        is left of the deadline."""
        sock.deadline = None
        tls = self.tls.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        try:
            tls.settimeout(deadline.left())
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        tls.deadline = deadline
        return tls
