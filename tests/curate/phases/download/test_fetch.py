"""The fetch guard: schemes, private addresses (decided without connecting), redirects, size cap, opt-outs,
the per-task DNS cache, and the error kind of each failure.

Nothing here sends traffic beyond 127.0.0.0/8: the address guard is checked on literal
addresses, and the end-to-end cases fetch from test servers on loopback addresses.
"""
from __future__ import annotations

import ipaddress
import tracemalloc
import urllib.parse
from pathlib import Path

import pytest

from curate.phases.download.fetch import Fetcher, Refused, address_blocked, check_url, scheme_error
from tests.servers import serve

BLOCKED = ["10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1", "169.254.169.254", "100.64.0.1",
           "100.127.255.254", "127.0.0.1", "127.0.0.2", "0.0.0.0", "224.0.0.1", "::1", "::", "fc00::1",
           "fd12:3456::1", "fe80::1", "fe80::1%eth0", "::ffff:10.0.0.1", "::ffff:127.0.0.1",
           "::ffff:169.254.169.254"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8"]
MB = 1_000_000


@pytest.mark.parametrize("address", BLOCKED)
def test_private_loopback_metadata_and_local_ranges_are_blocked(address):
    assert address_blocked(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert not address_blocked(address)


def test_allow_list_opens_exactly_the_named_networks():
    only_one = [ipaddress.ip_network("127.0.0.1/32")]
    assert not address_blocked("127.0.0.1", only_one)
    assert not address_blocked("::ffff:127.0.0.1", only_one)  # the mapped form is the same host
    assert address_blocked("127.0.0.2", only_one)
    assert address_blocked("10.0.0.1", only_one)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.jpg", "data:image/png;base64,iVBORw0KGgo=",
                                 "gopher://127.0.0.1/", "javascript:alert(1)", "//127.0.0.1/a.jpg", "", None])
def test_only_http_and_https_are_fetched(url):
    assert scheme_error(url)
    with pytest.raises(Refused):
        check_url(url or "")


@pytest.mark.parametrize("url", ["http://10.0.0.1/a.jpg", "https://169.254.169.254/latest/meta-data/",
                                 "http://[::ffff:10.0.0.1]/a.jpg", "http://[fd00::1]:8080/", "http://100.64.1.1/",
                                 "http://2130706433/", "http://0x7f.1/", "http://localhost/", "http://[::1]/"])
def test_check_url_refuses_private_targets_by_resolved_address(url):
    # Literal and numeric hosts resolve without a lookup; localhost comes from the hosts file.
    with pytest.raises(Refused, match="address not allowed"):
        check_url(url)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fetch")
    (folder / "a.jpg").write_bytes(b"\xff\xd8 not decoded here \xff\xd9")
    return folder


def _fetch(fetcher: Fetcher, url: str, token: str | None = None, directives=("noai", "noimageai")):
    got = fetcher(url, 5, token, directives)
    assert (got.error is None) == (got.kind is None)
    return (None if got.body is None else got.body.read()), got.error


def test_loopback_is_refused_while_the_switch_is_off(images):
    with serve(images) as srv:
        body, error = _fetch(Fetcher([], 20 * MB), f"{srv.base}/img/a.jpg")
        assert body is None and "address not allowed" in error
        assert srv.hits == []  # refused before connecting
        body, error = _fetch(Fetcher(["127.0.0.1/32"], 20 * MB), f"{srv.base}/img/a.jpg")
        assert error is None and body == (images / "a.jpg").read_bytes()


def test_redirect_to_a_loopback_address_not_allowed_is_refused(images):
    with serve(images) as front, serve(images, host="127.0.0.2") as other:
        fetcher = Fetcher(["127.0.0.1/32"], 20 * MB)
        body, error = _fetch(fetcher, f"{front.base}/redirect?to={other.base}/img/a.jpg")
        assert body is None and "127.0.0.2" in error
        assert other.hits == []
        body, error = _fetch(fetcher, f"{front.base}/redirect?to=file:///etc/passwd")
        assert body is None and "not allowed" in error
        body, error = _fetch(fetcher, f"{front.base}/redirect?to={front.base}/img/a.jpg")
        assert error is None and body  # a redirect within the allowed network is followed


