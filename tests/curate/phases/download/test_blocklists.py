"""Blocklists: a blocked domain, URL prefix or pattern is never contacted; a listed image (sha256, or a
pHash within the distance) is dropped after download; each with its own reason."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import ConfigError, validate
from curate.demo.corpus import photo
from curate.pipeline import run_phases
from filters.blocklists import ImageBlocklist, UrlBlocklist
from tests.servers import serve_hosts

CAPTIONS = ["一只橘猫趴在窗台上晒太阳", "雪后的故宫角楼，清晨", "西湖边的柳树和游船", "一碗热气腾腾的兰州拉面",
            "夕阳下的长城烽火台", "桂林山水，漓江竹筏", "成都大熊猫在吃竹子", "上海外滩的夜景灯光"]


def test_url_entries_match_domains_subdomains_paths_prefixes_and_patterns():
    bl = UrlBlocklist.parse("# spam\nexample.com\n*.adult.net\nshop.org/private/\n"
                            "https://cdn.host.io/u/7/\nre:[?&]utm_source=spam\n")
    assert len(bl) == 5
    hits = {u: bl.match(u) for u in [
        "http://example.com/a.jpg", "https://img.EXAMPLE.com/b.jpg", "http://notexample.com/c.jpg",
        "http://x.y.adult.net/d.jpg", "http://shop.org/private/e.jpg", "http://shop.org/public/f.jpg",
        "HTTPS://cdn.host.io/u/7/g.jpg", "https://cdn.host.io/u/8/h.jpg", "http://ok.cn/i.jpg?utm_source=spam",
        None, ""]}
    assert hits == {"http://example.com/a.jpg": "example.com", "https://img.EXAMPLE.com/b.jpg": "example.com",
                    "http://notexample.com/c.jpg": None, "http://x.y.adult.net/d.jpg": "*.adult.net",
                    "http://shop.org/private/e.jpg": "shop.org/private/", "http://shop.org/public/f.jpg": None,
                    "HTTPS://cdn.host.io/u/7/g.jpg": "https://cdn.host.io/u/7/", "https://cdn.host.io/u/8/h.jpg": None,
                    "http://ok.cn/i.jpg?utm_source=spam": "re:[?&]utm_source=spam", None: None, "": None}


def test_a_bad_entry_names_its_line():
    with pytest.raises(ValueError, match="list.txt:2: bad regular expression"):
        UrlBlocklist.parse("ok.com\nre:(unclosed\n", "list.txt")
    with pytest.raises(ValueError, match="images.txt:1: expected a sha256"):
        ImageBlocklist.parse("abc123\n", "images.txt")


def test_image_entries_match_sha256_and_any_view_within_the_distance():
    rng = np.random.default_rng(0)
    listed = rng.integers(0, 2**63, 50, dtype=np.uint64) * 2 + 1
    sha = "ab" * 32
    bl = ImageBlocklist.parse(f"sha256:{sha}\n" + "\n".join(f"{int(h):016x}" for h in listed))
    flip = lambda h, bits: h ^ np.uint64(sum(1 << b for b in bits))   # noqa: E731
    views = rng.integers(0, 2**63, (5, 3), dtype=np.uint64)
    views[1, 2] = flip(listed[7], [0, 9, 33, 60])        # a crop 4 bits from an entry
    views[2, 0] = flip(listed[3], [1, 2, 3, 4, 5])       # 5 bits: beyond the distance
    got = bl.match([None, "x", sha.upper(), None, None], views, np.array([True, True, True, False, True]), 4)
    assert got == [None, f"phash:{int(listed[7]):016x} d=4", "sha256", None, None]
    assert bl.match(["x"], views[2:3], np.array([True]), 5) == [f"phash:{int(listed[3]):016x} d=5"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blocklist_images")
    for i in range(len(CAPTIONS)):
        photo(np.random.default_rng(100 + i), 256, 320).save(folder / f"p{i}.jpg", quality=90)
    return folder


@pytest.mark.slow
def test_blocked_urls_are_never_contacted_and_listed_images_are_dropped(images, tmp_path, ray_session):
    with serve_hosts(images, 2) as (allowed, blocked):
        urls = [f"{allowed.base}/img/p{i}.jpg" for i in range(6)] + [f"{blocked.base}/img/p{i}.jpg" for i in (6, 7)]
        source = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": CAPTIONS}), source)
        listing = tmp_path / "blocked.txt"
        host = blocked.base.split("//")[1].split(":")[0]
        listing.write_text(f"# a domain, a URL prefix and a pattern\n{host}\n{allowed.base}/img/p1\nre:/p2\\.jpg$\n")
        data = {"run_dir": str(tmp_path / "run"),
                "input": {"paths": [str(source)], "shard_rows": 4, "url_blocklist": str(listing)},
                "download": {"allow_networks": ["127.0.0.0/8"], "thread_count": 2, "retries": 0},
                "dedupe": {"partitions": 2}, "write": {"samples_per_shard": 4}}
        out = run_phases(validate(data))
        assert out.ok, out.failures
        assert blocked.hits == []   # the blocked host was never contacted
        assert sorted(allowed.hits) == [f"/img/p{i}.jpg" for i in (0, 3, 4, 5)]

    run = tmp_path / "run"
    plan = json.loads((run / "input_shards" / "_plan.json").read_text())
    import hashlib

    assert plan["before_download"]["url_blocklist"]["sha256"] == hashlib.sha256(listing.read_bytes()).hexdigest()
    manifest = pa.concat_tables(pq.read_table(p) for p in sorted((run / "manifest").glob("*.parquet")))
    by_url = {r["url"]: r for r in manifest.to_pylist()}
    assert {u: by_url[u]["reason"] for u in urls if by_url[u]["reason"]} == {u: "url_blocked" for u in urls
                                                                            if "p0" not in u and "p3" not in u
                                                                            and "p4" not in u and "p5" not in u}
    assert by_url[urls[6]]["url_blocked_by"] == host and by_url[urls[2]]["url_blocked_by"] == "re:/p2\\.jpg$"

    # the image list: a re-decide (nothing is fetched again) drops a listed sha256 and a pHash 3 bits away,
    # not one 12 bits away
    a, b, c = (by_url[urls[i]] for i in (0, 3, 4))
    near = b["phash"] ^ 0b10011
    far = c["phash"] ^ ((1 << 12) - 1)
    (tmp_path / "images.txt").write_text(f"{a['sha256']}\nphash:{near:016x}\n{far:016x}\n")
    data["filters"] = {"image_blocklist": str(tmp_path / "images.txt"), "image_blocklist_distance": 3}
    out = run_phases(validate(data), ("decide", "write"))
    assert out.ok, out.failures
    manifest = pa.concat_tables(pq.read_table(p) for p in sorted((run / "manifest").glob("*.parquet")))
    reasons = {r["url"]: r["reason"] for r in manifest.to_pylist()}
    assert [reasons[urls[i]] for i in (0, 3, 4, 5)] == ["image_blocked", "image_blocked", None, None]
    decided = json.loads((run / "decisions" / "_decided.json").read_text())
    assert decided["funnel"]["dropped"]["image_blocked"] == 2

    with pytest.raises(ConfigError, match="image_blocklist.*expected a sha256"):
        (tmp_path / "images.txt").write_text("not a hash\n")
        run_phases(validate(data), ("decide",))
