"""Near-duplicate search: the pigeonhole bands find every pair a brute force finds under the
matching rule, and the view hashes at the default distance separate copies from distinct images."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from bench.bench_near_dup import near_dup_quality
from bench.scenes import is_geometric, natural
from curate.config import DedupeConfig
from curate.phases.decide.dedupe import (
    MAX_BUCKET,
    bounded_groups,
    class_keys,
    components,
    home_nodes,
    partition_of,
    partition_pairs,
    route,
    split,
)
from filters.multihash import MATCHES, VIEWS, view_hashes
from filters.phash import equal_key_pairs, hamming, near_pairs_in_band, roots, split_bits, without_band


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    root = np.arange(n)
    nodes, best = roots(edges)
    root[nodes] = best
    return root


def _node(hashes: np.ndarray, valid: np.ndarray, sha: np.ndarray | None = None) -> dict:
    n = len(hashes)
    return {"row": np.arange(n), "pref": np.zeros((n, 1)), "caption": np.zeros(n, np.uint64),
            "sha": sha if sha is not None else np.zeros(n, np.uint64),
            "phash": hashes if hashes.ndim == 2 else hashes[:, None], "phash_valid": valid}


def _search(node: dict, k: int | None, partitions: int, exact: bool = False, cap: int = MAX_BUCKET,
            ) -> tuple[list[dict], list[dict], list[dict]]:
    """Route one group of rows and search every partition, as decide does: (pairs per partition,
    counts per partition, class slices)."""
    search, classes = route([node], exact, k, 1, partitions)
    out = [partition_pairs(k, None, cap, 10, [part]) for part in search]
    return [o[0] for o in out], [o[1] for o in out], classes


def _class_pairs(node: dict, k: int | None, partitions: int, cap: int = MAX_BUCKET) -> set:
    pairs, _, _ = _search(node, k, partitions, cap=cap)
    return {(a, b) for p in pairs for a, b, same in zip(p["a"].tolist(), p["b"].tolist(), p["same"].tolist())
            if not same}


def _expected(node: dict, close: np.ndarray, i: np.ndarray, j: np.ndarray) -> set:
    """Class pairs of the row pairs (i, j) that match, between different classes."""
    cls = class_keys(node, False, True)
    a, b = cls[i[close]], cls[j[close]]
    return {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist()) if x != y}


def test_bit_helpers_cover_and_remove_bands():
    for parts in range(1, 10):
        spans = split_bits(64, parts)
        assert sum(w for _, w in spans) == 64 and spans[0][0] == 0
        assert max(w for _, w in spans) - min(w for _, w in spans) <= 1
    h = np.array([0xF0F0_1234_5678_9ABC], np.uint64)
    assert without_band(h, 0, 8)[0] == 0xF0F0_1234_5678_9ABC >> 8
    assert without_band(h, 56, 8)[0] == 0xF0_1234_5678_9ABC
    assert without_band(h, 8, 8)[0] == (0xF0F0_1234_5678_9ABC >> 16) << 8 | 0xBC


def test_equal_key_pairs_is_every_pair_of_each_run():
    keys = np.sort(np.random.default_rng(1).integers(0, 30, 200))
    i, j = equal_key_pairs(keys)
    expected = {(a, b) for a, b in combinations(range(len(keys)), 2) if keys[a] == keys[b]}
    assert set(zip(i.tolist(), j.tolist())) == expected and len(i) == len(expected)


@pytest.mark.parametrize("k", [0, 2, 4, 8])
def test_bands_find_what_brute_force_finds(k):
    """Clusters of hashes 0..k+2 bits apart: the pairs found are exactly the all-pairs ones."""
    rng = np.random.default_rng(k)
    centres = rng.integers(0, 2**63, 150, dtype=np.uint64)
    hashes = []
    for c in centres:
        for _ in range(int(rng.integers(1, 5))):
            bits = rng.choice(64, size=int(rng.integers(0, k + 3)), replace=False).astype(np.uint64)
            hashes.append(c ^ np.bitwise_or.reduce(np.uint64(1) << bits) if bits.size else c)
    hashes = np.array(hashes, np.uint64)
    node = _node(hashes, np.ones(len(hashes), bool))
    i, j = np.triu_indices(len(hashes), 1)
    expected = _expected(node, hamming(hashes[i], hashes[j]) <= k, i, j)
    assert _class_pairs(node, k, partitions=3) == expected
    assert (len(expected) > 0) == (k > 0)   # at distance 0 every match is an equal hash: one class


def test_a_bucket_over_the_cap_is_split_not_skipped():
    """Hashes that share a band and most of the other bits (a flat, common layout): at a cap of 2
    every bucket overflows, and the further split levels still find every pair brute force finds."""
    rng = np.random.default_rng(5)
    common = rng.integers(0, 2**63, dtype=np.uint64) & ~np.uint64(0xFFFFF)
    hashes = np.unique(common | rng.integers(0, 1 << 20, 200).astype(np.uint64))   # 200 in one low-bits field
    anchor = np.ones(len(hashes), bool)
    i, j = np.triu_indices(len(hashes), 1)
    close = hamming(hashes[i], hashes[j]) <= 6
    brute = set(zip(i[close].tolist(), j[close].tolist()))
    for offset, width in split_bits(64, 7)[-1:]:           # a band inside the shared bits: one level-1 bucket
        pairs, split_buckets = near_pairs_in_band(hashes, anchor, offset, width, 6, max_bucket=2)
        assert split_buckets > 0
        assert set(zip(pairs[0].tolist(), pairs[1].tolist())) == brute and brute
    node = _node(hashes, anchor)
    assert _class_pairs(node, 6, 2, cap=2) == _class_pairs(node, 6, 2) == _expected(node, close, i, j)


def test_invalid_hashes_never_group():
    hashes = np.array([7, 7, 7, 0], np.uint64)
    node = _node(hashes, np.array([True, False, True, False]))
    cls = class_keys(node, False, True)
    assert cls[0] == cls[2] and len(set(cls.tolist())) == 3   # equal hashes: one image; invalid: alone
    assert _class_pairs(node, 4, 2) == set()


def test_equal_sha256_rows_are_one_image_and_unequal_hashes_of_equal_bytes_chain():
    sha = np.array([3, 1, 3, 0, 1, 0, 3], np.uint64)          # 0: no hash, never grouped
    hashes = np.random.default_rng(1).integers(0, 2**63, 7, dtype=np.uint64)   # far apart: no near pairs
    node = _node(hashes, np.ones(7, bool), sha=sha)
    cls = class_keys(node, True, False)                       # exact dedup alone: the class is the sha256
    assert cls[0] == cls[2] == cls[6] and cls[1] == cls[4] and len(set(cls.tolist())) == 4
    pairs, _, _ = _search(node, 4, 3, exact=True)             # near on: classes by hash, equal bytes chained
    same = sum(int(p["same"].sum()) for p in pairs)
    assert same == 3 and sum(len(p["a"]) for p in pairs) == 3  # (3 - 1) + (2 - 1) edges, never all pairs


@pytest.mark.parametrize("k", [2, 6])
def test_view_hashes_group_exactly_as_the_matching_rule_says(k):
    """Rows of 12 view hashes, with near pairs planted anchor-to-window, window-to-window (which
    the rule does not count) and anchor-to-anchor, some hashes shared by several rows: the
    pairs found are those of the rule applied to every pair by brute force."""
    rng = np.random.default_rng(k)
    n, v = 240, len(VIEWS)
    hashes = rng.integers(0, 2**63, (n, v), dtype=np.uint64)
    for r in range(0, n - 1, 2):
        a, b = rng.integers(0, v, 2)
        bits = rng.choice(64, size=int(rng.integers(0, k + 3)), replace=False).astype(np.uint64)
        flip = np.bitwise_or.reduce(np.uint64(1) << bits) if bits.size else np.uint64(0)
        hashes[r + 1, b] = hashes[r, a] ^ flip
    hashes[-5:, 3] = hashes[0, 3]                      # one window hash shared by five rows and row 0
    i, j = np.triu_indices(n, 1)
    close = np.zeros(len(i), bool)
    for a, b in zip(*np.nonzero(MATCHES)):
        close |= hamming(hashes[i, a], hashes[j, b]) <= k
    node = _node(hashes, np.ones(n, bool))
    expected = _expected(node, close, i, j)
    assert _class_pairs(node, k, partitions=3) == expected
    assert len(expected) > 20                          # the planted pairs did match


def test_an_edge_found_in_many_partitions_counts_once():
    """Two copies 2 bits apart on every view agree on dozens of (view, band) keys, in many of 16
    partitions; after the homes, components sees the pair once and each row's attributes once."""
    rng = np.random.default_rng(2)
    hashes = rng.integers(0, 2**63, (6, len(VIEWS)), dtype=np.uint64)
    hashes[1] = hashes[0] ^ np.uint64(0b101)
    node = _node(hashes, np.ones(6, bool))
    partitions = 16
    pairs, _, classes = _search(node, 6, partitions)
    assert sum(len(p["a"]) > 0 for p in pairs) > 3     # found in several partitions
    routed = []
    for p in pairs:                                    # as decide's partition_search sends them home
        home_a, home_b = partition_of(p["a"], partitions), partition_of(p["b"], partitions)
        both = home_a != home_b
        routed.append(split(np.r_[home_a, home_b[both]], partitions,
                            **{k: np.r_[v, v[both]] for k, v in p.items()}))
    homes = [home_nodes(q, partitions, [classes[q]], [r[q] for r in routed]) for q in range(partitions)]
    assert sum(len(h["a"]) for h in homes) == 1
    assert sorted(r for h in homes for r in h["row"].tolist()) == [0, 1]
    assert sum(len(c["row"]) for c in classes) == 6    # every row's attributes sent once, to one home


