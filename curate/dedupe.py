"""Duplicate groups at scale: what one group routes, what one partition finds, what one home
holds, and the bounded groups. Pure functions of numpy arrays; decide.py runs them as Ray tasks
and moves their slices through storage (curate/exchange.py).

Images, not rows, are the nodes. Rows whose whole-image hash is equal (so are exact copies:
the same bytes give the same hash) are one *class*; without near dedup a class is the rows of
one sha256, without either a row alone. A million copies of one picture are one class, so they
cost one record per group in the search, not a million.

- route: per group, each surviving row sends (class, row, preference, caption) once, to its
  class's home partition; each class sends one record per view hash and band (any two hashes
  within k bits agree exactly on one of k + 1 bands; filters/multihash.py names the views), one
  sha256 record when near dedup is on, and one embedding per k-means cluster (semantic).
- partition_pairs: inside a partition, verified class pairs: band buckets compared pair by pair
  with sub-band splitting, levels added for buckets over MAX_BUCKET (filters/phash.py: nothing is
  skipped), under the matching rule (an anchor view, whole or mirror, on one side); clusters
  compared in bounded blocks, oversized ones split first; equal sha256 across classes (hashes that
  disagree on the same bytes) as "same" edges. Each pair goes to both of its classes' homes.
- home_nodes: a home partition's classes that have a pair or more than one row, their rows'
  attributes (sent from here only), and the pairs it owns (its smaller class): each counts once.
- components: "same" edges are merged (equal bytes are one image), then bounded groups over the
  pair graph: the best image not yet placed is a representative and its direct neighbours join
  it (a member is within the distance of the representative, never merely chained to it).

Memory: a partition holds 1 + len(VIEWS) * (k + 1) records of 26 bytes per class routed to it
(85 at 12 views and k = 6, before rows of a class with equal hashes share a record); components
holds 8 * (2 + len(keep_order)) bytes per row of a class with a pair or a copy, 16 per pair, and
its sort and group arrays (docs/scale.md has the measured bound).
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix

from filters.multihash import ANCHORS, VIEWS
from filters.phash import band_values, equal_key_pairs, near_pairs_in_band, roots, split_bits

MAX_BUCKET = 10_000              # distinct hashes of one sub-band bucket compared pair by pair; larger ones split again
BLOCK_ELEMS = 1 << 24            # similarity entries computed at once inside one cluster
KMEANS_SAMPLE = 100_000          # embeddings the coarse k-means centroids are fitted on
KMEANS_COARSE = 1_024            # at most this many coarse centroids; partitions split their clusters further
KMEANS_ITERATIONS = 20
ROUNDS = 64                      # bounded-group rounds in numpy before the rest is placed one by one
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads keys over partitions
_WHOLE, _SHA, _ROW = np.uint64(0x1F3D5B79), np.uint64(0x2E4C6A88), np.uint64(0x3B5D7F91)


def partition_of(values: np.ndarray, partitions: int) -> np.ndarray:
    return ((values * _MIX) >> np.uint64(40)).astype(np.int64) % partitions


def split(target: np.ndarray, partitions: int, **cols: np.ndarray) -> list[dict]:
    """Rows routed to partitions: one dict of columns per partition."""
    order = np.argsort(target, kind="stable")
    bounds = np.searchsorted(target[order], np.arange(partitions + 1))
    return [{k: v[order[bounds[p]:bounds[p + 1]]] for k, v in cols.items()} for p in range(partitions)]


def concat(parts: tuple[dict, ...] | list[dict]) -> dict:
    keys = parts[0].keys() if parts else ()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: class keys of different kinds never meet by accident."""
    x = x.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def class_keys(node: dict, exact: bool, near: bool) -> np.ndarray:
    """Each row's class: its whole-image hash when near dedup is on and it has one, else its
    sha256 when exact dedup is on and it has one, else the row alone."""
    key = _mix64(node["row"].astype(np.uint64) ^ _ROW)
    if exact:
        has = node["sha"] != 0
        key[has] = _mix64(node["sha"][has] ^ _SHA)
    if near and "phash" in node:
        has = node["phash_valid"]
        key[has] = _mix64(node["phash"][has, 0] ^ _WHOLE)
    return key


