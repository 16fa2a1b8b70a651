"""Input manifests of every format become key-stable shards; bad input is named clearly."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import ConfigError, InputConfig
from curate.inputs import plan
from curate.rundir import RunDir

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
    shards = plan(InputConfig(paths=[str(path)], shard_rows=10, extra_cols=["src"]), run)
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
    plan(InputConfig(paths=[str(path)], extra_cols=["tags", "meta"]), run)
    rows = pq.read_table(run.input_shard("00000")).to_pylist()
    assert rows[0]["tags"] == ["cat", "pet"] and rows[1]["meta"] == {"w": 2, "src": "y"}


def test_globs_expand_in_order(tmp_path):
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(ROWS[i * 10:(i + 1) * 10]), tmp_path / f"part-{i}.parquet")
    run = RunDir(tmp_path / "run")
    plan(InputConfig(paths=[str(tmp_path / "part-*.parquet")], shard_rows=15), run)
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