def _parts(rows: np.ndarray, cls: np.ndarray, pref: np.ndarray, a=(), b=(), same=(), caption=None) -> list[dict]:
    return [{"row": rows, "cls": cls.astype(np.uint64), "pref": pref[:, None].astype(float),
             "caption": caption if caption is not None else rows.astype(np.uint64),
             "a": np.array(a, np.uint64), "b": np.array(b, np.uint64), "same": np.array(same, bool)}]


def test_a_chain_of_look_alikes_is_split_into_bounded_groups():
    """Images 0-1-2-...-9 each matching only its neighbours (a chain), best first: transitive closure
    would make one group of 10; bounded groups pair each representative with its direct neighbours."""
    rows = np.arange(10)
    parts = _parts(rows, rows + 100, -rows.astype(float), a=rows[:-1] + 100, b=rows[1:] + 100, same=[False] * 9)
    dups, counts = components(1, 1, np.array([0, 1]), parts)
    assert dups[0]["row"].tolist() == [1, 3, 5, 7, 9] and dups[0]["dup_of"].tolist() == [0, 2, 4, 6, 8]
    assert counts["largest"] == 2 and counts["size_histogram"] == {"2": 5}
    assert bounded_groups(4, np.array([0, 1, 2]), np.array([1, 2, 3])).tolist() == [0, 0, 2, 2]


