"""Re-deciding with a new threshold touches decisions and shards only: no image is read, no score rerun."""
from __future__ import annotations

import shutil
import tarfile

import pyarrow.parquet as pq

from curate.config import load
from curate.pipeline import run_phases


def test_new_threshold_redecides_without_images_then_rewrites_shards(demo_run, tmp_path, ray_session):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    before = pq.read_table(run / "manifest").to_pandas().set_index("key")
    scores_mtime = {p: p.stat().st_mtime_ns for p in (run / "scores").glob("*.parquet")}

    # Hide every image: decide must not need them.
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for tar in (run / "raw").glob("*.tar"):
        tar.rename(hidden / tar.name)
    strict = load(run / "config.yaml", [f"run_dir={run}", "filters.min_side=400"])
    decided = (run / "decisions" / "_decided.json").read_text()
    recorded = (run / "config.yaml").read_text()
    dry = run_phases(strict, ("decide",), dry_run=True)
    assert (run / "decisions" / "_decided.json").read_text() == decided  # a dry run writes nothing
    assert (run / "config.yaml").read_text() == recorded
    outcome = run_phases(strict, ("decide",))
    assert outcome.funnel == dry.funnel
    assert outcome.funnel["dropped"]["too_small"] > before.reason.eq("too_small").sum()
    for tar in hidden.glob("*.tar"):
        tar.rename(run / "raw" / tar.name)

    run_phases(strict, ("write",))
    after = pq.read_table(run / "manifest").to_pandas().set_index("key")
    newly_small = after.index[(after.reason == "too_small") & before.keep.reindex(after.index)]
    assert len(newly_small) > 0
    assert not after.loc[newly_small, "keep"].any()
    shard_keys = set()
    for tar in (run / "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            shard_keys |= {m.name.rsplit(".", 1)[0] for m in t}
    assert shard_keys == set(after.index[after.keep])
    assert {p: p.stat().st_mtime_ns for p in (run / "scores").glob("*.parquet")} == scores_mtime