@pytest.mark.parametrize("tag,token,opted_out", [
    ("noai", None, True), ("noimageai, nofollow", None, True), ("curatebot: noai", "curatebot", True),
    ("otherbot: noai", "curatebot", False), ("nofollow", None, False)])
def test_x_robots_tag_opt_outs_are_honoured(images, tag, token, opted_out):
    with serve(images) as srv:
        body, error = _fetch(Fetcher(["127.0.0.1/32"], 20 * MB),
                             f"{srv.base}/noai/a.jpg?tag={urllib.parse.quote(tag)}", token)
    assert (error == "opted out by X-Robots-Tag") == opted_out
    assert (body is None) == opted_out


@pytest.mark.parametrize("declare", ["1", "0"])
def test_a_100_mb_response_is_refused_within_the_cap(images, declare):
    tracemalloc.start()
    try:
        with serve(images) as srv:
            body, error = _fetch(Fetcher(["127.0.0.1/32"], 20 * MB), f"{srv.base}/big?mb=100&declare={declare}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert body is None and error == f"response larger than {20 * MB} bytes"
    assert peak < 30 * MB  # at most the cap plus one byte was read; the other 80 MB never arrived


def test_the_address_checked_is_the_address_connected_to(images, monkeypatch):
    """DNS rebinding: a name that answers an allowed address to the check and another to a second
    lookup. There is only one lookup per connection, and the connection goes where it pointed
    (the second answer is a loopback address nothing listens on, so a regression fails without
    sending traffic anywhere else)."""
    import socket

    real = socket.getaddrinfo
    lookups = []

    def rebinding(host, port, *args, **kwargs):
        if host != "images.test":   # literal addresses (the connection's own) resolve as ever
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real("127.0.0.1" if len(lookups) == 1 else "127.0.0.3", port, *args, **kwargs)

    with serve(images) as srv:
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        port = urllib.parse.urlsplit(srv.base).port
        body, error = _fetch(Fetcher(["127.0.0.1/32"], 20 * MB), f"http://images.test:{port}/img/a.jpg")
    assert error is None and body == (images / "a.jpg").read_bytes()
    assert lookups == ["images.test"]
    assert len(srv.hits) == 1


def test_a_hanging_lookup_is_bounded_by_the_timeout(monkeypatch):
    import socket
    import time

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3) or [])
    started = time.time()
    got = Fetcher([], 20 * MB)("http://slow-dns.test/a.jpg", 0.5)
    assert got.body is None and "lookup timed out" in got.error and got.kind == "dns_timeout"
    assert time.time() - started < 2