def test_a_skewed_group_of_copies_is_one_group_at_linear_cost():
    """One picture copied 300,000 times: equal hashes make the copies one class (the search sends one
    record per view and band, however many copies), re-encodes with other hashes but the same bytes
    chain as "same" edges, and components puts every copy in one group with the best row kept."""
    copies = 300_000
    node = _node(np.full((copies, len(VIEWS)), 12345, np.uint64), np.ones(copies, bool))
    search, classes = route([node], False, 6, 1, 4)
    assert sum(len(p["h_key"]) for p in search) == len(VIEWS) * 7   # one per view and band, not per copy
    rows = np.arange(copies)
    cls = np.where(rows < copies - 1000, 7, rows)             # 1,000 re-encodes, each its own class ...
    chain = np.r_[7, rows[copies - 1000:]]                    # ... chained by equal bytes
    pref = np.zeros(copies)
    pref[123] = 1.0
    dups, counts = components(1, 1, np.array([0, 1]), _parts(rows, cls, pref, a=chain[:-1], b=chain[1:],
                                                             same=[True] * 1000, caption=np.zeros(copies, np.uint64)))
    assert counts["largest"] == copies and counts["groups"] == 1
    assert len(dups[0]["row"]) == copies - 1 and set(dups[0]["dup_of"].tolist()) == {123}


def test_mirror_and_window_hashes_are_what_their_views_say():
    """The mirror view of an image is the whole view of its mirror image, bit for bit; a window
    is the whole view of that crop, up to the resampling at its edges."""
    rng = np.random.default_rng(4)
    gray = np.asarray(natural(rng, 200, 250).convert("L"))
    hashes = dict(zip((w.name for w in VIEWS), view_hashes(gray)))
    assert hashes["mirror"] == view_hashes(gray[:, ::-1], VIEWS[:1])[0]
    crop = gray[8:, 10:]                            # the bottom-right 96% window
    assert hamming(np.uint64(hashes["br96"]), view_hashes(crop, VIEWS[:1])) <= 4
    assert hamming(np.uint64(hashes["whole"]), view_hashes(crop, VIEWS[:1])) > 4


def test_near_duplicate_quality_on_a_small_seeded_set():
    """The smoke case of bench/bench_near_dup.py: 24 scenes, every transform; the goals hold."""
    result = near_dup_quality(24, seed=3)
    assert result["precision"] >= 0.999, result
    for name, recall in result["recall"].items():
        assert recall >= (0.95 if is_geometric(name) else 0.99), (name, result["recall"])
    assert result["closest_distinct_bits"] > DedupeConfig().phash_max_distance
