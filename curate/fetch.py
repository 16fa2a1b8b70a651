"""Fetching one URL safely: http(s) only, no private addresses, bounded size, opt-outs honoured.

img2dataset's own fetcher follows redirects anywhere and reads whole responses into memory;
`fetch` keeps its signature and result shape so the download phase can use it in its place.
Every connection (the first and each redirect's) resolves its host once, under the fetch's
timeout, checks those addresses and connects to one of them: the address checked is the
address connected to.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import ipaddress
import socket
import urllib.parse
import urllib.request
from typing import Iterable

from img2dataset.downloader import is_disallowed

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


class Refused(Exception):
    """The URL, or where it redirects, is not allowed; the message says why."""


def scheme_error(url: str | None) -> str | None:
    """Why a URL is not fetched at all (scheme), or None when it may be."""
    if not url:
        return "empty URL"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"URL scheme not allowed: {scheme or '(none)'}"
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
        raise Refused(err)
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        raise Refused("URL has no host")
    return parts


def resolve_checked(host: str, port: int, allowed: Iterable[ipaddress._BaseNetwork] = (),
                    timeout: float | None = None) -> list[str]:
    """The host's addresses from one lookup (bounded by `timeout`), refused unless every one is allowed."""
    future = _RESOLVER.submit(socket.getaddrinfo, host, port, proto=socket.IPPROTO_TCP)
    try:
        infos = future.result(timeout)
    except concurrent.futures.TimeoutError:
        raise Refused(f"cannot resolve {host}: lookup timed out after {timeout} s") from None
    except socket.gaierror as exc:
        raise Refused(f"cannot resolve {host}: {exc}") from None
    allowed = tuple(allowed)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        if address_blocked(address, allowed):
            raise Refused(f"address not allowed: {host} resolves to {address}")
    return addresses


def check_url(url: str, allowed: Iterable[ipaddress._BaseNetwork] = ()) -> None:
    """Raise Refused unless the URL's scheme is allowed and every address of its host is public."""
    parts = _host(url)
    resolve_checked(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allowed)


def _connect_checked(host: str, port: int, timeout: float | None, allowed: tuple) -> socket.socket:
    """A socket to an address of `host` that was checked in this very lookup: no second lookup
    happens between the check and the connection, so DNS rebinding cannot slip past the guard."""
    error: OSError | None = None
    limit = timeout if isinstance(timeout, (int, float)) else None   # not http.client's "default" sentinel
    for address in resolve_checked(host, port, allowed, limit):
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as exc:
            error = exc
    raise error or OSError(f"cannot connect to {host}")


class _Allowed:
    """Carries the allowed networks into a connection or handler class from the standard library."""

    def __init__(self, *args, allowed: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.allowed = allowed


class _PinnedHTTP(_Allowed, http.client.HTTPConnection):
    def connect(self) -> None:
        self.sock = _connect_checked(self.host, self.port, self.timeout, self.allowed)


class _PinnedHTTPS(_Allowed, http.client.HTTPSConnection):
    def connect(self) -> None:   # TLS still verifies the certificate against the host name
        sock = _connect_checked(self.host, self.port, self.timeout, self.allowed)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPHandler(_Allowed, urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_PinnedHTTP, req, allowed=self.allowed)


class _PinnedHTTPSHandler(_Allowed, urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_PinnedHTTPS, req, context=self._context, allowed=self.allowed)


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects keep to http(s); their addresses are checked when their connection opens."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _host(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Fetcher:
    """A callable with img2dataset's `download_image` signature that applies our guards."""

    def __init__(self, allowed_networks: Iterable[str], max_bytes: int):
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)
        self.max_bytes = max_bytes
        self.opener = urllib.request.build_opener(_PinnedHTTPHandler(allowed=self.allowed),
                                                  _PinnedHTTPSHandler(allowed=self.allowed), _GuardedRedirects())

    def __call__(self, row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        agent = USER_AGENT if not user_agent_token else f"{USER_AGENT} ({user_agent_token})"
        try:
            _host(url)   # addresses are checked in the connection itself, on its one lookup
            request = urllib.request.Request(url, headers={"User-Agent": agent})
            with self.opener.open(request, timeout=timeout) as resp:
                if disallowed_header_directives and is_disallowed(
                        resp.headers, user_agent_token, disallowed_header_directives):
                    return key, None, "opted out by X-Robots-Tag"
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    return key, None, f"response larger than {self.max_bytes} bytes"
                body = resp.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    return key, None, f"response larger than {self.max_bytes} bytes"
            return key, io.BytesIO(body), None
        except Exception as exc:  # every failure is a row's error message, never a crash
            return key, None, str(exc) or type(exc).__name__
