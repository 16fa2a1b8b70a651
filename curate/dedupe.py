"""Duplicate edges on Ray: exact (sha256), near (pHash bands) and semantic (embeddings).

Every function here sees the surviving rows in preference order (rank 0 is the row the keep
rule prefers) and returns edges (2, E) between ranks; decide joins all edges into groups and
keeps the smallest rank of each. Since an edge list only has to preserve connectivity, each
Ray partition reduces its pairs to a spanning forest (at most one edge per row) before it
returns, so what reaches the driver is O(rows in duplicate groups), never O(pairs).

Memory bound (n surviving rows, k = dedupe.phash_max_distance, P = dedupe.partitions):
- driver: O(n) fixed-width numpy arrays (rank, hash, root: about 40 bytes a row) plus the
  forests; no per-row Python object, no pair list;
- near dedup: the shuffle holds (k+1) copies of (band id, rank, hash), 17 bytes each, in the
  Ray object store (spilled to disk when it overflows); one partition task holds
  (k+1)·n_unique/P of them plus its verified pairs;
- semantic dedup: one partition task holds its clusters' embeddings and one similarity block
  of at most BLOCK_ELEMS floats.
Work: near dedup compares only pairs that agree on a band and a sub-band (filters/phash.py),
(k+1)² keys of b = w + (64 - w)/(k+1) bits (w = 64/(k+1)): about (k+1)² · n²/2^(b+1) pairs for
random hashes; b ≈ 23 at k = 4, so ~1.5·10^8 pairs for n = 10^7. At k = 8 (b ≈ 13) that grows
to ~10^12: large k needs a deeper split, so 8 is the cap.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from filters.phash import band_values, forest, near_pairs_in_band, split_bits

CHUNK_ROWS = 1 << 20          # rows per scatter task
BLOCK_ELEMS = 1 << 24         # similarity entries computed at once in a semantic partition
KMEANS_SAMPLE = 100_000       # rows the k-means centroids are fitted on
KMEANS_ITERATIONS = 20
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band values over partitions


def _no_edges() -> np.ndarray:
    return np.empty((2, 0), np.int64)


def same_value_edges(codes: np.ndarray) -> np.ndarray:
    """Join each row to the best row with the same code (codes in rank order; negative = no value)."""
    ranks = np.flatnonzero(codes >= 0)
    if not ranks.size:
        return _no_edges()
    _, first, inverse = np.unique(codes[ranks], return_index=True, return_inverse=True)
    best = ranks[first][inverse]
    moved = ranks != best
    return np.stack([ranks[moved], best[moved]])


def _scatter(ids: np.ndarray, hashes: np.ndarray, max_distance: int, partitions: int) -> list[tuple]:
    """Route each (band, id, hash) to the partition of its band value: equal bands meet there."""
    parts: list[list] = [[] for _ in range(partitions)]
    for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
        value = band_values(hashes, offset, width)
        target = ((value * _MIX + np.uint64(b)) % np.uint64(partitions)).astype(np.int64)
        order = np.argsort(target, kind="stable")
        bounds = np.searchsorted(target[order], np.arange(partitions + 1))
        for p in range(partitions):
            take = order[bounds[p]:bounds[p + 1]]
            parts[p].append((np.full(take.size, b, np.uint8), ids[take], hashes[take]))
    return [tuple(np.concatenate(cols) for cols in zip(*part)) for part in parts]


def _pair_forest(max_distance: int, *parts: tuple) -> np.ndarray:
    """Verified near pairs of one partition, reduced to a spanning forest."""
    band = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    hashes = np.concatenate([p[2] for p in parts])
    found = [_no_edges()]
    for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
        mine = band == b
        if mine.sum() > 1:
            found.append(near_pairs_in_band(ids[mine], hashes[mine], offset, width, max_distance))
    return forest(np.concatenate(found, axis=1))


def near_edges(hashes: np.ndarray, valid: np.ndarray, max_distance: int, partitions: int) -> np.ndarray:
    """Edges between rows whose pHashes lie within max_distance (hashes in rank order).

    Identical hashes are joined first on the driver (one sort); only one row per distinct hash
    enters the band shuffle, so a hash shared by a million copies costs one row there.
    """
    import ray

    ranks = np.flatnonzero(valid)
    if not ranks.size:
        return _no_edges()
    unique, first, inverse = np.unique(hashes[ranks], return_index=True, return_inverse=True)
    best = ranks[first]
    identical = np.stack([ranks, best[inverse]])[:, ranks != best[inverse]]
    if max_distance == 0 or unique.size < 2:
        return identical
    scatter = ray.remote(num_returns=partitions)(_scatter) if partitions > 1 else ray.remote(_scatter)
    parts = []
    for start in range(0, unique.size, CHUNK_ROWS):
        refs = scatter.remote(best[start:start + CHUNK_ROWS], unique[start:start + CHUNK_ROWS],
                              max_distance, partitions)
        parts.append(refs if partitions > 1 else [refs])
    reduce = ray.remote(_pair_forest)
    forests = [reduce.remote(max_distance, *column) for column in zip(*parts)]
    return np.concatenate([identical, *ray.get(forests)], axis=1)


def _normalised(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows as float32, and which rows had a usable (finite, non-zero) embedding."""
    emb = np.asarray(emb, np.float32)
    norm = np.linalg.norm(emb, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    return emb[ok] / norm[ok, None], ok


def _kmeans(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (unit rows), seeded so the clusters are the same every run."""
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(len(sample), size=k, replace=False)]
    for _ in range(KMEANS_ITERATIONS):
        label = np.argmax(sample @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, label, sample)
        norm = np.linalg.norm(sums, axis=1)
        filled = norm > 0
        centroids[filled] = sums[filled] / norm[filled, None]
    return centroids


def _assign(path: str, rows: np.ndarray, ranks: np.ndarray, centroids: np.ndarray, partitions: int) -> list[tuple]:
    """One shard: read the surviving rows' embeddings, label them by nearest centroid, route by label."""
    emb, ok = _normalised(np.load(path, mmap_mode="r")[rows])
    ranks = ranks[ok]
    label = np.concatenate([np.argmax(emb[i:i + 4096] @ centroids.T, axis=1) for i in range(0, len(emb), 4096)]
                           or [np.empty(0, np.int64)])
    target = label % partitions
    return [(label[target == p], ranks[target == p], emb[target == p].astype(np.float16)) for p in range(partitions)]


def _cluster_forest(threshold: float, *parts: tuple) -> np.ndarray:
    """Pairs at cosine ≥ threshold inside each cluster of one partition, as a spanning forest."""
    label = np.concatenate([p[0] for p in parts])
    ranks = np.concatenate([p[1] for p in parts])
    emb = np.concatenate([p[2] for p in parts]).astype(np.float32)
    found = [_no_edges()]
    for cluster in np.unique(label):
        members = np.flatnonzero(label == cluster)
        e, r = emb[members], ranks[members]
        block = max(1, BLOCK_ELEMS // len(members))
        for start in range(0, len(members), block):
            i, j = np.nonzero(e[start:start + block] @ e.T >= threshold)
            i += start
            upper = i < j
            found.append(np.stack([r[i[upper]], r[j[upper]]]))
    return forest(np.concatenate(found, axis=1))


def semantic_edges(shard_rows: list[tuple[Path, np.ndarray, np.ndarray]], threshold: float,
                   cluster_size: int, partitions: int) -> np.ndarray:
    """Edges between rows whose image embeddings have cosine ≥ threshold within one k-means cluster.

    `shard_rows` holds, per shard: its embeddings file, the surviving rows' positions in it and
    their ranks. Centroids come from a fixed-seed sample; pairs split across clusters are missed
    (the price of not comparing all pairs).
    """
    import ray

    total = sum(len(rows) for _, rows, _ in shard_rows)
    if total < 2:
        return _no_edges()
    rng = np.random.default_rng(0)
    share = min(1.0, KMEANS_SAMPLE / total)
    sample = [np.load(path, mmap_mode="r")[np.sort(rng.choice(rows, size=max(1, math.ceil(len(rows) * share)),
                                                               replace=False))]
              for path, rows, _ in shard_rows if len(rows)]
    sample, _ = _normalised(np.concatenate(sample))
    if len(sample) < 2:
        return _no_edges()
    k = max(1, min(len(sample), round(total / cluster_size)))
    centroids = ray.put(_kmeans(sample, k))
    assign = ray.remote(num_returns=partitions)(_assign) if partitions > 1 else ray.remote(_assign)
    parts = []
    for path, rows, ranks in shard_rows:
        refs = assign.remote(str(path), rows, ranks, centroids, partitions)
        parts.append(refs if partitions > 1 else [refs])
    reduce = ray.remote(_cluster_forest)
    return np.concatenate([_no_edges(), *ray.get([reduce.remote(threshold, *column) for column in zip(*parts)])],
                          axis=1)
