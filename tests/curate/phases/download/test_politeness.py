"""Politeness in the download task: per-host caps, Retry-After, backoff, no retry of permanent failures,
host pauses with a bounded wait, and every row ending with a status and (when it failed) an error kind.

The hosts are test servers on 127.0.0.2, 127.0.0.3, ... (separate addresses, so separate hosts),
allowed by the config; they count their concurrent connections and every request's time.
"""
from __future__ import annotations

import email.utils
import io
import random
import time
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import DownloadConfig, resolve, validate
from curate.phases.download.fetch import retry_after
from curate.phases.download.hosts import RETRYABLE, HostQueue, Job, download_stats
from curate.phases.download.phase import download_shard, fetch_rows
from curate.phases.download.plan import plan
from curate.run.rundir import RunDir
from curate.run.tario import TarWriter, members
from manifests.schema import ERROR_KINDS
from tests.servers import serve_hosts

LOOPBACK = ["127.0.0.0/24"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    import img2dataset.resizer  # noqa: F401 - imported once here (seconds), so the timings below are the fetch loop's
    folder = tmp_path_factory.mktemp("polite")
    Image.new("RGB", (64, 48), (30, 120, 200)).save(folder / "a.jpg", quality=90)
    (folder / "page.html").write_bytes(b"<html>not an image</html>")
    return folder


def _fetch(urls: list[str], **download):
    cfg = DownloadConfig(**{"allow_networks": LOOPBACK, "backoff": 0.2, **download})
    out = io.BytesIO()
    tar = TarWriter(out)
    rows, hosts, _ = fetch_rows(cfg, urls, [f"k{i:03d}" for i in range(len(urls))], tar)
    tar.close()
    out.seek(0)
    return rows, hosts, dict(members(out))


def test_no_host_ever_sees_more_than_the_cap_while_hosts_run_in_parallel(files):
    with serve_hosts(files, 4, delay=0.1) as servers:
        urls = [f"{s.base}/slow/a.jpg?{i}" for i in range(12) for s in servers]
        started = time.monotonic()
        rows, hosts, images = _fetch(urls, thread_count=16, per_host_connections=2)
        seconds = time.monotonic() - started
    assert [s.peak for s in servers] == [2, 2, 2, 2]   # the cap, reached and never passed
    assert set(hosts.peak.values()) == {2}
    assert all(r.status == "success" and r.error_kind is None for r in rows)
    assert len(images) == len(urls)
    # 4 hosts x 2 connections in parallel: 48 requests of 0.1 s take about 0.6 s, not 4.8 s in a row
    assert seconds < 3.0


def test_one_busy_host_does_not_hold_up_the_others(files):
    """No head-of-line blocking: the first 40 URLs are one slow host (0.2 s each, 2 at a time, so 4 s);
    the other host's URLs, all behind them in the input, are done within the slow host's first second."""
    with serve_hosts(files, 2, delay=0.2) as (slow, fast):
        urls = [f"{slow.base}/slow/a.jpg?{i}" for i in range(40)] + [f"{fast.base}/img/a.jpg?{i}" for i in range(20)]
        rows, _, _ = _fetch(urls, thread_count=8, per_host_connections=2)
    assert all(r.status == "success" for r in rows)
    assert slow.peak == 2
    assert max(t for t, _ in fast.times) - min(t for t, _ in slow.times) < 1.0


def test_429_with_retry_after_1_is_retried_after_a_second_then_succeeds(files):
    with serve_hosts(files, 1) as (srv,):
        rows, hosts, images = _fetch([f"{srv.base}/once/429/a.jpg?after=1"], retries=2)
    (first, _), (second, _) = srv.times
    assert second - first >= 1.0
    assert rows[0].status == "success" and rows[0].error_kind is None
    assert images["k000.jpg"]
    assert hosts.hosts["127.0.0.2"].stats.retries == 1


def test_retry_after_as_seconds_or_http_date():
    now = time.time()
    assert retry_after("7") == 7.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after("soon") is None and retry_after(None) is None


def test_a_long_retry_after_is_cut_to_max_retry_after(files):
    with serve_hosts(files, 1) as (srv,):
        started = time.monotonic()
        rows, _, _ = _fetch([f"{srv.base}/once/503/a.jpg?after=3600"], max_retry_after=0.5)
    assert time.monotonic() - started < 5
    (first, _), (second, _) = srv.times
    assert second - first >= 0.5
    assert rows[0].status == "success"


def test_permanent_failures_are_requested_exactly_once(files):
    with serve_hosts(files, 2) as (a, b):
        urls = [f"{a.base}/status/404", f"{a.base}/status/410", f"{a.base}/status/403",
                f"{a.base}/img/page.html", f"{b.base}/noai/a.jpg", f"{b.base}/redirect?to=http://127.0.1.1/a.jpg"]
        rows, _, _ = _fetch(urls, retries=3, allow_networks=["127.0.0.2/31"])
    assert [r.error_kind for r in rows] == ["http_404", "http_410", "http_403", "not_an_image", "opted_out",
                                            "refused_address"]
    assert sorted(a.hits + b.hits) == sorted(["/status/404", "/status/410", "/status/403", "/img/page.html",
                                             "/noai/a.jpg", "/redirect?to=http://127.0.1.1/a.jpg"])


def test_transient_failures_are_retried_with_backoff_until_they_succeed_or_retries_run_out(files):
    with serve_hosts(files, 1) as (srv,):
        urls = [f"{srv.base}/once/503/a.jpg", f"{srv.base}/once/reset/a.jpg", f"{srv.base}/status/500",
                f"{srv.base}/status/429"]
        rows, _, _ = _fetch(urls, retries=2, backoff=0.2, host_window=50)
    assert [(r.status, r.error_kind) for r in rows] == [("success", None), ("success", None),
                                                       ("failed_to_download", "http_5xx"),
                                                       ("failed_to_download", "http_429")]
    assert srv.hits.count("/status/500") == 3 and srv.hits.count("/status/429") == 3   # 1 + retries
    times = [t for t, p in srv.times if p == "/status/500"]
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2   # 0.2 s, then 0.4 s, each x U(0.5, 1.5)


def test_a_failing_host_is_paused_then_probed_and_the_shard_wait_is_bounded(files):
    """A host that served its first URL, then fails (an outage): paused, probed, and waited for until
    the shard's wait budget is spent."""
    with serve_hosts(files, 2) as (bad, good):
        urls = [f"{bad.base}/img/a.jpg"] + [f"{bad.base}/status/503?{i}" for i in range(30)] + \
            [f"{good.base}/img/a.jpg?{i}" for i in range(10)]
        started = time.monotonic()
        rows, hosts, _ = _fetch(urls, retries=1, per_host_connections=2, host_window=4, host_pause=0.3,
                                max_wait=1.0)
        seconds = time.monotonic() - started
    assert seconds < 6   # the wait budget (1 s) bounds what the bad host costs the shard
    assert 1.0 <= hosts.waited < 2.0
    kinds = [r.error_kind for r in rows[1:31]]
    assert set(kinds) <= {"http_503", "host_unavailable"} and "host_unavailable" in kinds
    assert len(bad.hits) < 31   # the pause saved requests: without it, 1 + 30 x (1 + retries) = 61
    assert hosts.hosts["127.0.0.2"].stats.pauses >= 2   # paused, probed, still failing, paused again
    assert rows[0].status == "success" and all(r.status == "success" for r in rows[31:])


def test_host_queue_pause_holds_the_host_then_sends_one_probe():
    """The scheduler on its own, on a fake clock: after most of a window of first attempts failed,
    nothing goes out to that host until the pause ends, and then exactly one request (the probe)
    until it answers."""
    now = [0.0]
    cfg = DownloadConfig(per_host_connections=3, retries=5, host_window=4, host_pause=10, backoff=100,
                         max_wait=1e9, robots_txt=False)
    q = HostQueue([Job(i, f"http://h/{i}", "h") for i in range(20)], cfg, clock=lambda: now[0], rng=random.Random(1))
    jobs = [q.take() for _ in range(3)]
    assert q.hosts["h"].active == 3
    for job in jobs:
        assert not q.settle(job, "http_503")   # retried later (50 s or more)
    job = q.take()
    assert job.attempts == 0
    q.settle(job, "http_503")                   # the fourth failed URL of four: paused
    assert q.hosts["h"].ready_at == pytest.approx(10)
    now[0] = 10.0
    probe = q.take()
    assert q.hosts["h"].probe is probe and q.hosts["h"].active == 1
    assert not q.ready   # nothing else for h while the probe is out
    assert q.settle(probe, None)
    assert q.hosts["h"].probing is False
    assert [q.take() for _ in range(3)] and q.hosts["h"].active == 3   # back to the cap


def test_retries_of_a_few_bad_urls_never_pause_a_host_that_serves_the_rest():
    """The demo's case: among many good URLs, two that always fail are retried at the end of the shard,
    when nothing else is left; their failures fill the last requests but are not new samples."""
    now = [0.0]
    cfg = DownloadConfig(per_host_connections=4, retries=8, host_window=4, host_pause=10, backoff=0,
                         max_wait=1e9, robots_txt=False)
    urls = [f"http://h/{i}" for i in range(30)]
    q = HostQueue([Job(i, u, "h") for i, u in enumerate(urls)], cfg, clock=lambda: now[0], rng=random.Random(1))
    while (job := q.take()) is not None:
        q.settle(job, "http_5xx" if job.index in (3, 17) else None)
    assert q.hosts["h"].stats.pauses == 0
    assert q.hosts["h"].stats.retries == 2 * cfg.retries


def test_retryable_kinds_are_error_kinds():
    assert RETRYABLE <= set(ERROR_KINDS)
    assert not {"http_404", "http_410", "refused_address", "opted_out"} & RETRYABLE


def test_every_row_ends_with_a_status_and_a_kind_and_the_marker_has_per_host_stats(files, tmp_path):
    with serve_hosts(files, 3) as (a, b, c):
        urls = [f"{a.base}/img/a.jpg?{i}" for i in range(6)] + [f"{b.base}/once/429/a.jpg?after=1",
                f"{b.base}/status/404", f"{c.base}/once/reset/a.jpg", f"{c.base}/status/503", "ftp://x/a.jpg",
                f"{c.base}/img/page.html", f"{a.base}/img/missing.jpg", "http://127.0.5.5/a.jpg"]
        pq.write_table(pa.table({"url": urls, "caption": ["一只猫"] * len(urls)}), tmp_path / "urls.parquet")
        cfg = resolve(validate({"run_dir": str(tmp_path / "run"), "input": {"paths": [str(tmp_path / "urls.parquet")]},
                                "download": {"allow_networks": ["127.0.0.2/31", "127.0.0.4/32"], "backoff": 0.1,
                                             "retries": 1}}))
        run = RunDir(Path(cfg.run_dir))
        (shard,) = plan(cfg.input, run)
        download_shard(cfg, shard)
    raw = pq.read_table(run.raw_table(shard))
    assert raw.num_rows == len(urls) and sorted(raw.column("url").to_pylist()) == sorted(urls)
    by_url = {r["url"]: r for r in raw.to_pylist()}
    expect = {urls[6]: None, urls[7]: "http_404", urls[8]: None, urls[9]: "http_503", urls[10]: "bad_url",
              urls[11]: "not_an_image", urls[12]: "http_404", urls[13]: "refused_address"}
    for url, kind in expect.items():
        assert by_url[url]["error_kind"] == kind, (url, by_url[url])
    for row in by_url.values():
        assert row["status"] in {"success", "failed_to_download", "failed_to_resize", "rejected"}
        assert (row["status"] == "success") == (row["error_kind"] is None) == (row["error"] is None), row
    tar_names = {name for name, _ in members(open(run.raw_tar(shard), "rb"))}
    assert tar_names == {f"{r['key']}.jpg" for r in by_url.values() if r["status"] == "success"}
    marker = run.storage.read_json(run.marker("download", shard))
    assert marker["error_kinds"] == {"http_404": 2, "http_503": 1, "bad_url": 1, "not_an_image": 1,
                                     "refused_address": 1}
    assert marker["hosts"]["127.0.0.2"]["rows"] == 7 and marker["hosts"]["127.0.0.2"]["success"] == 6
    assert marker["hosts"]["127.0.0.3"]["retries"] == 1
    stats = download_stats([marker, marker])
    assert list(stats["top_hosts"])[0] == "127.0.0.2"
    assert stats["top_hosts"]["127.0.0.2"]["rows"] == 14
    assert stats["top_hosts"]["127.0.0.2"]["success_rate"] == pytest.approx(12 / 14, abs=1e-3)
    assert stats["error_kinds"]["http_404"] == 4


def test_download_stats_keep_the_top_hosts_and_sum_the_rest():
    def host(rows: int, ok: int, kinds: dict) -> dict:
        return {"rows": rows, "success": ok, "requests": rows, "retries": 0, "pauses": 0, "peak_connections": 2,
                "kinds": kinds}

    markers = [{"error_kinds": {"timeout": 3}, "wait_s": 1.5,
                "hosts": {f"h{i}.cn": host(10 + i, 10, {"timeout": i}) for i in range(5)}},
               {"error_kinds": {"http_429": 2}, "wait_s": 0.5, "hosts": {"h4.cn": host(20, 18, {"http_429": 2})}}]
    stats = download_stats(markers, top=2)
    assert list(stats["top_hosts"]) == ["h4.cn", "h3.cn", "(other hosts)"]
    assert stats["top_hosts"]["h4.cn"]["rows"] == 34 and stats["top_hosts"]["h4.cn"]["kinds"] == {"timeout": 4,
                                                                                                  "http_429": 2}
    assert stats["top_hosts"]["(other hosts)"]["rows"] == 10 + 11 + 12
    assert stats["wait_s"] == {"total": 2.0, "max_shard": 1.5}
    assert stats["error_kinds"] == {"timeout": 3, "http_429": 2}


# -- robots.txt ------------------------------------------------------------------------------------

ROBOTS = "User-agent: *\nDisallow: /img/private\n\nUser-agent: curatebot\nDisallow: /noai/\nAllow: /noai/ok\n"


@pytest.mark.parametrize("token,refused", [(None, ["/img/private.jpg"]), ("curatebot", ["/noai/a.jpg"])])
def test_robots_txt_refuses_what_it_disallows_once_per_host(files, token, refused):
    """The token's group applies when it has one (RFC 9309: the most specific group only), `*` otherwise;
    refused URLs are never requested, and each host's robots.txt is requested once."""
    (files / "private.jpg").write_bytes((files / "a.jpg").read_bytes())
    with serve_hosts(files, 2, robots=ROBOTS) as (a, b):
        paths = ["/img/a.jpg", "/img/private.jpg", "/noai/a.jpg?tag=none", "/noai/ok.jpg?tag=none"]
        urls = [f"{s.base}{p}" for s in (a, b) for p in paths]
        rows, hosts, _ = _fetch(urls, user_agent_token=token, disallowed_header_directives=[])
    for url, row in zip(urls, rows):
        path = urllib.parse.urlsplit(url).path
        if path in refused:
            assert (row.status, row.error_kind) == ("rejected", "robots_disallowed"), (url, row)
        else:
            assert row.error_kind != "robots_disallowed", (url, row)
    assert len(a.robots) == len(b.robots) == 1
    assert not [h for h in a.hits + b.hits if urllib.parse.urlsplit(h).path in refused]
    assert hosts.hosts["127.0.0.2"].stats.kinds["robots_disallowed"] == 1
    assert hosts.hosts["127.0.0.2"].stats.robots == "rules"
    assert all(token or "" in agent for agent in a.robots)


def test_a_missing_robots_txt_allows_everything(files):
    with serve_hosts(files, 1, robots=404) as (srv,):
        rows, hosts, _ = _fetch([f"{srv.base}/img/a.jpg?{i}" for i in range(3)])
    assert all(r.status == "success" for r in rows) and len(srv.robots) == 1
    assert hosts.hosts["127.0.0.2"].stats.robots.startswith("no rules: HTTP 404")


def test_a_robots_txt_that_fails_transiently_is_retried_while_the_hosts_urls_wait(files):
    with serve_hosts(files, 1, robots=[503, "User-agent: *\nDisallow: /img/private\n"]) as (srv,):
        rows, _, _ = _fetch([f"{srv.base}/img/a.jpg", f"{srv.base}/img/private.jpg"], retries=2, backoff=0.3)
    assert [r.error_kind for r in rows] == [None, "robots_disallowed"]
    assert len(srv.robots) == 2 and srv.hits == ["/img/a.jpg"]


def test_a_robots_txt_that_keeps_failing_refuses_the_host(files):
    with serve_hosts(files, 1, robots=503) as (srv,):
        rows, hosts, _ = _fetch([f"{srv.base}/img/a.jpg?{i}" for i in range(3)], retries=1, backoff=0.1)
    assert {(r.status, r.error_kind) for r in rows} == {("rejected", "robots_unavailable")}
    assert len(srv.robots) == 2 and srv.hits == []   # 1 + retries, and no image was requested
    assert hosts.hosts["127.0.0.2"].stats.robots.startswith("unavailable")


def test_crawl_delay_is_a_floor_on_the_hosts_request_interval(files):
    with serve_hosts(files, 1, robots="User-agent: *\nCrawl-delay: 0.3\n") as (srv,):
        rows, _, _ = _fetch([f"{srv.base}/img/a.jpg?{i}" for i in range(4)], per_host_connections=4)
    assert all(r.status == "success" for r in rows)
    starts = sorted(t for t, _ in srv.times)   # arrivals: a request started 0.3 s after another may land sooner
    assert starts[-1] - starts[0] >= 0.85 and min(b - a for a, b in zip(starts, starts[1:])) >= 0.2


def test_robots_refusals_are_counted_per_host_in_the_stats(files, tmp_path):
    with serve_hosts(files, 1, robots=ROBOTS) as (srv,):
        urls = [f"{srv.base}/img/a.jpg", f"{srv.base}/img/private.jpg", f"{srv.base}/img/private.jpg?2"]
        pq.write_table(pa.table({"url": urls, "caption": ["一只猫"] * 3}), tmp_path / "urls.parquet")
        cfg = resolve(validate({"run_dir": str(tmp_path / "run"), "input": {"paths": [str(tmp_path / "urls.parquet")]},
                                "download": {"allow_networks": LOOPBACK}}))
        run = RunDir(Path(cfg.run_dir))
        (shard,) = plan(cfg.input, run)
        download_shard(cfg, shard)
    marker = run.storage.read_json(run.marker("download", shard))
    assert marker["error_kinds"] == {"robots_disallowed": 2}
    stats = download_stats([marker])
    assert stats["top_hosts"]["127.0.0.2"]["kinds"] == {"robots_disallowed": 2}
    assert stats["top_hosts"]["127.0.0.2"]["robots"] == "rules"
    assert stats["top_hosts"]["127.0.0.2"]["requests"] == 2   # robots.txt and the one allowed image
    from curate.report.page import download_section

    table = download_section(stats).split('id="hosts"')[1]
    assert "refused by robots.txt" in table and '<td class="num">2</td><td>robots_disallowed 2</td>' in table


# -- tarpits ---------------------------------------------------------------------------------------

def test_a_tarpit_host_fails_at_the_deadline_and_is_paused_like_any_failing_host(files):
    (files / "drip.jpg").write_bytes((files / "a.jpg").read_bytes())
    with serve_hosts(files, 2, drip=0.2) as (pit, good):
        urls = [f"{pit.base}/drip/drip.jpg?{i}" for i in range(12)] + [f"{good.base}/img/a.jpg?{i}" for i in range(4)]
        started = time.monotonic()
        rows, hosts, _ = _fetch(urls, timeout=0.5, retries=1, per_host_connections=2, host_window=20,
                                host_pause=30, max_wait=60)
        seconds = time.monotonic() - started
    kinds = [r.error_kind for r in rows[:12]]
    assert "timeout" in kinds and set(kinds) <= {"timeout", "host_unavailable"}
    assert hosts.hosts["127.0.0.2"].stats.pauses == 1   # after two rounds of its two connections
    assert len(pit.hits) < 12
    assert all(r.status == "success" for r in rows[12:])
    # it answered nothing, and nothing else was left: given up at once, not after max_wait (60 s)
    assert seconds < 6 and hosts.waited < 1
    assert "answered none of its requests" in rows[11].error
