"""Caption first: rows the caption rules drop are never requested, and the output is the same as
when the same rules run after the download.

A LAION-style parquet (uppercase URL and TEXT, float WIDTH/HEIGHT, similarity, punsafe, pwatermark,
LANGUAGE) with null and empty URLs, null captions, repeated URLs and English, bilingual and Chinese
captions is served from a loopback server that logs every request.
"""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import ConfigError, validate
from curate.demo.corpus import photo
from curate.pipeline import run_phases
from curate.run.tario import members
from tests.servers import Served, serve

ZH = ["一只橘猫趴在窗台上晒太阳", "雪后的故宫角楼，清晨", "西湖边的柳树和游船", "一碗热气腾腾的兰州拉面",
      "夕阳下的长城烽火台", "桂林山水，漓江竹筏", "成都大熊猫在吃竹子", "上海外滩的夜景灯光",
      "黄山云海与迎客松", "江南水乡的石拱桥", "秋天的银杏大道", "草原上奔跑的骏马"]
EN = ["A red car parked on the street", "Sunset over the ocean with palm trees", "a photo of a cat on the sofa 猫",
      "Mountain landscape in winter", "Close-up of a yellow flower"]
WHERE = "punsafe < 0.5 and pwatermark < 0.8"   # LAION-5B's own thresholds
COMMON = "高清壁纸，山间湖泊风景摄影"   # on 3 distinct URLs: more than text.max_caption_images (2)


def _rows(base: str) -> list[dict]:
    """(URL, TEXT, expected reason, whether it is requested), plus LAION's metadata columns."""
    rows: list[tuple[str | None, str | None, str | None, bool]] = []
    img = iter(range(100))
    url = lambda: f"{base}/img/p{next(img)}.jpg"   # noqa: E731
    rows += [(url(), c, None, True) for c in ZH]
    rows.append((url(), "Apple MacBook Pro 笔记本电脑 银色", None, True))                    # bilingual, Chinese enough
    rows += [(url(), c, "not_chinese", False) for c in EN]
    rows += [(url(), None, "caption_short", False), (url(), "", "caption_short", False),
             (url(), "IMG_1234.jpg", "caption_junk", False),
             (url(), "哈哈哈哈哈哈哈哈哈哈哈哈", "caption_repetitive", False),
             (url(), "色情网站截图", "caption_unsafe", False)]
    rows += [(url(), COMMON, "caption_common", False) for _ in range(3)]
    shared = url()
    rows += [(shared, "同一张图片的第一种说法", None, True), (shared, "同一张图片的第二种说法", "duplicate", True)]
    twice = url()
    rows += [(twice, "重复的网址和重复的标题", None, True), (twice, "重复的网址和重复的标题", "duplicate", True)]
    rows += [(None, "没有网址的一行中文标题", "download_failed", False),
             ("", "网址是空的一行中文标题", "download_failed", False),
             (f"{base}/status/404", "这张图片已经不存在了", "download_failed", True),
             (f"{base}/status/404", "This image is gone", "not_chinese", False),
             (f"{base}/redirect?to={base}/img/p99.jpg", "跳转之后的一张风景照片", None, True)]
    rng = np.random.default_rng(0)
    out = [{"URL": u, "TEXT": t, "WIDTH": float(rng.integers(256, 1024)), "HEIGHT": float(rng.integers(256, 1024)),
            "similarity": float(rng.uniform(0.2, 0.4)), "punsafe": float(rng.uniform(0, 0.3)),
            "pwatermark": float(rng.uniform(0, 0.5)), "LANGUAGE": "en" if r == "not_chinese" else "zh",
            "_reason": r, "_requested": asked} for u, t, r, asked in rows]
    # LAION's own scores say no (input.where): never requested, whatever the caption says
    for meta in ({"punsafe": 0.93}, {"pwatermark": 0.97}, {"punsafe": None}, {"punsafe": 0.7, "TEXT": "Nude model"}):
        out.append({**out[0], "URL": url(), "TEXT": "一张被元数据排除的中文图片", **meta, "_reason": "input_where",
                    "_requested": False})
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("laion_images")
    for i in range(100):
        photo(np.random.default_rng(i), 256, 320).save(folder / f"p{i}.jpg", quality=90)
    return folder


