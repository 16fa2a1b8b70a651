"""Near-duplicate search on 64-bit perceptual hashes: bands, candidate pairs, groups.

Pure numpy functions over arrays of hashes, so a Ray task (curate/dedupe.py) can run them
on one partition and tests can run them in milliseconds.

Two pigeonhole levels keep candidate buckets small without comparing all pairs:
  1. split the 64 bits into k+1 bands: two hashes within Hamming distance k agree exactly
     on at least one band (the k differing bits touch at most k bands);
  2. inside a band b, the other 64 - w_b bits still differ in at most k places, so split
     them into k+1 sub-bands: the pair also agrees on one of those.
A candidate is a pair agreeing on (band b, sub-band s) for some (b, s); every candidate is
verified with its true Hamming distance and with the matching rule (filters/multihash.py: an
anchor view, whole or mirror, on at least one side). Level 1 is what the cluster shuffles on (band
value); level 2 runs locally in the partition and cuts buckets by another 2^(bits/k+1).
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def split_bits(total: int, parts: int) -> list[tuple[int, int]]:
    """(offset, width) of `parts` contiguous bit ranges covering `total` bits, widths differing by ≤ 1."""
    widths = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return [(int(o), int(w)) for o, w in zip(offsets, widths) if w > 0]


def band_values(hashes: np.ndarray, offset: int, width: int) -> np.ndarray:
    """The `width` bits of each hash starting at bit `offset`, as uint64."""
    mask = np.uint64((1 << width) - 1)
    return (hashes >> np.uint64(offset)) & mask


def without_band(hashes: np.ndarray, offset: int, width: int) -> np.ndarray:
    """Each hash with the band's bits removed and the higher bits shifted down (64 - width bits)."""
    low = hashes & np.uint64((1 << offset) - 1)
    high = hashes >> np.uint64(offset + width) if offset + width < 64 else np.zeros_like(hashes)
    return low | (high << np.uint64(offset))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance of two uint64 arrays."""
    return np.bitwise_count(a ^ b)


def equal_key_pairs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j), i < j, with keys[i] == keys[j], as positions in `keys` (which must be sorted).

    Walks offsets d = 1, 2, ... over the positions still inside a run, so the work is the number
    of pairs plus len(keys), and each step's memory is one offset's pairs.
    """
    n = len(keys)
    active = np.flatnonzero(keys[1:] == keys[:-1])
    firsts, seconds = [], []
    d = 1
    while active.size:
        firsts.append(active)
        seconds.append(active + d)
        d += 1
        active = active[active + d < n]
        active = active[keys[active + d] == keys[active]]
    if not firsts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def near_pairs_in_band(hashes: np.ndarray, anchor: np.ndarray, offset: int, width: int, max_distance: int,
                       max_bucket: int) -> tuple[np.ndarray, int]:
    """Verified pairs (2, E) of positions whose hashes agree on band (offset, width), lie within
    max_distance, and have an anchor view on at least one side; and how many hashes sat in a
    sub-band bucket larger than `max_bucket` and were not compared (reported, never silent).

    `hashes` are the distinct hashes of one or more buckets of this band (level-1 partition).
    """
    band = band_values(hashes, offset, width)
    rest = without_band(hashes, offset, width)
    found, skipped = [np.empty((2, 0), np.int64)], 0
    for sub_offset, sub_width in split_bits(64 - width, max_distance + 1):
        key = (band << np.uint64(sub_width)) | band_values(rest, sub_offset, sub_width)
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        sizes = np.diff(np.r_[starts, len(key)])
        small = np.repeat(sizes <= max_bucket, sizes)
        skipped += int((~small).sum())
        order = order[small]
        i, j = equal_key_pairs(key[small])
        i, j = order[i], order[j]
        keep = (anchor[i] | anchor[j]) & (hamming(hashes[i], hashes[j]) <= max_distance)
        found.append(np.stack([i[keep], j[keep]]))
    return np.unique(np.concatenate(found, axis=1), axis=1), skipped


def roots(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of an edge list (2, E) of int ids: (node, smallest id in its component).

    Only nodes that appear in an edge are returned; ids are ranks, so the smallest is the best.
    """
    if edges.shape[1] == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes, inverse = np.unique(edges, return_inverse=True)
    inverse = inverse.reshape(edges.shape)
    graph = coo_matrix((np.ones(edges.shape[1], np.int8), (inverse[0], inverse[1])),
                       shape=(len(nodes), len(nodes)))
    _, label = connected_components(graph, directed=False)
    smallest = np.full(label.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, label, nodes)
    return nodes.astype(np.int64), smallest[label]


def forest(edges: np.ndarray) -> np.ndarray:
    """The same components as `edges`, as at most one edge per node (node -> component root)."""
    nodes, root = roots(edges)
    moved = nodes != root
    return np.stack([nodes[moved], root[moved]])
