"""`curate inspect`: where-expressions, column pruning, row-group sampling, datasets, tables that fit, JSON, URLs."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from curate import inspect as insp
from manifests.schema import REASONS, build
from manifests.where import WhereError, columns, compile_where
from tests.synthetic import manifest_columns

N = 5000


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("inspect") / "manifest.parquet"
    pq.write_table(build(manifest_columns(N, shards=5, seed=3)), path, row_group_size=700)
    return str(path)


@pytest.fixture(scope="module")
def run_dir(manifest, tmp_path_factory) -> str:
    """The same rows as a run's manifest dataset: manifest/{shard}.parquet, small row groups."""
    root = tmp_path_factory.mktemp("inspect-run")
    table = pq.read_table(manifest)
    (root / "manifest").mkdir()
    for shard in pc.unique(table.column("shard")).to_pylist():
        part = table.filter(pc.equal(table.column("shard"), shard))
        pq.write_table(part, root / "manifest" / f"{shard}.parquet", row_group_size=300)
    return str(root)


@pytest.fixture(scope="module")
def frame(manifest):
    return pq.read_table(manifest).to_pandas()


@pytest.mark.parametrize("expr", [
    "aesthetic < 5 and style == 'cartoon'",
    "aesthetic < 5 & style == 'cartoon'",
    "(nsfw >= 0.5) or not (clip_score > 0.25)",
    "reason in ['too_small', 'duplicate']",
    "reason not in ('too_small', 'duplicate') and keep == False",
    "1.2 < aspect_ratio <= 2",
    "original_width * original_height > 1e6",
    "reason.isnull()",
    "dup_of.notnull()",
])
def test_where_matches_pandas_query(manifest, frame, expr):
    got = insp.summarize(manifest, where=expr)
    assert got["rows"] == len(frame.query(expr, engine="python"))


def test_where_none_and_string_methods(manifest, frame):
    assert insp.summarize(manifest, where="reason == None")["rows"] == int(frame["reason"].isna().sum())
    assert insp.summarize(manifest, where="reason != None")["rows"] == int(frame["reason"].notna().sum())
    expected = int(frame["caption"].str.endswith("7").sum())
    assert insp.summarize(manifest, where="caption.str.endswith('7')")["rows"] == expected


def test_where_errors_name_the_problem():
    with pytest.raises(WhereError, match="unknown column.*'aesthetics'"):
        compile_where("aesthetics < 5", ["aesthetic"])
    with pytest.raises(WhereError, match="not a valid expression"):
        compile_where("aesthetic <", ["aesthetic"])
    with pytest.raises(WhereError, match="unknown column"):
        compile_where("__import__('os').system('true')", ["aesthetic"])
    with pytest.raises(WhereError, match="unsupported syntax"):
        compile_where("aesthetic.mean() > 1", ["aesthetic"])
    assert columns("aesthetic < 5 and style == 'cartoon' or aesthetic > 9") == ["aesthetic", "style"]


def test_reads_only_the_columns_it_needs(manifest, monkeypatch):
    read = []
    real = insp.Manifest.scan
    monkeypatch.setattr(insp.Manifest, "scan", lambda self, names: read.append(list(names)) or real(self, names))
    insp.summarize(manifest, where="caption.str.contains('猫') and aesthetic < 5")
    assert len(read) == 1
    assert "caption" in read[0] and not {"url", "key", "caption_norm", "dup_of"} & set(read[0])


def test_a_run_directory_is_its_manifest_dataset(manifest, run_dir):
    whole, dataset = insp.summarize(manifest), insp.summarize(run_dir)
    assert dataset["path"].endswith("manifest") and len(insp.open_manifest(run_dir).files) == 5
    assert {k: v for k, v in dataset.items() if k != "path"} == {k: v for k, v in whole.items() if k != "path"}
    where = "style == 'anime' and aesthetic > 5"
    assert insp.summarize(run_dir, where=where)["rows"] == insp.summarize(manifest, where=where)["rows"]
    assert insp.summarize(str(run_dir) + "/manifest")["rows"] == N


def test_sample_rows_across_files_match_the_rows(run_dir, frame):
    s = insp.summarize(run_dir, where="keep == False and nsfw > 0.2", show=9, seed=4)
    by_key = frame.set_index("key")
    assert len(s["sample"]) == 9 and len({r["key"] for r in s["sample"]}) == 9
    assert len({r["key"][:5] for r in s["sample"]}) > 1, "drawn from several files"
    for row in s["sample"]:
        assert not by_key.loc[row["key"], "keep"] and by_key.loc[row["key"], "nsfw"] > 0.2
        assert row["caption"] == by_key.loc[row["key"], "caption"]