def _counting_lookups(monkeypatch, answers: list[str]) -> list[str]:
    """getaddrinfo for `images.test` answers the next of `answers` each time; returns the lookups made."""
    import socket

    real = socket.getaddrinfo
    lookups: list[str] = []

    def lookup(host, port, *args, **kwargs):
        if host != "images.test":
            return real(host, port, *args, **kwargs)
        lookups.append(host)
        return real(answers[min(len(lookups), len(answers)) - 1], port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return lookups


def test_each_host_is_resolved_once_per_task_within_the_ttl(images, monkeypatch):
    with serve(images) as srv:
        port = urllib.parse.urlsplit(srv.base).port
        lookups = _counting_lookups(monkeypatch, ["127.0.0.1"])
        cached = Fetcher(["127.0.0.1/32"], 20 * MB, dns_ttl=300)
        for _ in range(3):
            assert _fetch(cached, f"http://images.test:{port}/img/a.jpg")[1] is None
        assert len(lookups) == 1 and len(srv.hits) == 3
        uncached = Fetcher(["127.0.0.1/32"], 20 * MB, dns_ttl=0)
        for _ in range(2):
            assert _fetch(uncached, f"http://images.test:{port}/img/a.jpg")[1] is None
        assert len(lookups) == 3


def test_a_host_rebinding_after_the_ttl_is_checked_again(images, monkeypatch):
    """Once the entry expires the new answer is checked before any connection: 127.0.0.3 is refused."""
    with serve(images) as srv:
        port = urllib.parse.urlsplit(srv.base).port
        lookups = _counting_lookups(monkeypatch, ["127.0.0.1", "127.0.0.3"])
        fetcher = Fetcher(["127.0.0.1/32"], 20 * MB, dns_ttl=0)
        assert _fetch(fetcher, f"http://images.test:{port}/img/a.jpg")[1] is None
        got = fetcher(f"http://images.test:{port}/img/a.jpg", 5)
    assert got.kind == "refused_address" and "127.0.0.3" in got.error
    assert len(lookups) == 2 and len(srv.hits) == 1


def test_a_refusal_is_cached_too(monkeypatch):
    lookups = _counting_lookups(monkeypatch, ["10.0.0.1"])
    fetcher = Fetcher([], 20 * MB)
    kinds = [fetcher(f"http://images.test/{i}.jpg", 5).kind for i in range(3)]
    assert kinds == ["refused_address"] * 3 and len(lookups) == 1


@pytest.mark.parametrize("path,kind", [("/status/404", "http_404"), ("/status/410", "http_410"),
                                       ("/status/500", "http_5xx"), ("/status/503", "http_503"),
                                       ("/status/418", "http_4xx"), ("/once/reset/a.jpg", "connection_reset"),
                                       ("/big?mb=30", "too_large"), ("/noai/a.jpg", "opted_out")])
def test_failures_are_named_by_kind(images, path, kind):
    with serve(images) as srv:
        got = Fetcher(["127.0.0.1/32"], 20 * MB)(f"{srv.base}{path}", 5, None, ["noai"])
    assert got.body is None and got.kind == kind, got


def test_a_429_carries_its_retry_after(images):
    with serve(images) as srv:
        got = Fetcher(["127.0.0.1/32"], 20 * MB)(f"{srv.base}/status/429?after=7", 5)
    assert (got.kind, got.retry_after) == ("http_429", 7.0)


def test_a_timeout_is_named(images):
    with serve(images, delay=2) as srv:
        got = Fetcher(["127.0.0.1/32"], 20 * MB)(f"{srv.base}/slow/a.jpg", 0.3)
    assert got.kind == "timeout", got


def test_a_closed_port_is_a_connection_failure(images):
    with serve(images) as srv:
        base = srv.base
    got = Fetcher(["127.0.0.1/32"], 20 * MB)(f"{base}/img/a.jpg", 2)
    assert got.kind == "connection_failed", got


# -- IPv4 hidden in IPv6 (decided on the addresses, nothing connects) -------------------------------

@pytest.mark.parametrize("address,blocked", [
    ("64:ff9b::a00:1", True),               # NAT64 of 10.0.0.1
    ("64:ff9b::a9fe:a9fe", True),           # NAT64 of the metadata address
    ("64:ff9b::808:808", False),            # NAT64 of 8.8.8.8
    ("64:ff9b:1:a00:0:100::", True),        # local-use NAT64 /48 of 10.0.0.1 (u octet skipped)
    ("2002:a00:1::", True),                 # 6to4 of 10.0.0.1
    ("2002:7f00:1::1", True),               # 6to4 of 127.0.0.1
    ("2002:808:808::1", False),             # 6to4 of 8.8.8.8
    ("::ffff:0:a00:1", True),               # IPv4-translated 10.0.0.1
    ("::a00:1", True),                      # IPv4-compatible 10.0.0.1
    ("::a9fe:a9fe", True),                  # IPv4-compatible metadata address
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", True),   # Teredo, client 10.0.0.1
])
def test_ipv4_embedded_in_ipv6_is_unwrapped_before_the_check(address, blocked):
    assert address_blocked(address) is blocked


def test_an_embedded_allowed_address_is_allowed_only_where_the_ipv6_form_is_mere_notation():
    only_one = [ipaddress.ip_network("127.0.0.1/32")]
    assert not address_blocked("::ffff:0:7f00:1", only_one)   # the same host, written in IPv6
    assert address_blocked("64:ff9b::7f00:1", only_one)       # a gateway's address, not the host's
    assert address_blocked("2002:7f00:1::", only_one)


@pytest.mark.parametrize("url", ["http://[64:ff9b::a9fe:a9fe]/latest/meta-data/", "http://[2002:a00:1::1]/a.jpg",
                                 "http://[::a00:1]/a.jpg", "http://[::ffff:0:a00:1]/a.jpg"])
def test_urls_with_embedded_private_addresses_are_refused(url):
    with pytest.raises(Refused, match="address not allowed"):
        check_url(url)


# -- one deadline per fetch ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drip_file(images) -> Path:
    (images / "drip.bin").write_bytes(b"x" * 100)   # at 0.2 s a byte: 20 s if nothing stops it
    return images


def test_a_slow_drip_fails_as_timeout_at_the_deadline(drip_file):
    import time

    with serve(drip_file, drip=0.2) as srv:
        started = time.monotonic()
        got = Fetcher(["127.0.0.1/32"], 20 * MB)(f"{srv.base}/drip/drip.bin", 1.0)
        seconds = time.monotonic() - started
    assert got.kind == "timeout" and got.body is None, got
    assert 0.9 <= seconds < 1.5   # the deadline plus a small margin; per-read timeouts would let it run 20 s


# -- proxies ---------------------------------------------------------------------------------------

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


def test_proxy_variables_in_the_environment_are_never_used(images, monkeypatch):
    from tests.servers import serve_proxy

    with serve(images) as srv, serve_proxy("127.0.0.5") as proxy:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, proxy.base)
        monkeypatch.setenv("no_proxy", "")
        fetcher = Fetcher(["127.0.0.0/24"], 20 * MB)
        assert _fetch(fetcher, f"{srv.base}/img/a.jpg") == ((images / "a.jpg").read_bytes(), None)
        got = fetcher("http://169.254.169.254/latest/meta-data/", 5)
        assert got.kind == "refused_address"
    assert proxy.hits == [] and len(srv.hits) == 1


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    from tests.tls import make_ca

    return make_ca(tmp_path_factory.mktemp("tls"))


