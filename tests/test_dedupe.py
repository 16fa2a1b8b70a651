"""Near-duplicate search: the pigeonhole bands find every pair a brute force finds under the
matching rule, and the view hashes at the default distance separate copies from distinct images."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from bench.bench_near_dup import near_dup_quality
from bench.scenes import is_geometric, natural
from curate.config import DedupeConfig
from curate.dedupe import partition_edges, route
from filters.multihash import MATCHES, VIEWS, view_hashes
from filters.phash import equal_key_pairs, forest, hamming, roots, split_bits, without_band


def _components(n: int, edges: np.ndarray) -> np.ndarray:
    root = np.arange(n)
    nodes, best = roots(edges)
    root[nodes] = best
    return root


def _edges(hashes: np.ndarray, valid: np.ndarray, k: int | None, partitions: int,
           sha: np.ndarray | None = None) -> np.ndarray:
    """Route one group of rows to partitions and gather every partition's forest, as decide does."""
    n = len(hashes)
    node = {"row": np.arange(n), "pref": np.zeros((n, 1)), "caption": np.zeros(n, np.uint64),
            "sha": sha if sha is not None else np.zeros(n, np.uint64),
            "phash": hashes if hashes.ndim == 2 else hashes[:, None], "phash_valid": valid}
    parts = route([node], sha is not None, k, 1, partitions)
    return np.concatenate([partition_edges(k, None, part)[0]["edges"] for part in parts], axis=1)


def _brute_force(hashes: np.ndarray, k: int) -> np.ndarray:
    i, j = np.triu_indices(len(hashes), 1)
    close = hamming(hashes[i], hashes[j]) <= k
    return _components(len(hashes), np.stack([i[close], j[close]]))


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


def test_forest_keeps_components_with_one_edge_per_node():
    edges = np.array([[5, 6, 7, 9], [6, 7, 5, 2]])
    small = forest(edges)
    assert small.shape[1] == 3 and set(small[1].tolist()) == {2, 5}
    assert np.array_equal(_components(10, small), _components(10, edges))


@pytest.mark.parametrize("k", [0, 2, 4, 8])
def test_bands_find_what_brute_force_finds(ray_session, k):
    """Clusters of hashes 0..k+2 bits apart: the groups equal the all-pairs groups exactly."""
    rng = np.random.default_rng(k)
    centres = rng.integers(0, 2**63, 150, dtype=np.uint64)
    hashes = []
    for c in centres:
        for _ in range(int(rng.integers(1, 5))):
            bits = rng.choice(64, size=int(rng.integers(0, k + 3)), replace=False).astype(np.uint64)
            hashes.append(c ^ np.bitwise_or.reduce(np.uint64(1) << bits) if bits.size else c)
    hashes = np.array(hashes, np.uint64)
    edges = _edges(hashes, np.ones(len(hashes), bool), k, partitions=3)
    assert np.array_equal(_components(len(hashes), edges), _brute_force(hashes, k))


def test_invalid_hashes_never_group(ray_session):
    hashes = np.array([7, 7, 7, 0], np.uint64)
    valid = np.array([True, False, True, False])
    assert _components(4, _edges(hashes, valid, 4, 2)).tolist() == [0, 1, 0, 3]


def test_equal_sha256_rows_form_one_chain_not_all_pairs():
    sha = np.array([3, 1, 3, 0, 1, 0, 3], np.uint64)          # 0: no hash, never grouped
    hashes = np.arange(7, dtype=np.uint64) << np.uint64(40)   # far apart: no near pairs
    edges = _edges(hashes, np.ones(7, bool), None, 3, sha=sha)
    assert edges.shape[1] == 3                                # (3 - 1) + (2 - 1) edges
    assert _components(7, edges).tolist() == [0, 1, 0, 3, 1, 5, 0]


@pytest.mark.parametrize("k", [2, 6])
def test_view_hashes_group_exactly_as_the_matching_rule_says(ray_session, k):
    """Rows of 12 view hashes, with near pairs planted anchor-to-window, window-to-window (which
    the rule does not count) and anchor-to-anchor, some hashes shared by several rows: the
    groups equal those of the rule applied to every pair by brute force."""
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
    expected = _components(n, np.stack([i[close], j[close]]))
    edges = _edges(hashes, np.ones(n, bool), k, partitions=3)
    assert np.array_equal(_components(n, edges), expected)
    assert (expected != np.arange(n)).sum() > 20     # the planted pairs did group


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
