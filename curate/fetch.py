"""Fetching one URL safely: http(s) only, no private addresses, bounded size, opt-outs honoured.

Every connection (the first and each redirect's) takes its host's addresses from the task's
`Resolver`, which looked them up once under the fetch's timeout and checked every one, and
connects to one of them: the address checked is the address connected to. A fetch never
raises: its `Fetched` names the error kind (manifests/schema.py ERROR_KINDS) and, for a 429
or 503, the Retry-After the server asked for, so the caller can schedule a retry.
"""
from __future__ import annotations

import concurrent.futures
import email.utils
import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Iterable

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
USER_AGENT = "Mozilla/5.0 (compatible; curate-zh)"
# getaddrinfo has no timeout of its own: lookups run here so `download.timeout` bounds them too.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="curate-dns")
# HTTP statuses with a kind of their own; the others fall into http_4xx, http_5xx or http_other.
_NAMED_STATUSES = {403: "http_403", 404: "http_404", 410: "http_410", 429: "http_429", 503: "http_503"}


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


def address_blocked(address: str, allowed: Iterable[ipaddress._BaseNetwork] = ()) -> bool:
    """True when a resolved address must not be contacted (IPv4-mapped IPv6 is unwrapped)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == n.version and ip in n for n in allowed):
        return False
    return not ip.is_global or any(ip.version == n.version and ip in n for n in BLOCKED_NETWORKS)


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


def resolve_checked(host: str, port: int, allowed: Iterable[ipaddress._BaseNetwork] = (),
                    timeout: float | None = None) -> list[str]:
    """The host's addresses from one lookup (bounded by `timeout`), refused unless every one is allowed."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, proto=socket.IPPROTO_TCP)
    try:
        infos = future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise Refused(f"cannot resolve {host}: lookup timed out after {timeout} s", "dns_failed") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise Refused(f"cannot resolve {host}: {exc}", "dns_failed") from None
    allowed = tuple(allowed)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        if address_blocked(address, allowed):
            raise Refused(f"address not allowed: {host} resolves to {address}", "refused_address")
    return addresses


def check_url(url: str, allowed: Iterable[ipaddress._BaseNetwork] = ()) -> None:
    """Raise Refused unless the URL's scheme is allowed and every address of its host is public."""
    parts = _host(url)
    resolve_checked(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allowed)


class Resolver:
    """One task's DNS: each (host, port) is looked up and checked once, and the outcome (its checked
    addresses, or the refusal) reused for `ttl` seconds. Connections only ever go to addresses that
    this cache checked, so caching cannot let an unchecked address through; concurrent misses of one
    host share a single lookup."""

    def __init__(self, allowed: tuple, ttl: float, clock=time.monotonic):
        self.allowed = allowed
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], tuple[float, concurrent.futures.Future]] = {}

    def addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        key = (host.lower(), port)
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
                future.set_result(resolve_checked(host, port, self.allowed, timeout))
            except Refused as exc:
                future.set_exception(exc)
        return future.result()


def _connect_checked(host: str, port: int, timeout: float | None, resolver: Resolver) -> socket.socket:
    """A socket to an address of `host` that the resolver checked: no lookup happens between the
    check and the connection, so DNS rebinding cannot slip past the guard."""
    error: OSError | None = None
    limit = timeout if isinstance(timeout, (int, float)) else None   # not http.client's "default" sentinel
    for address in resolver.addresses(host, port, limit):
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            error = exc
    raise error or OSError(f"cannot connect to {host}")


class _Resolving:
    """Carries the task's resolver into a connection or handler class from the standard library."""

    def __init__(self, *args, resolver: Resolver, **kwargs):
        super().__init__(*args, **kwargs)
        self.resolver = resolver


class _PinnedHTTP(_Resolving, http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = _connect_checked(self.host, self.port, self.timeout, self.resolver)


class _PinnedHTTPS(_Resolving, http.client.HTTPSConnection):
    def connect(self) -> None:   # TLS still verifies the certificate against the host name
        sock = _connect_checked(self.host, self.port, self.timeout, self.resolver)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPHandler(_Resolving, urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PinnedHTTP, req, resolver=self.resolver)


class _PinnedHTTPSHandler(_Resolving, urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PinnedHTTPS, req, context=self._context, resolver=self.resolver)


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects keep to http(s); their addresses are checked when their connection opens."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _host(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True)
class Fetched:
    """One request's outcome: the body, or the error with its kind (and a Retry-After in seconds)."""
    body: bytes | None = None
    error: str | None = None
    kind: str | None = None
    retry_after: float | None = None


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
    if isinstance(exc, urllib.error.HTTPError):
        wait = retry_after(exc.headers.get("Retry-After")) if exc.code in (429, 503) and exc.headers else None
        return Fetched(error=f"HTTP {exc.code}: {exc.reason}", kind=http_kind(exc.code), retry_after=wait)
    if isinstance(exc, Refused):
        return Fetched(error=str(exc), kind=exc.kind)
    cause = exc.reason if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException) else exc
    if isinstance(cause, Refused):
        return Fetched(error=str(cause), kind=cause.kind)
    if isinstance(cause, (TimeoutError, socket.timeout)):
        kind = "timeout"
    elif isinstance(cause, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.IncompleteRead,
                            http.client.BadStatusLine)):
        kind = "connection_reset"
    elif isinstance(cause, OSError):
        kind = "connection_failed"
    else:
        kind = "error"
    return Fetched(error=str(exc) or type(exc).__name__, kind=kind)


class Fetcher:
    """Fetches URLs behind our guards; one per download task, sharing its DNS cache across threads."""

    def __init__(self, allowed_networks: Iterable[str], max_bytes: int, dns_ttl: float = 300.0):
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.max_bytes = max_bytes
        self.resolver = Resolver(self.allowed, dns_ttl)
        self.opener = urllib.request.build_opener(_PinnedHTTPHandler(resolver=self.resolver),
                                                  _PinnedHTTPSHandler(resolver=self.resolver), _GuardedRedirects())

    def __call__(self, url: str, timeout: float, user_agent_token: str | None = None,
                 disallowed_header_directives: Iterable[str] = ()) -> Fetched:
        agent = USER_AGENT if not user_agent_token else f"{USER_AGENT} ({user_agent_token})"
        directives = {d.strip().lower() for d in disallowed_header_directives}
        token = user_agent_token.strip().lower() if user_agent_token else None
        too_large = Fetched(error=f"response larger than {self.max_bytes} bytes", kind="too_large")
        try:
            _host(url)   # addresses are checked by the resolver, in the connection itself
            request = urllib.request.Request(url, headers={"User-Agent": agent})
            with self.opener.open(request, timeout=timeout) as resp:
                if directives and opted_out(resp.headers, token, directives):
                    return Fetched(error="opted out by X-Robots-Tag", kind="opted_out")
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    return too_large
                body = resp.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    return too_large
            return Fetched(body=body)
        except Exception as exc:  # every failure is a row's error and kind, never a crash
            return failure(exc)