def _first_of(*cols: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each distinct tuple of the columns."""
    if not len(cols[0]):
        return np.empty(0, np.int64)
    order = np.lexsort(cols[::-1])
    new = np.zeros(len(order), bool)
    new[0] = True
    for c in cols:
        s = c[order]
        new[1:] |= s[1:] != s[:-1]
    return np.sort(order[new])


def route(nodes: list[dict], exact: bool, max_distance: int | None, n_pref: int, partitions: int,
          ) -> tuple[list[dict], list[dict]]:
    """A group's surviving rows as slices per partition: (search slices, class slices).

    Each node dict holds row, pref, caption, sha (0 = none) and optionally phash (n, len(VIEWS))
    + phash_valid and semantic = (usable mask, cluster label, unit embedding as float16).
    A search slice has hash records h_kind, h_key, h_value, h_anchor, h_cls (kind 0: sha256, 1: a
    band of a view hash), distinct within the group, and one embedding per class (s_label, s_emb,
    s_cls); a class slice has each row's cls, row, pref, caption.
    """
    near = max_distance is not None
    pieces, classes, semantic, views = [], [], [], []
    anchor_of_view = np.array([v.name in ANCHORS for v in VIEWS], np.uint8)
    for node in nodes:
        cls = class_keys(node, exact, near)
        classes.append({"cls": cls, "row": node["row"], "pref": node["pref"], "caption": node["caption"]})
        if near and "phash" in node:
            has = node["phash_valid"]
            views.append({"hash": node["phash"][has], "cls": cls[has]})
            if exact:   # equal bytes, unequal hashes: never in real data, but then still one image
                sha = has & (node["sha"] != 0)
                pieces.append(_piece(0, node["sha"][sha], np.zeros(int(sha.sum()), np.uint64),
                                     np.zeros(int(sha.sum()), np.uint8), cls[sha]))
        if "semantic" in node:
            ok, label, emb = node["semantic"]
            semantic.append({"s_label": label, "s_emb": emb, "s_cls": cls[ok]})
    if views:
        viewed = concat(views)
        for v in range(viewed["hash"].shape[1]):      # one record per distinct (hash, class) and band
            first = _first_of(viewed["hash"][:, v], viewed["cls"])
            hashes, c = viewed["hash"][first, v], viewed["cls"][first]
            anchor = np.full(len(c), anchor_of_view[v], np.uint8)
            for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
                key = band_values(hashes, offset, width) * np.uint64(64) + np.uint64(b)
                pieces.append(_piece(1, key, hashes, anchor, c))
    hashed = concat(pieces) if pieces else _no_records()
    exact_rows = hashed["h_kind"] == 0
    if exact_rows.any():
        keep = np.r_[np.flatnonzero(exact_rows)[_first_of(hashed["h_key"][exact_rows], hashed["h_cls"][exact_rows])],
                     np.flatnonzero(~exact_rows)]
        hashed = {k: v[keep] for k, v in hashed.items()}
    search = split(partition_of(hashed["h_key"] ^ hashed["h_kind"].astype(np.uint64), partitions), partitions,
                   **hashed)
    if semantic:
        sem = concat(semantic)
        first = _first_of(sem["s_cls"])
        sem = {k: v[first] for k, v in sem.items()}
        for part, m in zip(search, split(sem["s_label"] % partitions, partitions, **sem)):
            part.update(m)
    every = concat(classes) if classes else {"cls": np.empty(0, np.uint64), "row": np.empty(0, np.int64),
                                             "pref": np.empty((0, n_pref)), "caption": np.empty(0, np.uint64)}
    return search, split(partition_of(every["cls"], partitions), partitions, **every)


def _piece(kind: int, key: np.ndarray, value: np.ndarray, anchor: np.ndarray, cls: np.ndarray) -> dict:
    return {"h_kind": np.full(len(key), kind, np.uint8), "h_key": key, "h_value": value, "h_anchor": anchor,
            "h_cls": cls}


def _no_records() -> dict:
    return _piece(0, np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.uint8), np.empty(0, np.uint64))


# -- one partition: verified pairs ----------------------------------------------------------

def partition_pairs(max_distance: int | None, threshold: float | None, max_bucket: int, cluster_size: int,
                    parts: list[dict]) -> tuple[dict, dict]:
    """A partition's class pairs ({"a", "b", "same"}: a < b, each once; same = equal sha256) and
    its counts (buckets split further, pairs, embeddings compared)."""
    cols = {k: np.concatenate([p[k] for p in parts]) for k in ("h_kind", "h_key", "h_value", "h_anchor", "h_cls")} \
        if parts else _no_records()
    keep = _first_of(cols["h_kind"], cols["h_key"], cols["h_value"], cols["h_anchor"], cols["h_cls"])
    cols = {k: v[keep] for k, v in cols.items()}
    found, same, split_buckets = [np.empty((2, 0), np.uint64)], np.empty((2, 0), np.uint64), 0
    exact = cols["h_kind"] == 0
    if exact.any():
        same = _chains(cols["h_key"][exact], cols["h_cls"][exact])
    near = cols["h_kind"] == 1
    if near.any() and max_distance is not None:
        pairs, split_buckets = near_class_pairs(cols["h_key"][near], cols["h_value"][near],
                                                cols["h_anchor"][near].astype(bool), cols["h_cls"][near],
                                                max_distance, max_bucket)
        found.append(pairs)
    sem = [p for p in parts if "s_cls" in p]
    compared = 0
    if sem and threshold is not None:
        sem = concat([{k: p[k] for k in ("s_label", "s_emb", "s_cls")} for p in sem])
        first = _first_of(sem["s_cls"])
        sem = {k: v[first] for k, v in sem.items()}
        compared = len(first)
        found.append(cluster_pairs(sem["s_label"], sem["s_emb"], sem["s_cls"], threshold, cluster_size))
    near_pairs = _ordered(np.concatenate(found, axis=1))
    same = _ordered(same)
    out = {"a": np.concatenate([near_pairs[0], same[0]]), "b": np.concatenate([near_pairs[1], same[1]]),
           "same": np.r_[np.zeros(near_pairs.shape[1], bool), np.ones(same.shape[1], bool)]}
    return out, {"split_buckets": split_buckets, "pairs": int(near_pairs.shape[1]), "same": int(same.shape[1]),
                 "embeddings": compared}


def _ordered(pairs: np.ndarray) -> np.ndarray:
    """(2, E) pairs as (smaller, larger), self pairs dropped, each once."""
    pairs = pairs[:, pairs[0] != pairs[1]]
    pairs = np.stack([np.minimum(pairs[0], pairs[1]), np.maximum(pairs[0], pairs[1])])
    return np.unique(pairs, axis=1) if pairs.shape[1] else pairs.astype(np.uint64)


def near_class_pairs(key: np.ndarray, value: np.ndarray, anchor: np.ndarray, cls: np.ndarray,
                     max_distance: int, max_bucket: int) -> tuple[np.ndarray, int]:
    """Class pairs with a view hash within max_distance of an anchor hash of the other.

    Records with one (band, hash, anchor-or-not) are one candidate, so a hash many classes share
    is compared once: classes sharing an anchor hash all match each other; a verified candidate
    pair matches every class of the one against every class of the other.
    """
    order = np.lexsort((cls, anchor, value, key))
    key, value, anchor, cls = key[order], value[order], anchor[order], cls[order]
    new = np.r_[True, (key[1:] != key[:-1]) | (value[1:] != value[:-1]) | (anchor[1:] != anchor[:-1])]
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, len(key)])
    group = np.cumsum(new) - 1
    i, j = equal_key_pairs(np.where(anchor, group, -1 - np.arange(len(group))))   # inside anchor candidates
    found = [np.stack([cls[i], cls[j]])]
    rep_key, rep_value, rep_anchor = key[starts], value[starts], anchor[starts]
    split_buckets = 0
    for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
        mine = np.flatnonzero((rep_key % np.uint64(64)) == np.uint64(b))
        if mine.size < 2:
            continue
        pairs, more = near_pairs_in_band(rep_value[mine], rep_anchor[mine], offset, width, max_distance, max_bucket)
        split_buckets += more
        i, j = mine[pairs[0]], mine[pairs[1]]
        count = sizes[i] * sizes[j]
        pair = np.repeat(np.arange(len(i)), count)
        at = np.arange(len(pair)) - np.repeat(np.cumsum(count) - count, count)
        found.append(np.stack([cls[starts[i][pair] + at // sizes[j][pair]],
                               cls[starts[j][pair] + at % sizes[j][pair]]]))
    return np.concatenate(found, axis=1), split_buckets


def _chains(values: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Classes with equal values joined as a chain (n - 1 edges per value, never all pairs)."""
    order = np.lexsort((cls, values))
    v, c = values[order], cls[order]
    same = (v[1:] == v[:-1]) & (c[1:] != c[:-1])
    return np.stack([c[:-1][same], c[1:][same]])


def cluster_pairs(label: np.ndarray, emb: np.ndarray, cls: np.ndarray, threshold: float,
                  cluster_size: int) -> np.ndarray:
    """Pairs at cosine >= threshold inside each cluster, clusters over 2 * cluster_size split first
    (bisecting 2-means), so a skewed cluster costs blocks of bounded size, not its square."""
    found = [np.empty((2, 0), np.uint64)]
    order = np.argsort(label, kind="stable")
    lab = label[order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(lab) else np.empty(0, np.int64)
    for a, b in zip(starts, np.r_[starts[1:], len(lab)]):
        for members in bisect(order[a:b], emb, 2 * cluster_size):
            e, c = emb[members].astype(np.float32), cls[members]
            block = max(1, BLOCK_ELEMS // len(members))
            for start in range(0, len(members), block):
                i, j = np.nonzero(e[start:start + block] @ e.T >= threshold)
                i += start
                upper = i < j
                found.append(np.stack([c[i[upper]], c[j[upper]]]))
    return np.concatenate(found, axis=1)


def bisect(members: np.ndarray, emb: np.ndarray, most: int, seed: int = 0) -> list[np.ndarray]:
    """`members` cut by 2-means (seeded) until no part holds more than `most`; a part 2-means
    cannot cut (its embeddings coincide) stays whole."""
    todo, out = [members], []
    rng = np.random.default_rng(seed)
    while todo:
        part = todo.pop()
        if len(part) <= most:
            out.append(part)
            continue
        e = emb[part].astype(np.float32)
        centres = e[rng.choice(len(part), 2, replace=False)]
        for _ in range(8):
            side = (e @ (centres[0] - centres[1])) < 0
            if side.all() or not side.any():
                break
            centres = np.stack([e[~side].mean(0), e[side].mean(0)])
        if side.all() or not side.any():
            out.append(part)
        else:
            todo += [part[~side], part[side]]
    return out


# -- one home partition ----------------------------------------------------------------------

def home_nodes(q: int, partitions: int, classes: list[dict], pairs: list[dict]) -> dict:
    """What home partition q sends to components: the rows of its classes that have a pair or
    another row (cls, row, pref, caption), and the pairs whose smaller class lives here (a, b, same)."""
    rows = concat(classes)
    got = concat(pairs) if pairs else {"a": np.empty(0, np.uint64), "b": np.empty(0, np.uint64),
                                       "same": np.empty(0, bool)}
    if len(got["a"]):
        stacked = np.unique(np.stack([got["a"], got["b"], got["same"].astype(np.uint64)]), axis=1)
        got = {"a": stacked[0], "b": stacked[1], "same": stacked[2].astype(bool)}
    uniq, count = np.unique(rows["cls"], return_counts=True)
    involved = np.union1d(uniq[count > 1], np.concatenate([got["a"], got["b"]]))
    mine = np.isin(rows["cls"], involved)
    owned = partition_of(got["a"], partitions) == q
    return {**{k: v[mine] for k, v in rows.items()}, **{k: v[owned] for k, v in got.items()}}


# -- components: bounded groups ---------------------------------------------------------------

def bounded_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Representative of each of n images ranked best first (0 is best), given pairs a < b.

    The best image not yet placed becomes a representative and every unplaced image paired with
    it joins it; repeat. Rounds place at once every image whose better neighbours are all placed
    (a member joins its best representative neighbour); after ROUNDS rounds the rest, if any, is
    placed one by one in rank order, with the same result.
    """
    rep = np.full(n, -1, np.int64)
    a, b = a.astype(np.int64), b.astype(np.int64)
    for _ in range(ROUNDS):
        open_ = rep < 0
        if not open_.any():
            return rep
        live = open_[b]
        a, b = a[live], b[live]
        best = np.full(n, n, np.int64)        # best representative among each image's better neighbours
        is_rep = rep[a] == a
        np.minimum.at(best, b[is_rep], a[is_rep])
        waiting = np.full(n, n, np.int64)     # best better neighbour not placed yet
        unplaced = rep[a] < 0
        np.minimum.at(waiting, b[unplaced], a[unplaced])
        joins = open_ & (best < waiting)
        leads = open_ & (best == n) & (waiting == n)
        rep[joins] = best[joins]
        rep[leads] = np.flatnonzero(leads)
    return _place_in_order(rep, a, b)


def _place_in_order(rep: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The greedy itself, one image at a time, for whatever the rounds left open."""
    keep = rep[b] < 0
    a, b = a[keep], b[keep]
    order = np.argsort(b, kind="stable")
    a, b = a[order], b[order]
    starts = np.searchsorted(b, np.arange(len(rep) + 1))
    for u in np.flatnonzero(rep < 0).tolist():
        better = a[starts[u]:starts[u + 1]]
        reps = better[rep[better] == better]
        rep[u] = reps.min() if len(reps) else u
    return rep


def components(per_group: int, groups: int, bounds: np.ndarray, parts: list[dict]) -> tuple[list[dict], dict]:
    """Bounded duplicate groups over every home's rows and pairs; per group the best rows stay, up
    to `per_group` with distinct captions; the others get dup_of = the representative (the group's
    best row). Returns (row, dup_of) per decide group and the counts (sizes histogram included)."""
    cols = concat(parts) if parts else {}
    if not parts or not len(cols["row"]):
        return [{"row": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64)} for _ in range(groups)], \
            _group_counts(np.empty(0, np.int64), 0, 0)
    classes, ci = np.unique(cols["cls"], return_inverse=True)
    same, a, b = cols["same"], np.searchsorted(classes, cols["a"]), np.searchsorted(classes, cols["b"])
    label = np.arange(len(classes))
    nodes, root = roots(np.stack([a[same], b[same]]))      # equal bytes: one image
    label[nodes] = root
    image = np.unique(label, return_inverse=True)[1][ci]    # each row's image
    pref = cols["pref"]
    rank_rows = np.lexsort((cols["row"], *(-pref[:, k] for k in reversed(range(pref.shape[1])))))
    row_rank = np.empty(len(rank_rows), np.int64)
    row_rank[rank_rows] = np.arange(len(rank_rows))
    images = image.max() + 1
    best_rank = np.full(images, len(row_rank), np.int64)
    np.minimum.at(best_rank, image, row_rank)
    image_rank = np.empty(images, np.int64)
    image_rank[np.argsort(best_rank)] = np.arange(images)
    first_row = np.empty(len(classes), np.int64)
    first_row[ci] = np.arange(len(ci))
    ia, ib = image_rank[image[first_row[a[~same]]]], image_rank[image[first_row[b[~same]]]]
    pairs = _ordered(np.stack([ia, ib]).astype(np.uint64)).astype(np.int64)
    rep = bounded_groups(images, pairs[0], pairs[1])
    group_of = rep[image_rank[image]]                       # each row's group: its representative's rank
    order = np.lexsort((row_rank, group_of))
    lab, cap = group_of[order], cols["caption"][order]
    group_start = np.r_[True, lab[1:] != lab[:-1]]
    best = cols["row"][order][np.maximum.accumulate(np.where(group_start, np.arange(len(lab)), 0))]
    _, first_caption = np.unique(np.stack([lab.astype(np.uint64), cap]), axis=1, return_index=True)
    distinct = np.zeros(len(lab), bool)
    distinct[first_caption] = True
    ordinal = np.cumsum(distinct) - np.repeat(np.cumsum(distinct)[group_start] - distinct[group_start],
                                              np.diff(np.r_[np.flatnonzero(group_start), len(lab)])) - 1
    keep = distinct & (ordinal < per_group)
    dropped, dup_of = cols["row"][order][~keep], best[~keep]
    sort = np.argsort(dropped)
    dropped, dup_of = dropped[sort], dup_of[sort]
    cuts = np.searchsorted(dropped >> 32, bounds)
    sizes = np.diff(np.r_[np.flatnonzero(group_start), len(lab)])
    return [{"row": dropped[cuts[g]:cuts[g + 1]], "dup_of": dup_of[cuts[g]:cuts[g + 1]]} for g in range(groups)], \
        _group_counts(sizes, int(pairs.shape[1]), int(same.sum()))


def _group_counts(sizes: np.ndarray, pairs: int, same: int) -> dict:
    """Rows per duplicate group as a histogram in powers of two ("2", "3-4", "5-8", ...)."""
    sizes = sizes[sizes > 1]
    hist: dict[str, int] = {}
    for lo in [2] + [2 ** p + 1 for p in range(1, 40)]:
        hi = 2 if lo == 2 else 2 * (lo - 1)
        n = int(((sizes >= lo) & (sizes <= hi)).sum())
        if n:
            hist[str(lo) if lo == hi else f"{lo}-{hi}"] = n
        if hi >= sizes.max(initial=0):
            break
    return {"groups": int(len(sizes)), "rows_in_groups": int(sizes.sum()), "largest": int(sizes.max(initial=0)),
            "size_histogram": hist, "pairs": pairs, "same_edges": same}


# -- semantic clusters -------------------------------------------------------------------------

def normalised(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows as float32, and which rows had a usable (finite, non-zero) embedding."""
    emb = np.asarray(emb, np.float32)
    norm = np.linalg.norm(emb, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    return emb[ok] / norm[ok, None], ok


def nearest(emb: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centroid, in blocks of 4,096 rows (memory: 4,096 x k floats)."""
    return np.concatenate([np.argmax(emb[i:i + 4096] @ centroids.T, axis=1) for i in range(0, len(emb), 4096)]
                          or [np.empty(0, np.int64)]).astype(np.int64)


def kmeans(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids (unit rows) of unit-row samples, seeded: the same every run."""
    rng = np.random.default_rng(seed)
    centroids = sample[rng.choice(len(sample), size=k, replace=False)].astype(np.float32)
    for _ in range(KMEANS_ITERATIONS):
        label = nearest(sample, centroids)
        sums = csr_matrix((np.ones(len(sample), np.float32), (label, np.arange(len(sample)))),
                          shape=(k, len(sample))) @ sample
        norm = np.linalg.norm(sums, axis=1)
        filled = norm > 0
        centroids[filled] = sums[filled] / norm[filled, None]
    return centroids
