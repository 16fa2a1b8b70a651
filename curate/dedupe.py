"""Duplicate edges at scale: what one group routes, what one partition finds, and the components.

decide.py drives these as Ray tasks; everything here is a pure function of numpy arrays.

- route: a group's surviving rows become records keyed by sha256 (exact), by each band of
  each of a row's view hashes (near: any two hashes within k bits agree exactly on one of
  k + 1 bands; filters/multihash.py names the views) and by k-means cluster (semantic),
  hash-partitioned so equal keys meet in one partition.
- partition_edges: inside a partition, equal sha256 become chains (n - 1 edges, never all
  pairs), identical anchor hashes one chain, band buckets are verified pair by pair with
  sub-band splitting (filters/phash.py) and the matching rule (an anchor view on one side),
  clusters compared in bounded blocks; the result is reduced to a spanning forest, so a
  partition returns at most one edge per row it holds. A sub-band bucket holding more than
  MAX_BUCKET distinct hashes (a flat image shared by millions) is skipped and counted.
- components: connected components over the nodes that have an edge; each group keeps its
  best rows and the others point at the best one.

Memory: a partition holds 1 + len(VIEWS) * (k + 1) records of 26 bytes per surviving row routed
to it (85 at 12 views and k = 6), its rows' preference and caption once, and its verified
pairs; components holds about 64 bytes per row that has an edge.
"""
from __future__ import annotations

import numpy as np

from filters.multihash import ANCHORS, VIEWS
from filters.phash import band_values, forest, near_pairs_in_band, roots, split_bits

MAX_BUCKET = 10_000              # distinct hashes sharing one (band, sub-band) value beyond this are not compared
BLOCK_ELEMS = 1 << 24            # similarity entries computed at once inside one cluster
KMEANS_SAMPLE = 100_000          # embeddings the k-means centroids are fitted on
KMEANS_ITERATIONS = 20
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads keys over partitions


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    return ((values * _MIX) >> np.uint64(40)).astype(np.int64) % partitions



def split(target: np.ndarray, partitions: int, **cols: np.ndarray) -> list[dict]:
    """Rows routed to partitions: one dict of columns per partition."""
    order = np.argsort(target, kind="stable")
    bounds = np.searchsorted(target[order], np.arange(partitions + 1))
    return [{k: v[order[bounds[p]:bounds[p + 1]]] for k, v in cols.items()} for p in range(partitions)]



def concat(parts: tuple[dict, ...]) -> dict:
    keys = parts[0].keys() if parts else ()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}



def route(nodes: list[dict], exact: bool, max_distance: int | None, n_pref: int, partitions: int) -> list[dict]:
    """Records of a group's surviving rows, one dict per partition: {"hash", "attrs", "semantic"}.

    Each node dict holds row, pref, caption, sha (0 = none) and optionally phash (n, len(VIEWS))
    + phash_valid and semantic = (usable mask, cluster label, unit embedding as float16).
    "hash" records are (kind, key, value, anchor, row): one per sha256, and one per view hash
    and band; "attrs" holds each routed row's preference and caption once per partition.
    """
    pieces, attrs, semantic = [], [], []
    anchor_of_view = np.array([v.name in ANCHORS for v in VIEWS], np.uint8)
    for node in nodes:
        attrs.append({k: node[k] for k in ("row", "pref", "caption")})
        if exact:
            has = node["sha"] != 0
            pieces.append(_piece(0, node["sha"][has], np.zeros(int(has.sum()), np.uint64),
                                 np.zeros(int(has.sum()), np.uint8), node["row"][has]))
        if max_distance is not None and "phash" in node:
            has = node["phash_valid"]
            hashes, rows = node["phash"][has], node["row"][has]
            for v in range(hashes.shape[1]):
                anchor = np.full(len(rows), anchor_of_view[v], np.uint8)
                for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
                    key = band_values(hashes[:, v], offset, width) * np.uint64(64) + np.uint64(b)
                    pieces.append(_piece(1, key, hashes[:, v], anchor, rows))
        if "semantic" in node:
            ok, label, emb = node["semantic"]
            semantic.append({"label": label, "emb": emb, **{k: node[k][ok] for k in ("row", "pref", "caption")}})
    hashed = concat(tuple(pieces)) if pieces else _empty_piece()
    target = partition_of(hashed["key"] ^ hashed["kind"].astype(np.uint64), partitions)
    hashed = split(target, partitions, **hashed)
    every = concat(tuple(attrs)) if attrs else {"row": np.empty(0, np.int64), "pref": np.empty((0, n_pref)),
                                                "caption": np.empty(0, np.uint64)}
    wanted = [np.unique(h["row"]) for h in hashed]
    by_row = np.argsort(every["row"], kind="stable")
    at = [by_row[np.searchsorted(every["row"], w, sorter=by_row)] for w in wanted]
    routed = [{"hash": h, "attrs": {k: v[i] for k, v in every.items()}, "semantic": None} for h, i in zip(hashed, at)]
    if semantic:
        sem = concat(tuple(semantic))
        for part, m in zip(routed, split(sem["label"] % partitions, partitions, **sem)):
            part["semantic"] = m
    return routed


