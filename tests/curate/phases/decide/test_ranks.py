"""Thresholds by rank: `pNN` resolves over the whole run from per-shard histograms, drops within half a
point of its rank among the rows that reach its rule, and a re-decide reproduces it exactly."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from curate.config import validate
from manifests import ranks
from tests.synthetic_run import enable_scored, write_scored_run
from tests.synthetic_scores import scores_table

N, SHARDS = 100_000, 40


def test_rank_syntax():
    assert ranks.parse("p30") == ranks.Rank(30.0) and ranks.parse(0.3) is None and ranks.parse(None) is None
    assert ranks.parse("p99.5 by LANGUAGE") == ranks.Rank(99.5, "LANGUAGE")
    with pytest.raises(ValueError, match="not a rank"):
        ranks.parse("30%")


def test_a_cut_is_exact_about_what_it_drops_and_near_its_rank():
    rng = np.random.default_rng(1)
    v = rng.normal(0.3, 0.05, 50_000)
    cuts = ranks.edges(v.min(), v.max(), False)
    hist = sum(ranks.counts(part, cuts) for part in np.array_split(v, 7))   # merged in any order
    for drops, q in (("below", 30), ("at_or_above", 99), ("above", 90)):
        got = ranks.resolve(hist, cuts, ranks.Rank(q), drops, False)
        fails = {"below": v < got["value"], "at_or_above": v >= got["value"], "above": v > got["value"]}[drops]
        assert got["dropped"] == int(fails.sum())            # the recorded count is the true one
        target = q / 100 if drops == "below" else 1 - q / 100
        assert abs(got["share"] - target) <= 0.5 * got["bin_rows"] / len(v) + 1e-9
    sizes = rng.integers(100, 2000, 10_000).astype(float)   # integers: one bin per value, integer thresholds
    cuts = ranks.edges(sizes.min(), sizes.max(), True)
    got = ranks.resolve(ranks.counts(sizes, cuts), cuts, ranks.Rank(25), "below", True)
    assert got["value"] == int(got["value"]) and got["dropped"] == int((sizes < got["value"]).sum())


def _table() -> pa.Table:
    rng = np.random.default_rng(0)
    style = rng.choice(["photo", "cartoon", "painting"], N, p=[0.6, 0.3, 0.1])
    aesthetic = rng.normal(5.0, 1.0, N) + np.where(style == "cartoon", 1.0, 0.0)   # styles score differently
    t = scores_table(N, shards=SHARDS, aesthetic=aesthetic.astype(np.float32), style=style.tolist(),
                     captions=[f"第{i}张" for i in range(N)])
    for name, values in (("clip_score", rng.normal(0.28, 0.04, N)), ("nsfw", rng.beta(1, 30, N))):
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values.astype(np.float32)))
    return t


@pytest.mark.slow
def test_percentile_thresholds_drop_their_rank_and_redecide_reproduces_them(tmp_path, ray_session):
    from curate.phases.decide.phase import run_decide

    table = _table()
    run = write_scored_run(str(tmp_path), table)
    data = {"run_dir": str(tmp_path), "input": {"paths": ["unused.parquet"], "shard_rows": N // SHARDS},
            "filters": {"nsfw_max": "p99", "clip_min": "p30", "aesthetic_min": "p25 by style"},
            "text": {"min_chars": 1}, "dedupe": {"phash_max_distance": None}}
    cfg = validate(data)
    cfg.models = enable_scored(cfg, table)
    run_decide(cfg, run)
    decided = json.loads((tmp_path / "decisions" / "_decided.json").read_text())
    reason = np.array(pa.concat_tables(run.storage.read_parquet(run.decisions(s)) for s in run.shard_names())
                      .column("reason").to_pylist(), object)

    def share(name: str, among: np.ndarray) -> float:
        return float((reason[among] == name).mean())

    everyone = np.ones(N, bool)
    assert abs(share("nsfw", everyone) - 0.01) <= 0.005
    reach_clip = reason != "nsfw"                                  # the rows that got as far as low_clip
    assert abs(share("low_clip", reach_clip) - 0.30) <= 0.005
    reach_aesthetic = reach_clip & (reason != "low_clip")
    style = np.array(table.column("style").to_pylist(), object)
    for s in ("photo", "cartoon", "painting"):                     # a threshold per style
        assert abs(share("low_aesthetic", reach_aesthetic & (style == s)) - 0.25) <= 0.005, s
    values = {g: found["value"] for g, found in decided["thresholds"]["filters.aesthetic_min"]["values"]}
    assert values["cartoon"] > values["photo"] + 0.5              # cartoons score a point higher here
    clip = decided["thresholds"]["filters.clip_min"]
    scores = table.column("clip_score").to_numpy().astype(np.float64)
    assert clip["dropped"] == int((scores[reach_clip] < clip["value"]).sum()) == int((reason == "low_clip").sum())

    cfg2 = validate({**data, "dedupe": {"phash_max_distance": None, "partitions": 7}})   # a new decide run
    cfg2.models = cfg.models
    run_decide(cfg2, run)
    again = json.loads((tmp_path / "decisions" / "_decided.json").read_text())
    assert again["fingerprint"] != decided["fingerprint"]
    assert again["thresholds"] == decided["thresholds"] and again["funnel"] == decided["funnel"]
    reason2 = pa.concat_tables(run.storage.read_parquet(run.decisions(s)) for s in run.shard_names()).column("reason")
    assert reason2.to_pylist() == reason.tolist()
