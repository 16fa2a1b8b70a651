"""Decide's duplicate logic on synthetic score tables: who is kept, why the rest dropped, dup_of."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.config import validate
from curate.phases.decide.phase import components, preference
from tests.synthetic_run import decide_report, decide_table
from tests.synthetic_scores import scores_table


def _cfg(**sections):
    return validate({"run_dir": "/tmp/unused", "input": {"paths": ["x.parquet"]}, **sections})


def _rows(decisions: pa.Table) -> dict[str, tuple]:
    return {r["key"]: (r["reason"], r["dup_of"]) for r in decisions.to_pylist()}


def _hashes(n: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 2**63, n, dtype=np.uint64)


def test_near_duplicates_keep_the_best_and_name_it(ray_session):
    ph = _hashes(10)
    ph[1] = ph[0] ^ np.uint64(0b111)          # 3 bits: duplicate of row 0
    ph[3] = ph[2] ^ np.uint64(0b1111111)      # 7 bits: distinct at the default distance (6)
    ph[5], ph[6] = ph[4] ^ np.uint64(0xF), ph[4] ^ np.uint64(0xF0)   # 5 and 6 are 8 apart, each 4 from 4
    aesthetic = [5.0] * 10
    aesthetic[1] = 6.0
    aesthetic[6] = 7.0
    decisions, decided = decide_report(scores_table(10, phash=ph, aesthetic=aesthetic), _cfg())
    rows = _rows(decisions)
    assert rows["00000_000000"] == ("duplicate", "00000_000001")
    assert rows["00000_000001"] == (None, None)
    assert rows["00000_000003"] == (None, None)
    assert rows["00000_000004"] == ("duplicate", "00000_000006")
    assert rows["00000_000005"] == (None, None)   # 8 bits from the kept 6: not chained in through 4
    assert decided["dedupe"]["groups"] == {"count": 2, "rows": 4, "largest": 2, "size_histogram": {"2": 2}}


def test_a_chain_of_look_alikes_is_cut_at_the_representatives_distance(ray_session):
    """Twelve distinct images, each 4 bits from the one before (a walk through hash space): every
    row lands within the distance of the row it is a duplicate of, and no group outgrows the
    representative's neighbourhood, where transitive closure would merge all twelve."""
    ph = _hashes(12)
    bits = np.random.default_rng(9).permutation(64)[:48].reshape(12, 4)
    for i in range(1, 12):
        ph[i] = ph[i - 1] ^ np.bitwise_or.reduce(np.uint64(1) << bits[i].astype(np.uint64))
    decisions, decided = decide_report(scores_table(12, phash=ph, aesthetic=list(np.linspace(5, 6, 12))), _cfg())
    index = {k: i for i, k in enumerate(decisions.column("key").to_pylist())}
    for key, (reason, dup_of) in _rows(decisions).items():
        if reason == "duplicate":
            assert bin(int(ph[index[key]] ^ ph[index[dup_of]])).count("1") <= 6
    assert 1 < decided["dedupe"]["groups"]["count"] and decided["dedupe"]["groups"]["largest"] <= 3


def test_ties_go_to_the_smaller_key_and_distance_is_configurable(ray_session):
    ph = _hashes(4)
    ph[1] = ph[0] ^ np.uint64(0b11)
    t = scores_table(4, phash=ph)
    assert _rows(decide_table(t, _cfg())[0])["00000_000001"] == ("duplicate", "00000_000000")
    assert _rows(decide_table(t, _cfg(dedupe={"phash_max_distance": 1}))[0])["00000_000001"] == (None, None)
    assert _rows(decide_table(t, _cfg(dedupe={"phash_max_distance": None}))[0])["00000_000001"] == (None, None)


def test_rows_dropped_by_a_rule_do_not_win_a_group(ray_session):
    """The better copy fails a rule; the surviving copy must stay, not be called its duplicate."""
    ph = _hashes(3)
    ph[1] = ph[0]
    t = scores_table(3, phash=ph, aesthetic=[5.0, 9.0, 5.0])
    t = t.set_column(t.schema.get_field_index("nsfw"), "nsfw", pa.array([0.0, 0.9, 0.0], pa.float32()))
    rows = _rows(decide_table(t, _cfg())[0])
    assert rows["00000_000001"] == ("nsfw", None) and rows["00000_000000"] == (None, None)