def _piece(kind: int, key: np.ndarray, value: np.ndarray, anchor: np.ndarray, row: np.ndarray) -> dict:
    return {"kind": np.full(len(key), kind, np.uint8), "key": key, "value": value, "anchor": anchor, "row": row}


def _empty_piece() -> dict:
    return _piece(0, np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.uint8), np.empty(0, np.int64))


def nbytes(obj) -> int:
    """Bytes of the numpy arrays in nested dicts, lists and tuples (what a piece carries)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def partition_edges(max_distance: int | None, threshold: float | None, *parts: dict,
                    max_bucket: int = MAX_BUCKET) -> tuple[dict, dict]:
    """A partition's duplicate edges as a spanning forest, with the nodes' attributes; and its
    counts: hashes whose sub-band bucket was too large to compare (reported, never silent), bytes in and out."""
    cols = concat(tuple(p["hash"] for p in parts))
    found = [np.empty((2, 0), np.int64)]
    skipped = 0
    exact = cols["kind"] == 0
    if exact.any():
        found.append(_chains(cols["key"][exact], cols["row"][exact]))
    near = cols["kind"] == 1
    if near.any() and max_distance is not None:
        edges, skipped = _near_edges(cols["key"][near], cols["value"][near], cols["anchor"][near].astype(bool),
                                     cols["row"][near], max_distance, max_bucket)
        found.append(edges)
    attrs = concat(tuple(p["attrs"] for p in parts))
    sem = [p["semantic"] for p in parts if p["semantic"] is not None]
    if sem and threshold is not None:
        sem = concat(tuple(sem))
        found.append(_cluster_pairs(sem, threshold))
        attrs = {k: np.concatenate([attrs[k], sem[k]]) for k in ("row", "pref", "caption")}
    edges = forest(np.concatenate(found, axis=1))
    nodes = np.unique(edges)
    by_row = np.argsort(attrs["row"], kind="stable")
    index = by_row[np.searchsorted(attrs["row"], nodes, sorter=by_row)] if len(nodes) else np.empty(0, np.int64)
    out = {"edges": edges, "row": nodes, "pref": attrs["pref"][index], "caption": attrs["caption"][index]}
    return out, {"skipped": skipped, "in_bytes": nbytes(parts), "out_bytes": nbytes(out)}


def _near_edges(key: np.ndarray, value: np.ndarray, anchor: np.ndarray, row: np.ndarray,
                max_distance: int, max_bucket: int) -> tuple[np.ndarray, int]:
    """Edges between rows with a view hash within max_distance of an anchor hash of the other.

    Rows sharing one exact (band, hash, anchor-or-not) are collapsed to one representative first,
    so a hash shared by millions costs one chain, not millions of candidates: identical anchor
    hashes are a match and become a chain; identical window hashes alone are not (the rule wants
    an anchor on one side), so a window group's rows each join the anchor a representative matched.
    """
    order = np.lexsort((row, anchor, value, key))
    key, value, anchor, row = key[order], value[order], anchor[order], row[order]
    new = np.r_[True, (key[1:] != key[:-1]) | (value[1:] != value[:-1]) | (anchor[1:] != anchor[:-1])]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, len(key)])
    same_anchor = ~new & anchor
    found = [np.stack([row[:-1][same_anchor[1:]], row[1:][same_anchor[1:]]])]
    rep_key, rep_value, rep_anchor = key[starts], value[starts], anchor[starts]
    skipped = 0
    for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
        mine = np.flatnonzero((rep_key % np.uint64(64)) == np.uint64(b))
        if mine.size < 2:
            continue
        pairs, big = near_pairs_in_band(rep_value[mine], rep_anchor[mine], offset, width, max_distance, max_bucket)
        skipped += big
        i, j = mine[pairs[0]], mine[pairs[1]]
        i, j = np.where(rep_anchor[i], i, j), np.where(rep_anchor[i], j, i)      # i is an anchor group
        count = np.where(rep_anchor[j], 1, sizes[j])      # an anchor group is a chain: its first row will do
        pair = np.repeat(np.arange(len(j)), count)
        offset = np.arange(len(pair)) - np.repeat(np.cumsum(count) - count, count)
        found.append(np.stack([row[starts[i][pair]], row[starts[j][pair] + offset]]))
    edges = np.concatenate(found, axis=1)
    return edges[:, edges[0] != edges[1]], skipped


def _cluster_pairs(sem: dict, threshold: float) -> np.ndarray:
    """Pairs at cosine >= threshold inside each k-means cluster, in blocks of bounded size."""
    found = [np.empty((2, 0), np.int64)]
    order = np.argsort(sem["label"], kind="stable")
    label = sem["label"][order]
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]]) if len(label) else np.empty(0, np.int64)
    for a, b in zip(starts, np.r_[starts[1:], len(label)]):
        members = order[a:b]
        e, r = sem["emb"][members].astype(np.float32), sem["row"][members]
        block = max(1, BLOCK_ELEMS // len(members))
        for start in range(0, len(members), block):
            i, j = np.nonzero(e[start:start + block] @ e.T >= threshold)
            i += start
            upper = i < j
            found.append(np.stack([r[i[upper]], r[j[upper]]]))
    return forest(np.concatenate(found, axis=1))



def _chains(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows with equal values joined as a chain (n - 1 edges per value, never all pairs)."""
    order = np.lexsort((rows, values))
    v, r = values[order], rows[order]
    same = v[1:] == v[:-1]
    return np.stack([r[:-1][same], r[1:][same]])



