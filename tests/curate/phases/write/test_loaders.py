"""The demo's output through the loaders people already use: Hugging Face `datasets` (its webdataset
builder), `webdataset` and Ray Data for the shards; DuckDB, polars and pyarrow for the manifest.
Each must see exactly the kept rows, with the manifest's caption, sizes and bucket."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pyarrow.dataset as ds
from PIL import Image

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # the webdataset builder ships in the package: no hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _kept(run: Path) -> dict[str, dict]:
    table = ds.dataset(run / "manifest", format="parquet").to_table(
        columns=["key", "keep", "caption", "caption_norm", "width", "height", "bucket", "out_shard"])
    return {r["key"]: r for r in table.to_pylist() if r["keep"]}


def _tars(run: Path) -> list[str]:
    return sorted(str(p) for p in (run / "shards").glob("*.tar"))


def _images(run: Path) -> dict[str, bytes]:
    """Every sample's image bytes, read with tarfile: what each loader must hand over unchanged."""
    out = {}
    for path in _tars(run):
        with tarfile.open(path) as tar:
            out.update({m.name[:-4]: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    return out


def _check(key: str, image: bytes, caption: str, meta: dict, kept: dict[str, dict], images: dict[str, bytes]) -> None:
    row = kept[key]
    assert image == images[key]
    assert Image.open(io.BytesIO(image)).size == (row["width"], row["height"])
    assert caption == row["caption_norm"] and meta["caption"] == row["caption"]
    assert meta["caption_norm"] == row["caption_norm"] and meta["key"] == key
    assert meta["bucket"] == row["bucket"] is not None
    assert all(len(h) == 16 for h in [meta["phash"], *meta["phash_views"]]), "64-bit hashes as hex, not numbers"


def test_hugging_face_datasets_loads_the_shards(demo_run, tmp_path):
    import datasets

    loaded = datasets.load_dataset("webdataset", data_files={"train": _tars(demo_run)}, split="train",
                                   cache_dir=str(tmp_path / "hf"))
    loaded = loaded.cast_column("jpg", datasets.Image(decode=False))
    kept, images = _kept(demo_run), _images(demo_run)
    assert sorted(loaded["__key__"]) == sorted(kept)
    for sample in loaded:
        _check(sample["__key__"], sample["jpg"]["bytes"], sample["txt"], sample["json"], kept, images)


def test_webdataset_loads_the_shards(demo_run):
    import webdataset as wds

    kept, images = _kept(demo_run), _images(demo_run)
    seen = []
    for key, image, caption, meta in wds.WebDataset(_tars(demo_run), shardshuffle=False).to_tuple(
            "__key__", "jpg", "txt", "json"):
        _check(key, image, caption.decode(), json.loads(meta), kept, images)
        seen.append(key)
    assert sorted(seen) == sorted(kept)
    decoded = next(iter(wds.WebDataset(_tars(demo_run), shardshuffle=False).decode("pil").to_tuple("jpg", "json")))
    assert decoded[0].size == (decoded[1]["width"], decoded[1]["height"])


def test_ray_data_loads_the_shards(demo_run, ray_session):
    kept, images = _kept(demo_run), _images(demo_run)
    loaded = ray_session.data.read_webdataset(str(demo_run / "shards"), file_extensions=["tar"], decoder=None)
    rows = loaded.take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(kept)
    for r in rows:
        _check(r["__key__"], r["jpg"], r["txt"].decode(), json.loads(r["json"]), kept, images)


def test_the_manifest_reads_the_same_in_duckdb_polars_and_pyarrow(demo_run):
    import duckdb
    import polars as pl

    stats = json.loads((demo_run / "stats.json").read_text())
    expected = {b: n for b, n in stats["buckets"].items() if n}
    pattern = str(demo_run / "manifest" / "*.parquet")
    by_duckdb = dict(duckdb.sql(f"select bucket, count(*) from read_parquet('{pattern}') where keep "
                                f"group by bucket").fetchall())
    by_polars = dict(pl.scan_parquet(pattern).filter(pl.col("keep")).group_by("bucket").len().collect().iter_rows())
    table = ds.dataset(demo_run / "manifest", format="parquet").to_table(filter=ds.field("keep"))
    counts = table.group_by("bucket").aggregate([([], "count_all")]).to_pylist()
    by_arrow = {r["bucket"]: r["count_all"] for r in counts}
    assert by_duckdb == by_polars == by_arrow == expected and sum(expected.values()) == stats["funnel"]["kept"]
    [(rows, placed)] = duckdb.sql(f"select count(*), count(out_shard) from read_parquet('{pattern}')").fetchall()
    assert (rows, placed) == (stats["funnel"]["rows_in"], stats["shards"]["samples"])
