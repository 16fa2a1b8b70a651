"""The write phase on a synthetic decided run: exact shards, the manifest dataset, one read per raw
tar, rewrites only where the plan changed, refusal of stale decisions, failures per shard."""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from curate.phases.write import phase as write
from curate.phases.write.phase import DecisionsNotReady, finish, plan, run_write, write_group
from curate.phases.write.sample import SAMPLE_EXCLUDE
from curate.run.storage import Storage
from manifests.schema import REASONS
from tests.synthetic_write import MODELS, config, decide, decided_run, image, reasons_of

ROWS = [23, 17, 30, 5, 26, 12, 9]
SIZE = 7


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path, s3) -> str:
    """A run directory on local disk, or in a fresh bucket of the session's S3 server (found
    through the standard AWS environment variables only)."""
    return str(tmp_path / "run") if request.param == "local" else f"s3://{s3.bucket('write')}/run"


@pytest.fixture
def small_tasks(monkeypatch):
    monkeypatch.setattr(write, "ROWS_PER_TASK", 10)


@pytest.fixture
def run(tmp_path, small_tasks):
    """Seven shards (the 4th failed at download, the 5th at score) in tasks of >= 10 kept rows."""
    return decided_run(str(tmp_path / "run"), ROWS, failed_download={3}, failed_score={4})


def kept_in_order(run) -> list[tuple[str, str]]:
    """(input shard, key) of every kept row, in plan order: shard, then key."""
    out = []
    for shard in run.shard_names():
        d = run.storage.read_parquet(run.decisions(shard))
        out += [(shard, k) for k in d.filter(d.column("keep")).column("key").to_pylist()]
    return out


def tar_members(run, uri: str) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(run.storage.read_bytes(uri))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def shard_files(run) -> list[str]:
    return [n for n in run.storage.list(run.uri("shards")) if n.endswith(".tar")]