def _config(root: Path, source: Path, caption_first: bool):
    return validate({
        "run_dir": str(root), "input": {"paths": [str(source)], "url_col": "URL", "caption_col": "TEXT",
                                        "extra_cols": ["LANGUAGE"], "shard_rows": 8, "caption_first": caption_first,
                                        "where": WHERE},
        # one fetch thread: a shard's members follow the raw tar's order, which is the order fetches finish
        "download": {"allow_networks": ["127.0.0.1/32"], "thread_count": 1, "timeout": 5, "retries": 0},
        "text": {"max_caption_images": 2}, "dedupe": {"partitions": 2}, "write": {"samples_per_shard": 4}})


def _manifest(root: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((root / "manifest").glob("*.parquet")))


def _tars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").glob("*.tar"))}


@dataclass
class Laion:
    """The caption-first run of the LAION-style input, its server still up (its URLs carry the port)."""
    served: Served
    rows: list[dict]
    source: Path
    root: Path
    hits: list[str]   # the first run's requests


@pytest.fixture(scope="module")
def laion(images, tmp_path_factory, ray_session) -> Iterator[Laion]:
    folder = tmp_path_factory.mktemp("laion_run")
    with serve(images) as served:
        rows = _rows(served.base)
        source = folder / "laion.parquet"
        pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]),
                       source)
        out = run_phases(_config(folder / "first", source, True))
        assert out.ok, out.failures
        yield Laion(served, rows, source, folder / "first", list(served.hits))


@pytest.mark.slow
def test_caption_first_requests_only_rows_that_pass_and_writes_the_same_shards(laion, tmp_path):
    served, rows, source, first_hits = laion.served, laion.rows, laion.source, laion.hits
    start = len(served.hits)
    out = run_phases(_config(tmp_path / "after", source, False))
    assert out.ok, out.failures
    after_hits = served.hits[start:]

    expected = [r["URL"].removeprefix(served.base) for r in rows if r["_requested"]]
    redirects = [p for p in expected if p.startswith("/redirect")]
    assert len(first_hits) == len(expected) + len(redirects)          # the redirect's target is one more request
    assert sorted(first_hits) == sorted(expected + [p.split("to=")[1].removeprefix(served.base) for p in redirects])
    # after: every URL input.where lets through, the caption rules waiting for the download
    assert len(after_hits) == sum(bool(r["URL"]) and r["_reason"] != "input_where" for r in rows) + len(redirects)

    first, after = _manifest(laion.root), _manifest(tmp_path / "after")
    assert first.num_rows == len(rows) and after.num_rows == len(rows)
    want = Counter((r["URL"], r["TEXT"], r["_reason"]) for r in rows)
    for m in (first, after):   # the same reason, however it was reached
        assert Counter(zip(*(m.column(c).to_pylist() for c in ("url", "caption", "reason")))) == want
        assert m.column("keep").to_pylist() == [r is None for r in m.column("reason").to_pylist()]
    status = dict(zip(first.column("key").to_pylist(), first.column("status").to_pylist()))
    planned = dict(zip(first.column("key").to_pylist(), first.column("before_download").to_pylist()))
    assert {k for k, s in status.items() if s == "not_requested"} == {k for k, r in planned.items() if r}
    assert sum(s == "not_requested" for s in status.values()) == sum(
        not r["_requested"] and bool(r["URL"]) and r["_reason"] != "download_failed" for r in rows)

    assert _tars(laion.root) == _tars(tmp_path / "after")   # byte for byte
    raw_first = sum(p.stat().st_size for p in (laion.root / "raw").glob("*.tar"))
    raw_after = sum(p.stat().st_size for p in (tmp_path / "after" / "raw").glob("*.tar"))
    assert raw_first < raw_after

    stats = json.loads((laion.root / "stats.json").read_text())
    spared = stats["before_download"]
    assert spared["rows"] == sum(s == "not_requested" for s in status.values())
    assert spared["reasons"]["not_chinese"] == len(EN) + 1 and spared["reasons"]["caption_common"] == 3
    assert spared["reasons"]["input_where"] == 4 and "punsafe" not in first.column_names
    assert spared["raw_bytes_estimate"] > 0
    card = (laion.root / "shards" / "README.md").read_text()
    assert f"{spared['rows']:,} of these rows were never downloaded" in card
    assert 'id="before-download"' in (laion.root / "report.html").read_text()
    after = json.loads((tmp_path / "after" / "stats.json").read_text())
    assert after["before_download"]["reasons"] == {"input_where": 4}


