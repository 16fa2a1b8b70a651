"""Style rebalance: targets met within one percentage point, deterministic to the byte."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.config import ConfigError, RebalanceConfig, validate
from curate.phases.decide.rebalance import keep_counts, key_hashes, style_labels
from tests.synthetic_run import decide_table
from tests.synthetic_scores import scores_table

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


def _decide(styles: list, targets: dict, shards: int = 1) -> tuple[pa.Table, dict]:
    table = scores_table(len(styles), style=styles, shards=shards)
    return decide_table(table, validate({"run_dir": "/tmp/unused", "input": {"paths": ["x.parquet"]},
                                         "rebalance": {"styles": targets}}))


def test_unlabelled_rows_are_left_alone(ray_session):
    decisions, report = _decide(["cartoon", None, "cartoon", "photo", None], {"cartoon": {"max_share": 0.5}})
    reason = decisions.column("reason").to_pylist()
    assert reason[1] is None and reason[3] is None and reason[4] is None
    assert sorted(reason[i] or "" for i in (0, 2)) == ["", "rebalanced"]
    assert report == {"before": {"cartoon": 2, "photo": 1}, "after": {"cartoon": 1, "photo": 1}, "unlabelled": 2}
    _, empty = _decide([None] * 3, {"cartoon": {"max_share": 0.5}})
    assert "nothing was rebalanced" in empty["note"]


@pytest.mark.slow
def test_targets_hit_within_one_point_on_100k_rows_and_rerun_is_identical(ray_session):
    styles = _styles(100_000, unlabelled=0.05)
    first, report = _decide(styles, TARGETS, shards=4)
    share = {s: n / sum(report["after"].values()) for s, n in report["after"].items()}
    assert abs(share["cartoon"] - 0.10) <= 0.01 and abs(share["anime"] - 0.10) <= 0.01   # binding caps
    assert share["photo"] >= 0.5 - 0.01
    assert report["unlabelled"] > 4000
    kept = pa.compute.value_counts(pa.array(styles).filter(first.column("keep"))).to_pylist()
    assert {r["values"]: r["counts"] for r in kept if r["values"]} == report["after"]   # exact counts
    reasons = first.column("reason").to_pylist()
    assert reasons.count("rebalanced") == sum(report["before"].values()) - sum(report["after"].values())
    assert _decide(styles, TARGETS, shards=4)[0].equals(first)


def test_a_binding_floor_is_hit_within_one_point(ray_session):
    styles = _styles(100_000)
    decisions, report = _decide(styles, {**TARGETS, "photo": {"min_share": 0.7}}, shards=4)
    kept = pa.compute.value_counts(pa.array(styles).filter(decisions.column("keep"))).to_pylist()
    total = sum(r["counts"] for r in kept)
    share = {r["values"]: r["counts"] / total for r in kept}
    assert abs(share["photo"] - 0.70) <= 0.01 and share["cartoon"] <= 0.11 and share["anime"] <= 0.11
    assert report["after"] == {r["values"]: r["counts"] for r in kept}


def test_style_labels_come_from_the_configured_source():
    t = pa.table({"style": ["anime", None, "photo"], "graphic": pa.array([0.9, 0.1, None], pa.float32()),
                  "site_category": ["漫画", "摄影", "其他"]})
    labels = lambda **kw: style_labels(t, RebalanceConfig.model_validate(kw)).to_pylist()  # noqa: E731
    assert labels() == ["anime", None, "photo"]
    assert labels(style_source="graphic") == ["graphic", "photo", None]
    assert labels(style_source="graphic", graphic_threshold=0.95) == ["photo", "photo", None]
    assert labels(style_source="column", style_column="site_category",
                  style_map={"漫画": "cartoon", "摄影": "photo"}) == ["cartoon", "photo", None]


def test_a_style_column_must_be_named_and_carried():
    with pytest.raises(ValueError, match="needs style_column"):
        RebalanceConfig.model_validate({"style_source": "column"})
    base = {"run_dir": "/tmp/unused", "input": {"paths": ["x.parquet"]},
            "rebalance": {"style_source": "column", "style_column": "site"}}
    with pytest.raises(ConfigError, match="input.extra_cols"):
        validate(base)
    carried = {**base, "input": {"paths": ["x.parquet"], "extra_cols": ["site"]}}
    assert validate(carried).rebalance.style_column == "site"


def test_graphic_labels_rebalance_through_decide(ray_session):
    """style_source graphic: the CPU score is the label, the cap is met, decisions name the label."""
    rng = np.random.default_rng(2)
    graphic = rng.uniform(0, 1, 2_000)
    table = scores_table(2_000, shards=2).append_column("graphic", pa.array(graphic, pa.float32()))
    cfg = validate({"run_dir": "/tmp/unused", "input": {"paths": ["x.parquet"]},
                    "rebalance": {"style_source": "graphic", "styles": {"graphic": {"max_share": 0.2}}}})
    decisions, report = decide_table(table, cfg)
    drawn = int((graphic >= cfg.rebalance.graphic_threshold).sum())
    assert report["before"] == {"graphic": drawn, "photo": 2_000 - drawn}
    assert abs(report["after"]["graphic"] / sum(report["after"].values()) - 0.2) <= 0.01
    kept = decisions.filter(decisions.column("keep")).column("style_label").to_pylist()
    assert kept.count("graphic") == report["after"]["graphic"] and kept.count("photo") == 2_000 - drawn