def check_shards(run, stats: dict) -> None:
    """Exact names and sizes; each shard holds its slice of the kept rows, grouped by input shard in
    raw-tar order, with the image, the sample record and the caption."""
    kept = kept_in_order(run)
    count = -(-len(kept) // SIZE)
    names = [f"train-{n:06d}.tar" for n in range(count)]
    assert shard_files(run) == names and stats["shards"] == {"count": count, "samples": len(kept), "names": names}
    raw_order = {s: [n for n, _ in tar_members(run, run.raw_tar(s))] for s in run.shard_names() if s != "00003"}
    for n, name in enumerate(names):
        members = tar_members(run, run.out_shard(name))
        chunk = kept[n * SIZE:(n + 1) * SIZE]
        assert len(members) == 3 * len(chunk) == 3 * (SIZE if n < count - 1 else len(kept) - SIZE * (count - 1))
        assert [m for m, _ in members[::3]] == [
            m for s in dict.fromkeys(s for s, _ in chunk) for m in raw_order[s] if (s, m[:-4]) in chunk]
        for (jpg, data), (js, meta), (txt, text) in zip(members[::3], members[1::3], members[2::3]):
            key = jpg[:-4]
            assert (js, txt) == (f"{key}.json", f"{key}.txt") and data == image(key)
            record = json.loads(meta)
            assert record["key"] == key and not SAMPLE_EXCLUDE & set(record)
            assert text.decode() == f"第{key}张：一只猫" and record["caption"] == text.decode()
            assert len(record["phash"]) == 16 and int(record["phash"], 16) % 2 == 1
            row = int(key.split("_")[1])
            assert record["aesthetic"] is None if row % 5 == 0 else 3 <= record["aesthetic"] <= 7
            assert record["tags"] == [f"t{row % 3}"] * (row % 3)
            assert record["meta"] == {"src": f"s{row % 2}", "rank": row}
    assert stats["funnel"]["rows_in"] == sum(ROWS) and stats["funnel"]["kept"] == len(kept)
    assert list(stats["funnel"]["dropped"]) == [r for r in REASONS if r in stats["funnel"]["dropped"]]
    assert stats["funnel"]["dropped"]["shard_failed"] == ROWS[3] + ROWS[4]
    assert stats["download_status"]["success"] + stats["download_status"]["failed_to_download"] == sum(ROWS) - ROWS[3]
    assert stats["models"] == MODELS and stats["styles"] and stats["failures"] == []
    assert "out_shard" in stats["columns"] and run.storage.read_json(run.stats) == stats


def test_shards_hold_the_kept_rows_in_plan_order(ray_session, run):
    check_shards(run, run_write(config(run, SIZE), run.shard_names()))


def test_the_manifest_is_one_dataset_for_every_reader(ray_session, run):
    import duckdb
    import polars as pl

    run_write(config(run, SIZE), run.shard_names())
    folder = run.uri("manifest")
    assert sorted(os.listdir(folder)) == [f"{s}.parquet" for s in run.shard_names()]
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.num_rows == sum(ROWS) and len(pc.unique(table.column("key"))) == sum(ROWS)
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert pa.types.is_struct(table.schema.field("meta").type)
    assert json.loads(table.schema.metadata[b"curate.models"]) == MODELS
    by_key = {r["key"]: r for r in table.select(["key", "out_shard", "tags", "meta", "reason", "status"]).to_pylist()}
    assert by_key["00002_000005"]["tags"] == ["t2", "t2"] and by_key["00002_000005"]["meta"] == {"src": "s1", "rank": 5}
    assert {r["reason"] for k, r in by_key.items() if k.startswith(("00003", "00004"))} == {"shard_failed"}
    assert all(r["status"] is None for k, r in by_key.items() if k.startswith("00003"))
    for name in shard_files(run):
        keys = {m.rsplit(".", 1)[0] for m, _ in tar_members(run, run.out_shard(name))}
        assert keys == {k for k, r in by_key.items() if r["out_shard"] == name}
    assert sum(r["out_shard"] is not None for r in by_key.values()) == len(kept_in_order(run))
    pattern = f"{folder}/*.parquet"
    [(rows, placed)] = duckdb.sql(f"select count(*), count(out_shard) from read_parquet('{pattern}')").fetchall()
    assert (rows, placed) == (sum(ROWS), len(kept_in_order(run)))
    frame = pl.scan_parquet(pattern).select("key", "tags", "meta").collect()
    assert frame.height == sum(ROWS) and frame.schema["tags"] == pl.List(pl.String)


def test_each_raw_tar_is_read_about_once(any_root, small_tasks, monkeypatch):
    """Tasks run in this process here, so that every stream the storage opens is counted."""
    run = decided_run(any_root, ROWS, failed_download={3}, failed_score={4})
    opened: list[str] = []
    real = Storage.open_input
    monkeypatch.setattr(Storage, "open_input", lambda self, uri: opened.append(uri) or real(self, uri))
    p = plan(config(run, SIZE), run.shard_names())
    assert len(p.tasks) >= 3
    markers = {}
    for task in p.tasks:
        markers.update(write_group(p.job, task).markers)
    stats = finish(config(run, SIZE), p, markers, [])
    tars = [u for u in opened if u.endswith(".tar")]
    readable = [run.raw_tar(s) for s in run.shard_names() if s != "00003"]
    assert set(tars) <= set(readable) and all(tars.count(u) <= 2 for u in tars)
    assert len(tars) <= len(readable) + len(p.tasks) - 1, "one read per tar, one more per task boundary at most"
    check_shards(run, stats)
    fs, folder = run.storage.resolve(run.uri("manifest"))
    table = ds.dataset(folder, filesystem=fs, format="parquet").to_table()
    dropped = sum(ROWS) - stats["shards"]["samples"]
    assert table.num_rows == sum(ROWS) and table.column("out_shard").null_count == dropped


def _outputs(run) -> list[Path]:
    """Every output tar and its marker."""
    return [Path(run.uri("shards", n)) for n in shard_files(run)] + list(Path(run.uri("_done",
                                                                                      "shards")).glob("*.json"))


def _age(run) -> None:
    for p in _outputs(run):
        os.utime(p, ns=(10**9, 10**9))


def _touched(run) -> set[str]:
    """Names of the outputs written since `_age`."""
    return {p.name for p in _outputs(run) if p.stat().st_mtime_ns != 10**9}


def test_only_shards_whose_content_changed_are_rewritten(ray_session, run):
    cfg = config(run, SIZE)
    run_write(cfg, run.shard_names())
    _age(run)
    run_write(cfg, run.shard_names())
    assert _touched(run) == set(), "an unchanged plan rewrites nothing"

    old = kept_in_order(run)
    reasons = {s: reasons_of(i, n) for i, (s, n) in enumerate(zip(run.shard_names(), ROWS))}
    reasons["00003"] = reasons["00004"] = None
    why = reasons["00005"]                      # swap one kept and one dropped row: same count
    k, d = why.index(None), next(i for i, r in enumerate(why) if r == "too_small")
    why[k], why[d] = "too_small", None
    decide(run, {s: r if r is not None else ["shard_failed"] * n for (s, r), n in zip(reasons.items(), ROWS)})
    run_write(cfg, run.shard_names())
    kept = kept_in_order(run)
    changed = {f"train-{n:06d}" for n in range(len(kept) // SIZE + 1)
               if kept[n * SIZE:(n + 1) * SIZE] != old[n * SIZE:(n + 1) * SIZE]}
    assert changed and len(changed) < len(shard_files(run))
    assert _touched(run) == {f"{n}.tar" for n in changed} | {f"{n}.json" for n in changed}
    for n, name in enumerate(shard_files(run)):
        got = {m[:-4] for m, _ in tar_members(run, run.out_shard(name))[::3]}
        assert got == {k for _, k in kept[n * SIZE:(n + 1) * SIZE]}

    before = shard_files(run)
    decide(run, {s: ["too_small"] * n for s, n in zip(run.shard_names(), ROWS[:5])} |
           {s: reasons_of(i + 5, n) for i, (s, n) in enumerate(zip(run.shard_names()[5:], ROWS[5:]))})
    stats = run_write(cfg, run.shard_names())
    assert len(shard_files(run)) == stats["shards"]["count"] < len(before)
    assert sorted(p.stem for p in Path(run.uri("_done", "shards")).glob("*.json")) == \
        [n[:-4] for n in shard_files(run)], "the markers of deleted shards go too"


def test_missing_or_stale_decisions_are_refused(run):
    cfg = config(run, SIZE)
    marker = Path(run.marker("decide", "00002"))
    saved = marker.read_text()
    marker.write_text(json.dumps({**json.loads(saved), "attempt": "older"}))
    with pytest.raises(DecisionsNotReady, match="another decide attempt.*_done/decide/00002.json"):
        plan(cfg, run.shard_names())
    marker.unlink()
    with pytest.raises(DecisionsNotReady, match="no decisions marker.*00002.json"):
        plan(cfg, run.shard_names())
    marker.write_text(saved)
    Path(run.decided).unlink()
    with pytest.raises(DecisionsNotReady, match="_decided.json is missing"):
        plan(cfg, run.shard_names())


@pytest.mark.parametrize(("any_root", "damage"), [("local", "cut"), ("local", "garbled"), ("s3", "cut")],
                         indirect=["any_root"])
def test_a_broken_raw_tar_fails_its_task_names_its_shard_and_loses_its_download(ray_session, any_root, small_tasks,
                                                                                 damage):
    """Cut in half, or the same size with its headers garbled: the task reading it fails, failures.json
    names the shard, the shard's markers from download on go (so the next run fetches it again), and
    shards/, stats.json and the card hold only what was written (no half-written tar, on S3 either)."""
    run = decided_run(any_root, ROWS, failed_download={3}, failed_score={4})
    data = run.storage.read_bytes(run.raw_tar("00006"))
    run.storage.write_bytes(run.raw_tar("00006"), data[:len(data) // 2] if damage == "cut" else
                            bytes(b ^ 0x5A for b in data))
    stats = run_write(config(run, SIZE), run.shard_names())
    assert stats["failures"] == run.storage.read_json(run.file("failures.json"))
    broken = [f for f in stats["failures"] if f["error"].startswith("raw shard 00006 is broken")]
    assert [(f["phase"], f["shard"]) for f in broken] == [("write", "00006")]
    assert "downloaded again by the next `curate run`" in broken[0]["error"]
    others = [f for f in stats["failures"] if f not in broken]
    assert others and all(f["error"] == "not written: raw shard 00006 is broken" for f in others)
    for phase in ("download", "score", "decide", "write"):
        assert "00006" not in run.done(phase), phase
    assert not {f["shard"] for f in others} & run.done("write")
    assert "00000" in run.done("write") and run.storage.exists(run.out_shard("train-000000.tar"))
    on_disk = shard_files(run)
    assert on_disk == stats["shards"]["names"] and set(stats["shards"]["not_written"]).isdisjoint(on_disk)
    assert sorted(n[:-4] for n in on_disk) == sorted(run.done("shards")), "no tar without its marker"
    card = run.storage.read_text(run.out_shard("README.md"))
    assert "**Incomplete:" in card and "`00006`" in card
    assert f"in {len(on_disk)} WebDataset shards" in card


def test_a_changed_prefix_removes_the_old_shards(ray_session, run):
    run_write(config(run, SIZE), run.shard_names())
    before = shard_files(run)
    stats = run_write(config(run, SIZE, prefix="zh"), run.shard_names())
    assert shard_files(run) == stats["shards"]["names"] == [n.replace("train-", "zh-") for n in before]
    assert sorted(run.done("shards")) == [n[:-4] for n in shard_files(run)]
    card = Path(run.out_shard("README.md")).read_text(encoding="utf-8")
    assert f"in {len(before)} WebDataset shards" in card


def test_plan_tasks_own_every_output_shard_once_and_read_the_shards_it_needs():
    """Random counts in several streams (buckets): every output shard is owned by exactly one task,
    which reads every input shard holding its rows, and no tail shard without one."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        n_shards, n_streams = int(rng.integers(1, 25)), int(rng.integers(1, 5))
        kept = rng.integers(0, 12, (n_shards, n_streams)) * (rng.random((n_shards, n_streams)) < 0.6)
        size, per_task = int(rng.integers(1, 15)), int(rng.integers(1, 40))
        shards = [f"{i:05d}" for i in range(n_shards)]
        tasks = write.plan_tasks(shards, kept, size, per_task)
        starts = np.vstack([np.zeros((1, n_streams), np.int64), np.cumsum(kept, axis=0)])
        total = starts[-1]
        assert [s for t in tasks for s in t.shards] == shards
        owned = [(k, n) for t in tasks for k, (a, b) in enumerate(t.spans) for n in range(a, b)]
        assert sorted(owned) == [(k, n) for k in range(n_streams) for n in range(-(-int(total[k]) // size))]
        for t in tasks:
            needed: set[str] = set()
            for k, (a, b) in enumerate(t.spans):
                for n in range(a, b):
                    needed |= {shards[j] for j in range(n_shards)
                               if kept[j, k] and starts[j, k] < (n + 1) * size and starts[j + 1, k] > n * size}
            assert needed <= set(t.shards + t.tail) and set(t.tail) <= needed
            assert all(t.starts[s] == starts[int(s)].tolist() for s in t.shards + t.tail)
            assert t.kept == sum(min((n + 1) * size, int(total[k])) - n * size
                                 for k, (a, b) in enumerate(t.spans) for n in range(a, b))


BUCKET_OF = {(8, 8): "1024x1024", (12, 8): "1216x832", (8, 12): "832x1216", (16, 8): "1344x768", (6, 14): "640x1536"}


def _manifest(run) -> list[dict]:
    """The manifest's rows by key, NaN as None (so that rows compare equal)."""
    rows = ds.dataset(run.uri("manifest"), format="parquet").to_table().sort_by("key").to_pylist()
    return [{k: None if isinstance(v, float) and v != v else v for k, v in r.items()} for r in rows]


def _samples(run) -> dict[str, dict[str, tuple]]:
    """Output shard -> key -> (jpg, json, txt) bytes."""
    out = {}
    for name in shard_files(run):
        members = tar_members(run, run.out_shard(name))
        out[name] = {jpg[:-4]: (data, meta, text) for (jpg, data), (_, meta), (_, text)
                     in zip(members[::3], members[1::3], members[2::3])}
    return out


def test_grouping_by_bucket_changes_only_the_shard_names(ray_session, run):
    """Write the same decided run flat, grouped by bucket, then flat again: the same rows, samples and
    manifest (out_shard aside); grouped shards hold one bucket each, exact sizes but each bucket's last."""
    flat = run_write(config(run, SIZE), run.shard_names())
    flat_manifest, flat_samples = _manifest(run), _samples(run)
    by_key = {r["key"]: r for r in flat_manifest}
    for r in flat_manifest:
        expected = None if r["width"] is None else BUCKET_OF.get((r["width"], r["height"]))
        assert r["bucket"] == (expected if r["keep"] else r["bucket"]) and (r["width"] is None) == (r["bucket"] is None)
    kept = [r for r in flat_manifest if r["keep"]]
    assert flat["buckets"] == {b: sum(r["bucket"] == b for r in kept) for b in
                               ["1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344",
                                "1536x640", "640x1536"]} | {"unbucketed": sum(r["bucket"] is None for r in kept)}
    assert 0 < flat["buckets"]["640x1536"] < SIZE < flat["buckets"]["1024x1024"] and flat["buckets"]["unbucketed"]

    grouped = run_write(config(run, SIZE, group_by_bucket=True), run.shard_names())
    names = shard_files(run)
    assert sorted(names) == sorted(grouped["shards"]["names"]) and grouped["shards"]["count"] == len(names)
    assert all(re.fullmatch(r"train-(\d+x\d+|unbucketed)-\d{6}\.tar", n) for n in names), "no flat shard lingers"
    assert sorted(p.stem for p in Path(run.uri("_done", "shards")).glob("*.json")) == sorted(n[:-4] for n in names)
    samples = _samples(run)
    assert sum(len(s) for s in samples.values()) == grouped["shards"]["samples"] == len(kept)
    assert {k: v for s in samples.values() for k, v in s.items()} == \
        {k: v for s in flat_samples.values() for k, v in s.items()}, "the same samples, byte for byte"
    order = [k for _, k in kept_in_order(run)]
    for bucket in {n.rsplit("-", 1)[0].split("-", 1)[1] for n in names}:
        mine = sorted(n for n in names if n.startswith(f"train-{bucket}-"))
        assert mine == [f"train-{bucket}-{i:06d}.tar" for i in range(len(mine))]
        rows = [k for k in order if (by_key[k]["bucket"] or "unbucketed") == bucket]
        for i, name in enumerate(mine):
            assert set(samples[name]) == set(rows[i * SIZE:(i + 1) * SIZE])
            assert {json.loads(meta)["bucket"] or "unbucketed" for _, meta, _ in samples[name].values()} == {bucket}
        assert all(len(samples[n]) == SIZE for n in mine[:-1]) and 0 < len(samples[mine[-1]]) <= SIZE
    manifest = _manifest(run)
    assert [{**r, "out_shard": None} for r in manifest] == [{**r, "out_shard": None} for r in flat_manifest]
    assert all(r["key"] in samples[r["out_shard"]] for r in manifest if r["keep"])
    assert {k: v for k, v in grouped.items() if k != "shards"} == {k: v for k, v in flat.items() if k != "shards"}

    again = run_write(config(run, SIZE), run.shard_names())
    assert again == flat and shard_files(run) == flat["shards"]["names"] and _samples(run) == flat_samples
    assert _manifest(run) == flat_manifest


def test_without_buckets_the_column_is_null_and_the_stats_say_so(ray_session, run):
    stats = run_write(config(run, SIZE, buckets=None), run.shard_names())
    assert stats["buckets"] is None and all(r["bucket"] is None for r in _manifest(run))
    for samples in _samples(run).values():
        assert all(json.loads(meta)["bucket"] is None for _, meta, _ in samples.values())