def components(per_group: int, groups: int, bounds: np.ndarray, *parts: dict) -> list[dict]:
    """Duplicate groups over every partition's forest; per group the best rows stay, up to
    `per_group` with distinct captions; the others get dup_of = the group's best row."""
    edges = np.concatenate([p["edges"] for p in parts], axis=1) if parts else np.empty((2, 0), np.int64)
    nodes, label = roots(edges)
    if not len(nodes):
        return [{"row": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64)} for _ in range(groups)]
    rows = np.concatenate([p["row"] for p in parts])
    first = np.unique(rows, return_index=True)[1]
    pref = np.concatenate([p["pref"] for p in parts])[first]
    caption = np.concatenate([p["caption"] for p in parts])[first]   # aligned with `nodes` (both sorted)
    order = np.lexsort((nodes, *(-pref[:, k] for k in reversed(range(pref.shape[1]))), label))
    lab, cap = label[order], caption[order]
    group_start = np.r_[True, lab[1:] != lab[:-1]]
    best = nodes[order][np.maximum.accumulate(np.where(group_start, np.arange(len(lab)), 0))]
    _, first_caption = np.unique(np.stack([lab, cap]), axis=1, return_index=True)
    distinct = np.zeros(len(lab), bool)
    distinct[first_caption] = True
    ordinal = np.cumsum(distinct) - np.repeat(np.cumsum(distinct)[group_start] - distinct[group_start],
                                              np.diff(np.r_[np.flatnonzero(group_start), len(lab)])) - 1
    keep = distinct & (ordinal < per_group)
    dropped = nodes[order][~keep]
    dup_of = best[~keep]
    sort = np.argsort(dropped)
    dropped, dup_of = dropped[sort], dup_of[sort]
    cuts = np.searchsorted(dropped >> 32, bounds)
    return [{"row": dropped[cuts[g]:cuts[g + 1]], "dup_of": dup_of[cuts[g]:cuts[g + 1]]} for g in range(groups)]



def normalised(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows as float32, and which rows had a usable (finite, non-zero) embedding."""
    emb = np.asarray(emb, np.float32)
    norm = np.linalg.norm(emb, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    return emb[ok] / norm[ok, None], ok



def nearest(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.concatenate([np.argmax(emb[i:i + 4096] @ centroids.T, axis=1) for i in range(0, len(emb), 4096)]
                          or [np.empty(0, np.int64)]).astype(np.int64)



def kmeans(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (unit rows) of unit-row samples, seeded: the same every run."""
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
