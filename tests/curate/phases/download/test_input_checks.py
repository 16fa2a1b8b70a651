"""Input settings are checked against the input files before Ray starts: a missing column or an
input.where that cannot apply stops the run naming the setting, the column and the columns there are."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from curate import pipeline
from curate.config import ConfigError, validate

LAION = {"URL": ["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg"], "TEXT": ["一只猫", "一只狗"],
         "punsafe": [0.1, 0.9], "pwatermark": [0.2, 0.3], "LANGUAGE": ["zh", "zh"]}


def _config(tmp_path, source, **input_):
    return validate({"run_dir": str(tmp_path / "run"),
                     "input": {"paths": [str(source)], "url_col": "URL", "caption_col": "TEXT", **input_}})


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray is a test failure here: the check must come first."""
    def refuse(_cfg):
        raise AssertionError("Ray was started before the input was checked")
    monkeypatch.setattr(pipeline, "init_ray", refuse)


@pytest.fixture(params=["parquet", "csv"])
def source(request, tmp_path):
    path = tmp_path / f"laion.{request.param}"
    (pq.write_table if request.param == "parquet" else pacsv.write_csv)(pa.table(LAION), path)
    return path


def test_a_bad_expression_is_refused_when_the_config_loads(tmp_path):
    for bad in ("punsafe <", "punsafe ** 2 < 1", "__import__('os')"):
        with pytest.raises(ConfigError, match="input.where"):
            _config(tmp_path, tmp_path / "x.parquet", where=bad)


@pytest.mark.parametrize("setting, value, key", [
    ("where", "punsafe < 0.5 and nsfw_prob < 0.8", "input.where"),
    ("url_col", "url", "input.url_col"),
    ("caption_col", "caption", "input.caption_col"),
    ("extra_cols", ["LANGUAGE", "WIDTH"], "input.extra_cols")])
def test_an_unknown_column_stops_the_run_before_ray_starts(tmp_path, source, no_ray, setting, value, key):
    with pytest.raises(ConfigError) as err:
        pipeline.run_phases(_config(tmp_path, source, **{setting: value}), ("download",))
    missing = {"where": "nsfw_prob", "url_col": "url", "caption_col": "caption", "extra_cols": "WIDTH"}[setting]
    message = str(err.value)
    assert message.startswith(f"{key}: ") and repr(missing) in message
    assert "URL, TEXT, punsafe, pwatermark, LANGUAGE" in message   # the columns there are


def test_an_expression_that_does_not_fit_the_column_types_stops_the_run(tmp_path, source, no_ray):
    with pytest.raises(ConfigError, match=r"input.where .*LANGUAGE: string"):
        pipeline.run_phases(_config(tmp_path, source, where="LANGUAGE < 0.5"), ("download",))


def test_where_marks_the_rows_it_excludes_and_reads_columns_not_carried(tmp_path, source):
    from curate.phases.download.plan import plan
    from curate.run.rundir import RunDir

    cfg = _config(tmp_path, source, where="punsafe < 0.5 and pwatermark < 0.8", shuffle=False)
    (shard,) = plan(cfg.input, RunDir(cfg.run_dir))
    table = pq.read_table(tmp_path / "run" / "input_shards" / f"{shard}.parquet")
    assert table.column("where_excluded").to_pylist() == [False, True]
    assert "punsafe" not in table.column_names