def test_http_goes_through_the_configured_proxy_and_private_targets_are_still_refused(images, monkeypatch):
    from tests.servers import serve_proxy

    with serve(images) as srv, serve(images, host="127.0.0.2") as private, serve_proxy("127.0.0.5") as proxy:
        # only the target's network is allowed: the proxy's address is allowed by the setting alone
        fetcher = Fetcher(["127.0.0.1/32"], 20 * MB, proxy=proxy.base)
        assert _fetch(fetcher, f"{srv.base}/img/a.jpg") == ((images / "a.jpg").read_bytes(), None)
        assert proxy.hits == [f"GET {srv.base}/img/a.jpg"] and srv.hits == ["/img/a.jpg"]
        for url in (f"{private.base}/img/a.jpg", "http://169.254.169.254/latest/meta-data/", "http://[::a00:1]/"):
            assert fetcher(url, 5).kind == "refused_address", url
        lookups = _counting_lookups(monkeypatch, ["10.0.0.1"])
        assert fetcher("http://images.test/a.jpg", 5).kind == "refused_address"   # a name, checked before the request
        assert lookups == ["images.test"]
        assert fetcher(f"{srv.base}/redirect?to={private.base}/img/a.jpg", 5).kind == "refused_address"
    assert private.hits == []
    assert proxy.hits == [f"GET {srv.base}/img/a.jpg", f"GET {srv.base}/redirect?to={private.base}/img/a.jpg"]