def test_exact_duplicates_keep_n_captions_per_image(ray_session):
    sha = ["a" * 64] * 5 + ["b" * 64]
    captions = ["猫在窗台", "猫在窗台", "一只橘猫", "橘猫睡觉", "窗边的猫", "别的图片"]
    t = scores_table(6, sha256=sha, captions=captions, aesthetic=[5.0, 6.0, 5.5, 5.2, 5.1, 5.0])
    one = _rows(decide_table(t, _cfg())[0])
    assert [k for k, r in one.items() if r[0] is None] == ["00000_000001", "00000_000005"]
    assert one["00000_000000"] == ("duplicate", "00000_000001")
    two = _rows(decide_table(t, _cfg(dedupe={"captions_per_image": 3}))[0])
    # best by aesthetic: 1 (猫在窗台), 2 (一只橘猫), 3 (橘猫睡觉); 0 repeats 1's caption
    assert [k for k, r in two.items() if r[0] is None] == ["00000_000001", "00000_000002", "00000_000003",
                                                           "00000_000005"]
    assert two["00000_000004"] == ("duplicate", "00000_000001")


def test_components_keep_the_best_rows_with_distinct_captions_and_route_the_rest_by_group():
    # one group {1, 2, 3, 4 (shard 1)}: each image paired with 3; preference: 3 > 1 > 4 > 2; 1 and 3 share a caption
    rows = np.array([1, 2, 3, 1 << 32 | 4])
    part = {"row": rows, "cls": rows.astype(np.uint64) + np.uint64(100), "pref": np.array([[5.0], [1.0], [9.0], [4.0]]),
            "caption": np.array([7, 8, 7, 9], np.uint64),
            "a": np.array([101, 102, 103], np.uint64), "b": np.array([103, 103, (1 << 32 | 4) + 100], np.uint64),
            "same": np.zeros(3, bool)}
    bounds = np.array([0, 1, 2])
    one, counts = components(1, 2, bounds, [part])
    assert one[0]["row"].tolist() == [1, 2] and one[0]["dup_of"].tolist() == [3, 3]
    assert one[1]["row"].tolist() == [1 << 32 | 4] and one[1]["dup_of"].tolist() == [3]
    assert counts["largest"] == 4 and counts["size_histogram"] == {"3-4": 1}
    two, _ = components(2, 2, bounds, [part])   # 3, then the best other caption: 4; 1 repeats 3's caption
    assert two[0]["row"].tolist() == [1, 2] and two[1]["row"].size == 0


def test_preference_puts_missing_scores_last():
    t = scores_table(4, aesthetic=[5.0, None, 7.0, 5.0])
    pref = preference(t, ["aesthetic", "clip_score", "pixels"])
    assert pref[:, 0].tolist() == [5.0, -np.inf, 7.0, 5.0] and pref.shape == (4, 3)


def test_semantic_duplicates_across_shards(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(8, 32)).astype(np.float32)
    emb[5] = emb[1] + 0.01 * rng.normal(size=32)   # row 5 (shard 1) is a semantic copy of row 1 (shard 0)
    emb[3] = np.nan                                 # no embedding: never grouped
    t = scores_table(8, shards=2)
    paths = {"00000": emb[0:4], "00001": emb[4:8]}
    cfg = _cfg(dedupe={"semantic_threshold": 0.95, "semantic_cluster_size": 4})
    rows = _rows(decide_table(t, cfg, embeddings=paths)[0])
    assert rows["00001_000001"] == ("duplicate", "00000_000001")
    assert sum(r[0] == "duplicate" for r in rows.values()) == 1
    assert _rows(decide_table(t, _cfg(), embeddings=paths)[0])["00001_000001"] == (None, None)


def test_decisions_are_deterministic(ray_session):
    ph = _hashes(300)
    ph[100:150] = ph[:50] ^ np.uint64(1 << 17)
    t = scores_table(300, phash=ph, shards=3)
    first, second = decide_table(t, _cfg())[0], decide_table(t, _cfg(dedupe={"partitions": 5}))[0]
    assert first.equals(second)
    assert first.column("reason").to_pylist().count("duplicate") == 50


def test_first_rules_come_before_duplicates(ray_session):
    t = scores_table(6, sha256=["a" * 64] * 6, shards=2)
    t = t.set_column(t.schema.get_field_index("status"), "status",
                     pa.array(["success", "failed_to_download"] + ["success"] * 4))
    t = t.set_column(t.schema.get_field_index("score_error"), "score_error",
                     pa.array([None, None, "decode error: truncated", None, None, None], pa.string()))
    rows = _rows(decide_table(t, _cfg(), failed_shards={"00001"})[0])
    assert [r[0] for r in rows.values()] == [None, "download_failed", "decode_error"] + ["shard_failed"] * 3