def _members(root: Path) -> dict[str, bytes]:
    """Every member of the output shards by name (key.jpg, key.txt, key.json)."""
    return {name: data for tar in sorted((root / "shards").glob("*.tar"))
            for name, data in members(io.BytesIO(tar.read_bytes()))}


def _files(root: Path, folder: str) -> dict[str, tuple[bytes, int]]:
    """The files of a run folder: (bytes, mtime in ns), so a rewrite with the same bytes shows too."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((root / folder).glob("*"))}


@pytest.mark.slow
def test_loosening_requests_only_the_rows_it_newly_admits(laion, tmp_path):
    """text.min_zh_ratio=0 on the finished caption-first run: the next run requests the rows the plan
    dropped as not_chinese and nothing else, re-scores only their shards, and keeps every earlier sample."""
    root = tmp_path / "loose"
    shutil.copytree(laion.root, root)
    loose = _config(root, laion.source, True)
    loose.text.min_zh_ratio = 0.0
    # decide alone cannot fetch what the looser setting admits: refused, saying how to go on
    with pytest.raises(ConfigError, match=r"text.min_zh_ratio: planned with 0.25, now 0.0(.|\n)*curate run"):
        run_phases(loose, ("decide",))

    before = _manifest(root)
    admitted = {k for k, r in zip(before.column("key").to_pylist(), before.column("before_download").to_pylist())
                if r == "not_chinese"}
    touched = {k.split("_")[0] for k in admitted}
    assert len(admitted) == len(EN) + 1 and touched and len(touched) < len(_files(root, "raw")) // 2
    downloads, scores = _files(root, "_done/download"), _files(root, "_done/score")
    raw_tars = {n: b for n, (b, _) in _files(root, "raw").items() if n.endswith(".tar")}
    samples = _members(root)

    start = len(laion.served.hits)
    out = run_phases(loose)
    assert out.ok, out.failures
    hits = laion.served.hits[start:]
    url = dict(zip(before.column("key").to_pylist(), before.column("url").to_pylist()))
    assert sorted(hits) == sorted(url[k].removeprefix(laion.served.base) for k in admitted)   # those, once each

    after = _manifest(root)
    assert sorted(after.column("key").to_pylist()) == sorted(before.column("key").to_pylist())
    reasons = dict(zip(after.column("key").to_pylist(), after.column("reason").to_pylist()))
    was = dict(zip(before.column("key").to_pylist(), before.column("reason").to_pylist()))
    for key, reason in reasons.items():   # every row once, with its reason: the admitted ones downloaded now
        if key in admitted:
            assert reason == ("download_failed" if url[key].endswith("/status/404") else None), key
        else:
            assert reason == was[key], key
    status = dict(zip(after.column("key").to_pylist(), after.column("status").to_pylist()))
    assert {k for k, s in status.items() if s == "not_requested"} == {
        k for k, r in zip(after.column("key").to_pylist(), after.column("before_download").to_pylist()) if r}

    now = _members(root)
    assert {n: b for n, b in now.items() if n in samples} == samples   # every earlier sample, byte for byte
    assert {n.split(".")[0] for n in set(now) - set(samples)} == {k for k in admitted if reasons[k] is None}

    # shards without new rows: not downloaded again, not scored again; the others keep their images
    after_downloads, after_scores = _files(root, "_done/download"), _files(root, "_done/score")
    for name in downloads:
        shard = name.removesuffix(".json")
        same = shard not in touched
        assert (after_downloads[name] == downloads[name]) is same, shard
        assert (after_scores[name] == scores[name]) is same, shard
        tar = (root / "raw" / f"{shard}.tar").read_bytes()
        if same:
            assert tar == raw_tars[f"{shard}.tar"]
        else:
            old = dict(members(io.BytesIO(raw_tars[f"{shard}.tar"])))
            assert {n: b for n, b in members(io.BytesIO(tar)) if n in old} == old
            record = json.loads(after_downloads[name][0])["increment"]
            assert record["requested"] == sum(k.startswith(shard) for k in admitted)
            assert record["stored"] == len(old)
    plan = json.loads((root / "input_shards" / "_plan.json").read_text())["before_download"]
    assert plan["increment"]["rows"] == len(admitted) and set(plan["increment"]["admitted"]) == touched
    assert plan["text"]["min_zh_ratio"] == 0.0 and "not_chinese" not in plan["reasons"]

    start = len(laion.served.hits)   # once more: nothing left to do, nothing requested
    assert run_phases(loose).ok and laion.served.hits[start:] == []
    assert _files(root, "_done/download") == after_downloads


def test_caption_count_spans_shards_groups_and_partitions(tmp_path):
    """caption_common before download counts distinct URLs over the whole run, however the rows are cut."""
    from curate.phases.download.plan import cut
    from curate.phases.download.screen import Job, finish_group, input_rules, screen_group, shared_captions
    from curate.run.rundir import RunDir

    captions = [COMMON] * 9 + [f"{ZH[i % 12]}，{['清晨', '傍晚', '夜里'][i // 12]}" for i in range(30)]
    captions += ["两个网址共享的一句标题"] * 2
    urls = [f"http://127.0.0.1/c{i}.jpg" for i in range(9)] + [f"http://127.0.0.1/u{i}.jpg" for i in range(32)]
    urls[1] = urls[0]   # the same URL twice is one image
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"URL": urls, "TEXT": captions}), source)
    cfg = validate({"run_dir": str(tmp_path / "run"), "input": {"paths": [str(source)], "url_col": "URL",
                                                                "caption_col": "TEXT", "shard_rows": 5},
                    "text": {"max_caption_images": 7}})
    run = RunDir(cfg.run_dir)
    shards = cut(cfg.input, run)["shards"]
    groups = [shards[:3], shards[3:6], shards[6:]]
    bounds = np.array([int(g[0]) for g in groups] + [int(shards[-1]) + 1])
    job = Job(cfg, run, 5, input_rules(cfg), True, "test")
    mapped = [screen_group(job, i, g) for i, g in enumerate(groups)]   # the shuffles go through storage
    for p in range(5):
        shared_captions(job, p, len(groups), bounds)
    for g, m in enumerate(mapped):
        finish_group(job, g, m[1])
    table = pa.concat_tables(pq.read_table(run.input_shard(s)) for s in shards)
    got = {(c, u): (n, r) for c, u, n, r in zip(*(table.column(k).to_pylist()
                                               for k in ("caption", "url", "caption_urls", "before_download")))}
    assert {got[(COMMON, u)] for u in urls[:9]} == {(8, "caption_common")}   # 8 distinct URLs > 7
    assert got[("两个网址共享的一句标题", urls[-1])] == (2, None)
    assert got[(captions[9], urls[9])] == (1, None)


def test_the_plan_computes_the_caption_columns_the_score_phase_does():
    from filters.text import TextOptions, caption_columns, plain_caption_columns, segmented_columns

    captions = [*ZH, *EN, None, "", "IMG_1234.jpg", "色情网站截图", "<b>Apple</b> MacBook 笔记本 &amp; 配件"]
    opts = TextOptions()
    full, plain = caption_columns(captions, opts), plain_caption_columns(captions, opts)
    assert {**plain, **segmented_columns(plain["caption_norm"], opts)} == full


def _screen(cfg, run, shards: list[str], downloaded: frozenset[str] = frozenset()) -> dict:
    """The plan's screening tasks in this process (one group, one partition), as run_screen runs them."""
    from curate.phases.download.screen import Job, finish_group, input_rules, screen_group, shared_captions

    job = Job(cfg, run, 1, input_rules(cfg), True, "test", downloaded)
    state = screen_group(job, 0, shards)[1]
    shared_captions(job, 0, 1, np.array([0, len(shards)]))
    return finish_group(job, 0, state)["shards"]