def test_https_goes_through_a_connect_tunnel_to_the_checked_address(images, ca, monkeypatch):
    from tests.servers import serve_proxy

    with serve(images, tls=ca.server) as srv, serve_proxy("127.0.0.5") as proxy:
        port = urllib.parse.urlsplit(srv.base).port
        fetcher = Fetcher(["127.0.0.1/32"], 20 * MB, proxy=proxy.base, tls=ca.client)
        assert _fetch(fetcher, f"https://127.0.0.1:{port}/img/a.jpg") == ((images / "a.jpg").read_bytes(), None)
        lookups = _counting_lookups(monkeypatch, ["127.0.0.1"])
        # a name: the tunnel goes to the address it was checked at, TLS verifies the name itself
        assert _fetch(fetcher, f"https://images.test:{port}/img/a.jpg")[1] is None
        assert lookups == ["images.test"]
        assert fetcher("https://10.0.0.1/a.jpg", 5).kind == "refused_address"
    assert proxy.hits == [f"CONNECT 127.0.0.1:{port}"] * 2
    assert srv.hits == ["/img/a.jpg"] * 2


def test_https_direct_checks_the_certificate(images, ca):
    with serve(images, tls=ca.server) as srv:
        assert _fetch(Fetcher(["127.0.0.1/32"], 20 * MB, tls=ca.client), f"{srv.base}/img/a.jpg")[1] is None
        got = Fetcher(["127.0.0.1/32"], 20 * MB)(f"{srv.base}/img/a.jpg", 5)   # the system's trust store
    assert got.kind == "connection_failed" and "certificate" in got.error.lower()


# -- DNS -------------------------------------------------------------------------------------------

def test_slow_lookups_of_a_few_dead_names_do_not_fail_the_other_hosts(images, monkeypatch):
    """Eight lookups hang (3 s each) while a healthy name is fetched: it resolves at once, because the
    task's resolver has threads to spare and a lookup's limit starts when its thread starts it."""
    import socket
    import threading
    import time

    real = socket.getaddrinfo

    def lookup(host, port, *args, **kwargs):
        if host.startswith("dead"):
            time.sleep(3)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real("127.0.0.1" if host == "images.test" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    with serve(images) as srv:
        port = urllib.parse.urlsplit(srv.base).port
        fetcher = Fetcher(["127.0.0.1/32"], 20 * MB, lookup_threads=2 * 8 + 4)
        dead = [threading.Thread(target=fetcher, args=(f"http://dead{i}.test/a.jpg", 1.0)) for i in range(8)]
        for t in dead:
            t.start()
        time.sleep(0.2)
        started = time.monotonic()
        got = fetcher(f"http://images.test:{port}/img/a.jpg", 1.0)
        seconds = time.monotonic() - started
        for t in dead:
            t.join()
    assert got.kind is None and seconds < 0.5, (got, seconds)


def test_a_timed_out_lookup_is_not_cached_and_a_missing_name_is(monkeypatch):
    import socket
    import time

    lookups: list[str] = []

    def lookup(host, port, *args, **kwargs):
        lookups.append(host)
        if host == "slow.test":
            time.sleep(1)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    fetcher = Fetcher([], 20 * MB)
    assert [fetcher("http://slow.test/a.jpg", 0.3).kind for _ in range(2)] == ["dns_timeout"] * 2
    assert [fetcher("http://gone.test/a.jpg", 0.3).kind for _ in range(2)] == ["dns_failed"] * 2
    assert lookups == ["slow.test", "slow.test", "gone.test"]


# -- memory ----------------------------------------------------------------------------------------

def test_bodies_past_the_budget_spill_to_disk(images, tmp_path):
    from curate.phases.download.fetch import Budget

    (images / "half.bin").write_bytes(bytes(range(256)) * 2048)   # 512 KiB
    budget = Budget(300 * 1024, str(tmp_path))
    fetcher = Fetcher(["127.0.0.1/32"], 20 * MB, budget=budget)
    with serve(images) as srv:
        first, second = (fetcher(f"{srv.base}/img/half.bin", 5) for _ in range(2))
    assert first.body.spilled and second.body.spilled and budget.spilled == 2
    assert budget.peak <= 300 * 1024 and budget.used == 0   # what was in memory moved to the files
    assert first.body.read() == (images / "half.bin").read_bytes()
    small = Budget(1 << 20)
    got = Fetcher(["127.0.0.1/32"], 20 * MB, budget=small)
    with serve(images) as srv:
        body = got(f"{srv.base}/img/half.bin", 5).body
    assert not body.spilled and small.used == 512 * 1024
    body.close()
    assert small.used == 0