def test_quantiles_beyond_the_sample_are_close_and_counts_exact(run_dir, frame, monkeypatch):
    monkeypatch.setattr(insp, "SAMPLE", 1500)
    s = insp.summarize(run_dir)
    got = s["quantiles"]["aesthetic"]
    assert got["count"] == frame["aesthetic"].notna().sum()
    expected = np.quantile(frame["aesthetic"].dropna(), [0.05, 0.5, 0.95])
    assert [got[k] for k in ("p5", "p50", "p95")] == pytest.approx(expected, abs=0.15)
    assert s["funnel"]["rows_in"] == N


def test_missing_targets_say_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        insp.open_manifest(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="run `curate write`"):
        insp.open_manifest(str(tmp_path))


def test_summary_funnel_quantiles_styles(manifest, frame):
    s = insp.summarize(manifest)
    assert s["rows"] == N
    assert list(s["funnel"]["dropped"]) == [r for r in REASONS if r in s["funnel"]["dropped"]]
    assert s["funnel"]["kept"] + sum(s["funnel"]["dropped"].values()) == N
    expected = np.quantile(frame["aesthetic"].dropna(), [0.01, 0.5, 0.99])
    assert [s["quantiles"]["aesthetic"][k] for k in ("p1", "p50", "p99")] == pytest.approx(expected, rel=1e-4)
    assert s["styles"] == frame["style"].value_counts().to_dict()


def test_sample_rows_come_from_the_filtered_rows(manifest, frame):
    s = insp.summarize(manifest, where="style == 'cartoon' and keep == True", show=7, seed=1)
    assert len(s["sample"]) == 7
    by_key = frame.set_index("key")
    for row in s["sample"]:
        assert by_key.loc[row["key"], "style"] == "cartoon" and by_key.loc[row["key"], "keep"]
        assert row["caption"] == by_key.loc[row["key"], "caption"]


def test_take_rows_across_row_groups(manifest, frame):
    pf = pq.ParquetFile(manifest)
    rows = np.array([4999, 0, 699, 700, 2100, 3333])
    got = insp.take_rows(pf, rows, ["key", "n_chars"]).to_pylist()
    assert [r["key"] for r in got] == frame["key"].iloc[rows].tolist()


def test_fsspec_url(manifest):
    import fsspec

    fs = fsspec.filesystem("memory")
    with open(manifest, "rb") as src, fs.open("/runs/m.parquet", "wb") as dst:
        dst.write(src.read())
    s = insp.summarize("memory:///runs/m.parquet", where="nsfw >= 0.5", show=2)
    assert s["rows"] > 0 and len(s["sample"]) == 2


def test_tables_fit_an_80_column_terminal(manifest):
    console = Console(width=80, record=True, file=io.StringIO())
    insp.render(insp.summarize(manifest, show=3), console)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "…" not in "".join(line for line in text.splitlines() if line.startswith("│ aesthetic"))


def test_cli_json_and_errors(manifest):
    from typer.testing import CliRunner

    from curate.cli import app

    result = CliRunner().invoke(app, ["inspect", manifest, "--json", "--where", "aesthetic > 6", "--show", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["where"] == "aesthetic > 6" and len(data["sample"]) == 2 and "funnel" in data
    bad = CliRunner().invoke(app, ["inspect", manifest, "--where", "aesthetics > 6"])
    assert bad.exit_code == 2 and "unknown column" in bad.output


def test_empty_result_prints_without_error(manifest):
    s = insp.summarize(manifest, where="aesthetic > 100", show=3)
    assert s["rows"] == 0 and s["funnel"]["rows_in"] == 0 and "sample" not in s
    insp.render(s, Console(width=80, file=io.StringIO()))



def test_bucket_filter_and_counts(manifest, run_dir, frame):
    s = insp.summarize(run_dir)
    kept = frame[frame.keep.astype(bool)]
    assert s["buckets"] == kept.bucket.value_counts().to_dict() and len(s["buckets"]) >= 5
    one = insp.summarize(run_dir, bucket="1216x832", where="aesthetic >= 5", show=5)
    rows = kept[(kept.bucket == "1216x832") & (kept.aesthetic >= 5)]
    assert one["rows"] == len(rows) and one["buckets"] == {"1216x832": len(rows)}
    assert one["funnel"]["kept"] == len(rows) and {r["bucket"] for r in one["sample"]} == {"1216x832"}
    out = io.StringIO()
    insp.render(s, Console(file=out, width=100))
    assert "Buckets (kept rows)" in out.getvalue() and "1216x832" in out.getvalue()
    plain = pq.read_table(manifest).drop_columns(["bucket"])
    pq.write_table(plain, manifest + ".old.parquet")
    with pytest.raises(ValueError, match=r"--bucket '1216x832': .* has no bucket column"):
        insp.summarize(manifest + ".old.parquet", bucket="1216x832")
