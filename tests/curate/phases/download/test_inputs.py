"""Input manifests of every format become key-stable shards, shuffled by URL hash or in input order;
bad input is named clearly."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import ConfigError, InputConfig
from curate.phases.download import plan as inputs
from curate.phases.download.plan import plan
from curate.run.rundir import RunDir

ROWS = [{"url": f"http://h/{i}.jpg", "caption": f"第{i}张图片，风景", "src": f"s{i}"} for i in range(25)]


def _write(tmp_path, fmt: str):
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text("url" + sep + "caption" + sep + "src\n"
                        + "".join(sep.join([r["url"], r["caption"], r["src"]]) + "\n" for r in ROWS), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_every_format_shards_the_same(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    run = RunDir(tmp_path / "run")
    shards = plan(InputConfig(paths=[str(path)], shard_rows=10, extra_cols=["src"], shuffle=False), run)
    assert shards == ["00000", "00001", "00002"]
    tables = [pq.read_table(run.input_shard(s)) for s in shards]
    assert [t.num_rows for t in tables] == [10, 10, 5]
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["key"] for r in rows[:2]] == ["00000_000000", "00000_000001"]
    assert rows[12]["key"] == "00001_000002"
    assert [r["caption"] for r in rows] == [r["caption"] for r in ROWS]
    assert [r["src"] for r in rows] == [r["src"] for r in ROWS]
    assert [r["row_id"] for r in rows[9:11]] == [9, 1 << 32]


def test_plan_is_reused_once_written(tmp_path):
    path = _write(tmp_path, "parquet")
    run = RunDir(tmp_path / "run")
    first = plan(InputConfig(paths=[str(path)], shard_rows=10), run)
    path.unlink()  # a finished split never rereads the input
    assert plan(InputConfig(paths=[str(path)], shard_rows=10), run) == first


def test_a_changed_input_against_an_existing_plan_is_refused(tmp_path):
    path = _write(tmp_path, "parquet")
    run = RunDir(tmp_path / "run")
    plan(InputConfig(paths=[str(path)], shard_rows=10), run)
    with pytest.raises(ConfigError, match=r"input.shard_rows: planned with 10, now 20(.|\n)*new run"):
        plan(InputConfig(paths=[str(path)], shard_rows=20), run)
    other = tmp_path / "other.parquet"
    other.write_bytes(path.read_bytes())
    with pytest.raises(ConfigError, match="input.paths: planned with"):
        plan(InputConfig(paths=[str(other)], shard_rows=10), run)


def test_list_and_struct_extra_columns_are_carried_as_they_are(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://h/a.jpg", "http://h/b.jpg"], "caption": ["猫", "狗"],
                             "tags": [["cat", "pet"], []], "meta": [{"w": 1, "src": "x"}, {"w": 2, "src": "y"}]}), path)
    run = RunDir(tmp_path / "run")
    plan(InputConfig(paths=[str(path)], extra_cols=["tags", "meta"], shuffle=False), run)
    rows = pq.read_table(run.input_shard("00000")).to_pylist()
    assert rows[0]["tags"] == ["cat", "pet"] and rows[1]["meta"] == {"w": 2, "src": "y"}


def test_globs_expand_in_order(tmp_path):
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(ROWS[i * 10:(i + 1) * 10]), tmp_path / f"part-{i}.parquet")
    run = RunDir(tmp_path / "run")
    plan(InputConfig(paths=[str(tmp_path / "part-*.parquet")], shard_rows=15, shuffle=False), run)
    captions = pa.concat_tables([pq.read_table(run.input_shard(s)) for s in run.shard_names()]).column("caption")
    assert captions.to_pylist() == [r["caption"] for r in ROWS[:20]]


def test_missing_column_is_named(tmp_path):
    path = _write(tmp_path, "parquet")
    with pytest.raises(ConfigError, match=r"missing column\(s\) \['alt_text'\]"):
        plan(InputConfig(paths=[str(path)], caption_col="alt_text"), RunDir(tmp_path / "run"))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="input file not found: .*nope.parquet"):
        plan(InputConfig(paths=[str(tmp_path / "nope.parquet")]), RunDir(tmp_path / "run"))


def test_extra_column_may_not_shadow_a_manifest_column(tmp_path):
    path = _write(tmp_path, "parquet")
    with pytest.raises(ConfigError, match="collide"):
        plan(InputConfig(paths=[str(path)], extra_cols=["status"]), RunDir(tmp_path / "run"))


def _planned(run: RunDir) -> list[dict]:
    return pa.concat_tables([pq.read_table(run.input_shard(s)) for s in run.shard_names()]).to_pylist()


def test_shuffle_is_a_stable_permutation_the_same_for_every_format_and_bucket_count(tmp_path, monkeypatch):
    def shuffled(fmt: str, name: str) -> list[dict]:
        run = RunDir(tmp_path / name)
        plan(InputConfig(paths=[str(_write(tmp_path, fmt))], shard_rows=10, extra_cols=["src"]), run)
        assert not run.storage.exists(run.uri("input_shards", "_shuffle"))   # the spill is cleaned up
        return _planned(run)

    first = shuffled("parquet", "a")
    assert sorted(r["src"] for r in first) == sorted(r["src"] for r in ROWS)   # nothing lost or doubled
    assert [r["src"] for r in first] != [r["src"] for r in ROWS]
    assert [r["key"] for r in first[:2]] == ["00000_000000", "00000_000001"]   # keys follow the new order
    assert shuffled("parquet", "b") == first
    assert shuffled("csv", "c") == first
    monkeypatch.setattr(inputs, "SHUFFLE_BUCKET_ROWS", 4)   # 7 buckets
    monkeypatch.setattr(inputs, "SPILL_ROWS", 3)            # a spilled run every batch or so
    assert shuffled("jsonl", "d") == first


def test_shuffle_spreads_a_sorted_hosts_urls_over_every_shard(tmp_path):
    """One host holds the first half of a sorted list: in input order it would fill the first half
    of the shards alone; shuffled, every shard holds roughly its share."""
    urls = [f"http://big.example/{i}.jpg" for i in range(500)] + \
        [f"http://host{i % 15}.example/{i}.jpg" for i in range(500)]
    path = tmp_path / "sorted.parquet"
    pq.write_table(pa.table({"url": urls, "caption": ["图"] * len(urls)}), path)
    for shuffle, lo, hi in ((False, 0, 100), (True, 30, 70)):
        run = RunDir(tmp_path / f"run-{shuffle}")
        plan(InputConfig(paths=[str(path)], shard_rows=100, shuffle=shuffle), run)
        shares = [sum("big.example" in u for u in pq.read_table(run.input_shard(s)).column("url").to_pylist())
                  for s in run.shard_names()]
        assert len(shares) == 10
        assert all(lo <= n <= hi for n in shares), shares
        if not shuffle:
            assert shares == [100] * 5 + [0] * 5


def test_a_plan_from_before_shuffle_existed_counts_as_unshuffled(tmp_path):
    path = _write(tmp_path, "parquet")
    run = RunDir(tmp_path / "run")
    plan(InputConfig(paths=[str(path)], shard_rows=10, shuffle=False), run)
    recorded = run.storage.read_json(run.plan)
    del recorded["input"]["shuffle"]
    run.storage.write_json(run.plan, recorded)
    assert plan(InputConfig(paths=[str(path)], shard_rows=10, shuffle=False), run)
    with pytest.raises(ConfigError, match="input.shuffle: planned with False, now True"):
        plan(InputConfig(paths=[str(path)], shard_rows=10), run)


GB_ROWS = [("http://h/猫.jpg", "一只橘猫趴在窗台上晒太阳"), ("http://h/面.jpg", "一碗热气腾腾的牛肉面，𠀀字也在")]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_gb18030_input_reads_with_input_encoding_and_names_file_and_line_without_it(tmp_path, fmt):
    path = tmp_path / f"gbk.{fmt}"
    if fmt == "csv":
        text = "url,caption\n" + "".join(f"{u},{c}\n" for u, c in GB_ROWS)
    else:
        text = "".join(json.dumps({"url": u, "caption": c}, ensure_ascii=False) + "\n" for u, c in GB_ROWS)
    path.write_bytes(text.encode("gb18030"))
    run = RunDir(tmp_path / "run")
    plan(InputConfig(paths=[str(path)], encoding="gb18030", shuffle=False), run)
    rows = pq.read_table(run.input_shard("00000")).to_pylist()
    assert [(r["url"], r["caption"]) for r in rows] == GB_ROWS
    first = 2 if fmt == "csv" else 1   # the csv header is ASCII
    with pytest.raises(ConfigError, match=rf"gbk.{fmt}: line {first} is not valid utf-8 text; set input.encoding"):
        plan(InputConfig(paths=[str(path)], shuffle=False), RunDir(tmp_path / "run2"))


def test_an_unknown_encoding_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown text encoding 'gbk2'"):
        InputConfig(paths=["x.csv"], encoding="gbk2")
