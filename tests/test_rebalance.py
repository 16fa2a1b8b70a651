"""Style rebalance: targets met within one percentage point, deterministic to the byte."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import RebalanceConfig, validate
from curate.decide import run_decide
from curate.rebalance import keep_counts, key_hashes, rebalance
from synthetic_scores import scores_table

MIX = {"photo": 0.40, "cartoon": 0.35, "anime": 0.15, "illustration": 0.10}
TARGETS = {"cartoon": {"max_share": 0.10}, "anime": {"max_share": 0.10}, "photo": {"min_share": 0.5}}


def _styles(n: int, unlabelled: float = 0.0) -> list[str | None]:
    rng = np.random.default_rng(11)
    names = rng.choice(list(MIX), size=n, p=list(MIX.values())).tolist()
    return [None if rng.random() < unlabelled else s for s in names]


def test_keep_counts_meet_caps_and_floors():
    kept = keep_counts({"photo": 400, "cartoon": 350, "anime": 150, "illustration": 100},
                       RebalanceConfig.model_validate({"styles": TARGETS}))
    total = sum(kept.values())
    assert kept["cartoon"] <= 0.10 * total and kept["anime"] <= 0.10 * total and kept["photo"] >= 0.5 * total
    assert kept["photo"] == 400 and kept["illustration"] == 100   # nothing is dropped that need not be
    only_floor = keep_counts({"photo": 100, "cartoon": 300},
                             RebalanceConfig.model_validate({"styles": {"photo": {"min_share": 0.5}}}))
    assert only_floor == {"photo": 100, "cartoon": 100}
    absent = keep_counts({"cartoon": 300}, RebalanceConfig.model_validate({"styles": {"photo": {"min_share": 0.5}}}))
    assert absent == {"cartoon": 300}


def test_key_hashes_are_stable_and_spread():
    h = key_hashes(pa.array(["00000_000000", "00000_000001", "分片_1"]))
    assert h.tolist() == key_hashes(pa.chunked_array([["00000_000000"], ["00000_000001", "分片_1"]])).tolist()
    assert len(set(h.tolist())) == 3
    assert key_hashes(pa.array(["00000_000000"]))[0] == np.uint64(0xDFD9410324669534)
    spread = key_hashes(pa.array([f"00001_{i:06d}" for i in range(20_000)]))
    assert abs(float(np.mean(spread > np.uint64(2**63))) - 0.5) < 0.02


def test_unlabelled_rows_are_left_alone():
    style = pa.array(["cartoon", None, "cartoon", "photo", None])
    drop, report = rebalance(style, pa.array([f"k{i}" for i in range(5)]), np.ones(5, bool),
                             RebalanceConfig.model_validate({"styles": {"cartoon": {"max_share": 0.5}}}))
    assert not drop[[1, 3, 4]].any() and drop[[0, 2]].sum() == 1
    assert report == {"before": {"cartoon": 2, "photo": 1}, "after": {"cartoon": 1, "photo": 1}, "unlabelled": 2}
    _, empty = rebalance(pa.nulls(3, pa.string()), pa.array(["a", "b", "c"]), np.ones(3, bool),
                         RebalanceConfig.model_validate({"styles": {"cartoon": {"max_share": 0.5}}}))
    assert "nothing was rebalanced" in empty["note"]


@pytest.fixture(scope="module")
def run_100k(tmp_path_factory) -> tuple:
    """A run directory with raw and scores files for 100k rows in 4 shards, 5% unlabelled."""
    root = tmp_path_factory.mktemp("rebalance") / "run"
    table = scores_table(100_000, style=_styles(100_000, unlabelled=0.05), shards=4)
    raw_cols = ["key", "shard", "status", "original_width", "original_height", "width", "height", "sha256"]
    shards = sorted(set(table.column("shard").to_pylist()))
    for shard in shards:
        part = table.filter(pa.compute.equal(table.column("shard"), shard))
        for stage, cols in (("raw", raw_cols), ("scores", ["key"] + [c for c in part.column_names
                                                                    if c not in raw_cols])):
            (root / stage).mkdir(parents=True, exist_ok=True)
            pq.write_table(part.select(cols), root / stage / f"{shard}.parquet")
    cfg = validate({"run_dir": str(root), "input": {"paths": ["x.parquet"]}, "rebalance": {"styles": TARGETS}})
    return cfg, shards


def test_targets_hit_within_one_point_on_100k_rows_and_rerun_is_byte_identical(ray_session, run_100k):
    cfg, shards = run_100k
    decided = Path(cfg.run_dir) / "decisions"
    funnel = run_decide(cfg, shards, set())
    styles = json.loads((decided / "_decided.json").read_text())["styles"]
    share = {s: n / sum(styles["after"].values()) for s, n in styles["after"].items()}
    assert abs(share["cartoon"] - 0.10) <= 0.01 and abs(share["anime"] - 0.10) <= 0.01   # binding caps
    assert share["photo"] >= 0.5 - 0.01
    assert styles["unlabelled"] > 4000
    assert funnel["dropped"] == {"rebalanced": sum(styles["before"].values()) - sum(styles["after"].values())}
    first = {s: (decided / f"{s}.parquet").read_bytes() for s in shards}
    (decided / "_decided.json").unlink()
    run_decide(cfg, shards, set())
    assert {s: (decided / f"{s}.parquet").read_bytes() for s in shards} == first


def test_a_binding_floor_is_hit_within_one_point():
    style = pa.array(_styles(100_000))
    keys = pa.array([f"{i // 25_000:05d}_{i % 25_000:06d}" for i in range(100_000)])
    cfg = RebalanceConfig.model_validate({"styles": {**TARGETS, "photo": {"min_share": 0.7}}})
    drop, report = rebalance(style, keys, np.ones(100_000, bool), cfg)
    kept = pa.compute.value_counts(style.filter(pa.array(~drop))).to_pylist()
    share = {r["values"]: r["counts"] / int((~drop).sum()) for r in kept}
    assert abs(share["photo"] - 0.70) <= 0.01 and share["cartoon"] <= 0.11 and share["anime"] <= 0.11
    assert report["after"] == {r["values"]: r["counts"] for r in kept}
