"""Near-duplicate search on 64-bit perceptual hashes: bands, candidate pairs, groups.

Pure numpy functions over arrays of hashes, so a Ray task (curate/phases/decide/dedupe.py) can run them
on one partition and tests can run them in milliseconds.

Two pigeonhole levels keep candidate buckets small without comparing all pairs:
  1. split the 64 bits into k+1 bands: two hashes within Hamming distance k agree exactly
     on at least one band (the k differing bits touch at most k bands);
  2. inside a band b, the other 64 - w_b bits still differ in at most k places, so split
     them into k+1 sub-bands: the pair also agrees on one of those.
A candidate is a pair agreeing on (band b, sub-band s) for some (b, s); every candidate is
verified with its true Hamming distance and with the matching rule (filters/multihash.py: an
anchor view, whole or mirror, on at least one side). Level 1 is what the cluster shuffles on (band
value); level 2 runs locally in the partition and cuts buckets by another 2^(bits/k+1), and a
bucket still larger than the cap is split again on the bits it has left (level 3, 4, ...).
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
    max_distance, and have an anchor view on at least one side; and how many buckets were larger
    than `max_bucket` and split one level further (every pair is still found).

    `hashes` are the distinct hashes of one or more buckets of this band (level-1 partition).
    Level 2 splits the other 64 - width bits into k + 1 sub-bands (a pair within k bits agrees on
    one of them). A sub-band bucket over `max_bucket` is split again on the bits it has left
    (level 3, 4, ...), all such buckets of a level at once, so a bucket shared by millions costs
    more levels, never a skipped comparison. A bucket whose split would not halve its comparisons
    (its hashes are close to each other, so most of its pairs are real) and a bucket with fewer
    than k + 1 bits left (the pigeonhole no longer holds) are compared pair by pair in blocks.
    """
    k = max_distance
    found, splits = [np.empty((2, 0), np.int64)], 0
    queue = [(np.arange(len(hashes)), band_values(hashes, offset, width), without_band(hashes, offset, width),
              64 - width, True)]
    while queue:
        members, bucket, rest, bits, checked = queue.pop()
        if len(members) < 2:
            continue
        if bits < k + 1:
            _pairs_within(members, bucket, hashes, anchor, k, found)
            continue
        levels = []
        for sub_offset, sub_width in split_bits(bits, k + 1):
            sub = band_values(rest, sub_offset, sub_width)
            order = np.lexsort((sub, bucket))
            b, v = bucket[order], sub[order]
            new = np.r_[True, (b[1:] != b[:-1]) | (v[1:] != v[:-1])]
            levels.append((sub_offset, sub_width, order, new))
        if not checked:
            dense = _dense(bucket, levels)
            if dense.any():
                _pairs_within(members[dense], bucket[dense], hashes, anchor, k, found)
                queue.append((members[~dense], bucket[~dense], rest[~dense], bits, True))
                continue
        for sub_offset, sub_width, order, new in levels:
            run = np.cumsum(new) - 1
            size = np.bincount(run)[run]
            small = size <= max_bucket
            i, j = equal_key_pairs(np.where(small, run, -1 - np.arange(len(run))))
            _verify(members[order[i]], members[order[j]], hashes, anchor, k, found)
            big = order[~small]
            if big.size:
                splits += int(np.unique(run[~small]).size)
                queue.append((members[big], run[~small].astype(np.uint64),
                              without_band(rest[big], sub_offset, sub_width), bits - sub_width, False))
    return np.unique(np.concatenate(found, axis=1), axis=1), splits


def _dense(bucket: np.ndarray, levels: list) -> np.ndarray:
    """Which members sit in a bucket whose split keeps more than half of its pairs."""
    ids, inverse, count = np.unique(bucket, return_inverse=True, return_counts=True)
    after = np.zeros(len(ids), np.int64)
    for _, _, order, new in levels:
        run = np.cumsum(new) - 1
        sizes = np.bincount(run)
        firsts = order[np.flatnonzero(new)]
        np.add.at(after, inverse[firsts], sizes * (sizes - 1) // 2)
    return (after * 2 > count * (count - 1) // 2)[inverse]


BLOCK = 1 << 22   # hash comparisons computed at once when a bucket is compared pair by pair
BIG = 2048        # buckets up to this size are compared all together; larger ones one block at a time


def _pairs_within(members: np.ndarray, bucket: np.ndarray, hashes: np.ndarray, anchor: np.ndarray, k: int,
                  found: list) -> None:
    """Every pair inside each bucket verified, in blocks of at most about BLOCK comparisons."""
    order = np.argsort(bucket, kind="stable")
    members, bucket = members[order], bucket[order]
    run = np.cumsum(np.r_[True, bucket[1:] != bucket[:-1]]) - 1
    size = np.bincount(run)[run]
    small = np.flatnonzero(size <= BIG)           # sorted by bucket, so each bucket is contiguous
    if small.size:
        firsts = small[np.r_[True, run[small][1:] != run[small][:-1]]]
        pairs = size[firsts] * (size[firsts] - 1) // 2
        step = np.r_[0, np.cumsum(pairs)[:-1]] // BLOCK     # whole buckets, about BLOCK pairs per step
        cuts = np.searchsorted(small, firsts[np.r_[True, step[1:] != step[:-1]]])
        for a, b in zip(cuts.tolist(), np.r_[cuts[1:], small.size].tolist()):
            chunk = small[a:b]
            i, j = equal_key_pairs(run[chunk])
            _verify(members[chunk[i]], members[chunk[j]], hashes, anchor, k, found)
    small = size <= BIG
    for r in np.unique(run[~small]).tolist():
        part = members[run == r]
        step = max(1, BLOCK // len(part))
        for lo in range(0, len(part), step):
            rows = np.arange(lo, min(lo + step, len(part)))
            i, j = np.nonzero(rows[:, None] < np.arange(len(part))[None, :])
            _verify(part[rows[i]], part[j], hashes, anchor, k, found)


def _verify(i: np.ndarray, j: np.ndarray, hashes: np.ndarray, anchor: np.ndarray, k: int, found: list) -> None:
    keep = (anchor[i] | anchor[j]) & (hamming(hashes[i], hashes[j]) <= k)
    found.append(np.stack([i[keep], j[keep]]))


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