def test_a_loosened_screen_fetches_only_the_rows_it_admits_and_keeps_every_stored_image(images, tmp_path):
    """The increment's two halves without Ray: the re-screen leaves requested rows requested and counts the
    rows newly admitted; the shard's download again fetches those alone and copies the stored images."""
    from curate.phases.download.phase import download_shard
    from curate.phases.download.plan import cut
    from curate.run.rundir import RunDir

    with serve(images) as served:
        captions = [ZH[0], EN[0], ZH[1], ZH[2], "hahahahahahahahahahaha", ZH[3]]
        source = tmp_path / "in.parquet"
        pq.write_table(pa.table({"URL": [f"{served.base}/img/p{i}.jpg" for i in range(6)], "TEXT": captions}), source)
        cfg = validate({"run_dir": str(tmp_path / "run"),
                        "input": {"paths": [str(source)], "url_col": "URL", "caption_col": "TEXT", "shard_rows": 3,
                                  "shuffle": False},
                        "download": {"allow_networks": ["127.0.0.1/32"], "thread_count": 1, "retries": 0}})
        run = RunDir(cfg.run_dir)
        shards = cut(cfg.input, run)["shards"]
        assert _screen(cfg, run, shards) == {"00000": {"reasons": {"not_chinese": 1}, "admitted": 0},
                                             "00001": {"reasons": {"not_chinese": 1}, "admitted": 0}}
        for shard in shards:
            download_shard(cfg, shard)
        assert sorted(served.hits) == sorted(f"/img/p{i}.jpg" for i in (0, 2, 3, 5))
        tars = {s: (tmp_path / "run" / "raw" / f"{s}.tar").read_bytes() for s in shards}
        raw1 = (tmp_path / "run" / "raw" / "00001.parquet").read_bytes()

        loose = cfg.model_copy(deep=True)
        loose.text.min_zh_ratio = 0.0
        # 00000: its English row is admitted; 00001: its row now fails caption_repetitive, still not requested
        assert _screen(loose, run, shards, frozenset(shards)) == {
            "00000": {"reasons": {}, "admitted": 1}, "00001": {"reasons": {"caption_repetitive": 1}, "admitted": 0}}
        raw = pq.read_table(tmp_path / "run" / "raw" / "00001.parquet")
        assert raw.column("before_download").to_pylist() == [None, "caption_repetitive", None]   # in place
        assert raw.drop_columns(["before_download"]).equals(pq.read_table(io.BytesIO(raw1)).drop_columns(
            ["before_download"]))
        served.hits.clear()
        result = download_shard(loose, "00000", "inc")
        assert served.hits == ["/img/p1.jpg"] and result["requested"] == 1 and result["stored"] == 2
    raw = pq.read_table(tmp_path / "run" / "raw" / "00000.parquet")
    assert raw.column("status").to_pylist() == ["success"] * 3
    assert raw.column("before_download").to_pylist() == [None] * 3
    old, new = dict(members(io.BytesIO(tars["00000"]))), dict(members(io.BytesIO(
        (tmp_path / "run" / "raw" / "00000.tar").read_bytes())))
    assert set(new) == {f"00000_00000{i}.jpg" for i in range(3)} and all(new[n] == b for n, b in old.items())
    marker = json.loads((tmp_path / "run" / "_done" / "download" / "00000.json").read_text())
    assert marker["increment"] == {"screen": "inc", "requested": 1, "stored": 2} and marker["not_requested"] == 0
    assert marker["hosts"]["127.0.0.1"]["requests"] == 5   # both downloads: their images and robots.txt each


def test_a_changed_input_where_is_refused_saying_why_it_cannot_be_applied_in_place(tmp_path):
    from curate.phases.download.plan import check_plan, signature
    from curate.run.rundir import RunDir

    cfg = validate({"run_dir": str(tmp_path / "run"), "input": {"paths": [str(tmp_path / "in.parquet")],
                                                                "where": WHERE}})
    run = RunDir(cfg.run_dir)
    run.storage.write_json(run.plan, {"input": signature(cfg.input)})
    check_plan(cfg.input, run)
    cfg.input.where = "punsafe < 0.9"
    with pytest.raises(ConfigError, match=r"input.where: planned with .*\n.*cut, from input columns they do not keep"):
        check_plan(cfg.input, run)
