"""Style rebalance: down-sample styles so their shares meet the configured caps and floors.

Shares are counted among surviving rows that carry a style label; rows whose style is null
(the style model did not run, or failed on that row) are never rebalanced and are not part
of any share. The driver solves for the largest kept set that meets every target (a tiny
linear program, one variable per style), which fixes how many rows of each style stay; a
row stays when its key's hash is among the smallest that many of its style. The hash makes
the choice deterministic and independent of shard order and of every other column.

At scale this is two passes over per-group tasks, never rows on the driver: pass one counts
each style's rows per hash bucket (the top HASH_BUCKET_BITS bits), which locates the bucket
where each style's cut falls; pass two gathers only the hashes inside that bucket, which
gives the exact cut. A row then stays when its hash is at most its style's limit.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import RebalanceConfig
from curate.run.runtime import log

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every output bit depends on every input bit."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def key_hashes(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hash of each key's UTF-8 bytes (FNV-1a, then mixed), stable across runs and platforms.

    Vectorised over the Arrow buffers: one numpy pass per byte position, no per-row objects.
    """
    arr = (keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys).cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] else np.empty(0, np.uint8)
    start, length = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), _FNV_OFFSET, np.uint64)
    for j in range(int(length.max(initial=0))):
        live = length > j
        h[live] = (h[live] ^ data[start[live] + j].astype(np.uint64)) * _FNV_PRIME
    return _mix(h)


def keep_counts(counts: dict[str, int], cfg: RebalanceConfig) -> dict[str, int]:
    """Rows to keep per style: the most rows in total such that every style's share meets its target.

    Targets naming a style with no surviving rows are ignored (a floor on an absent style would
    otherwise force dropping everything).
    """
    styles = sorted(s for s, n in counts.items() if n > 0)
    if not styles or not any(s in cfg.styles for s in styles):
        return dict(counts)
    rows, bound = [], []
    for i, style in enumerate(styles):
        target = cfg.styles.get(style)
        if target is None:
            continue
        if target.max_share is not None:   # a_i - max·Σa ≤ 0
            rows.append([(1.0 if j == i else 0.0) - target.max_share for j in range(len(styles))])
            bound.append(0.0)
        if target.min_share is not None:   # min·Σa - a_i ≤ 0
            rows.append([target.min_share - (1.0 if j == i else 0.0) for j in range(len(styles))])
            bound.append(0.0)
    from scipy.optimize import linprog  # here: scipy.optimize costs seconds to import, and only decide needs it

    result = linprog(c=-np.ones(len(styles)), A_ub=np.array(rows), b_ub=np.array(bound),
                     bounds=[(0, counts[s]) for s in styles], method="highs")
    if not result.success:
        raise ValueError(f"rebalance: no kept set meets rebalance.styles: {result.message}")
    kept = {s: int(math.floor(a + 1e-6)) for s, a in zip(styles, result.x)}
    if sum(kept.values()) == 0:
        log.warning("rebalance: the targets can only be met by dropping every labelled row")
    return kept


def style_labels(t: pa.Table, cfg: RebalanceConfig) -> pa.ChunkedArray | pa.Array:
    """The style each row is counted under, from rebalance.style_source; null where unlabelled.

    clip: the style scorer's column; column: an input column through style_map (unlisted
    values stay unlabelled); graphic: photo / graphic at graphic_threshold of the CPU score.
    """
    n = t.num_rows
    if cfg.style_source == "clip":
        return t.column("style") if "style" in t.column_names else pa.nulls(n, pa.string())
    if cfg.style_source == "column":
        source = t.column(cfg.style_column).cast(pa.string())
        values = pa.array(list(cfg.style_map), pa.string())
        labels = pa.array(list(cfg.style_map.values()), pa.string())
        return pc.take(labels, pc.index_in(source, value_set=values))
    if "graphic" not in t.column_names:
        return pa.nulls(n, pa.string())
    drawn = pc.greater_equal(t.column("graphic"), pa.scalar(cfg.graphic_threshold, pa.float32()))
    return pc.if_else(drawn, "graphic", "photo")


HASH_BUCKET_BITS = 12
KEEP_NONE = -1   # a limit below every hash: the style keeps no row


def _bucket(hashes: np.ndarray) -> np.ndarray:
    return (hashes >> np.uint64(64 - HASH_BUCKET_BITS)).astype(np.int64)


def _members(style: pa.ChunkedArray | pa.Array, name: str, alive: np.ndarray) -> np.ndarray:
    return alive & pc.equal(style, name).fill_null(False).to_numpy(zero_copy_only=False)


def bucket_counts(style: pa.ChunkedArray | pa.Array, hashes: np.ndarray, alive: np.ndarray) -> dict:
    """Pass one, per group: rows per style and hash bucket among survivors, plus the unlabelled."""
    labelled = alive & pc.is_valid(style).to_numpy(zero_copy_only=False)
    counts: dict = {"_unlabelled": int((alive & ~labelled).sum())}
    for name in pc.unique(pc.filter(style, pa.array(labelled))).to_pylist():
        counts[name] = np.bincount(_bucket(hashes[_members(style, name, labelled)]), minlength=1 << HASH_BUCKET_BITS)
    return counts


def merge_counts(parts: list[dict]) -> dict:
    total: dict = {"_unlabelled": 0}
    for part in parts:
        for name, c in part.items():
            total[name] = total.get(name, 0) + c
    return total


def plan_cuts(counts: dict, cfg: RebalanceConfig) -> tuple[dict, dict[str, tuple[int, int]]]:
    """The styles report, and per style to cut: (bucket of the cut, rows to keep inside that bucket)."""
    before = {name: int(c.sum()) for name, c in sorted(counts.items()) if name != "_unlabelled" and c.sum() > 0}
    report = {"before": before, "after": dict(before), "unlabelled": counts["_unlabelled"]}
    if not cfg.styles:
        return report, {}
    if not before:
        report["note"] = "no surviving row has a style label: nothing was rebalanced"
        log.warning("rebalance: %s", report["note"])
        return report, {}
    kept = keep_counts(before, cfg)
    report["after"] = kept
    cuts = {}
    for name, keep in kept.items():
        if keep < before[name]:
            cum = np.cumsum(counts[name])
            bucket = int(np.searchsorted(cum, keep, side="right"))   # first bucket whose count passes `keep`
            cuts[name] = (bucket, keep - (int(cum[bucket - 1]) if bucket else 0))
    return report, cuts


def hashes_in_cut(style: pa.ChunkedArray | pa.Array, hashes: np.ndarray, alive: np.ndarray,
                  cuts: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Pass two, per group: each cut style's hashes inside its cut bucket."""
    return {name: hashes[_members(style, name, alive) & (_bucket(hashes) == bucket)]
            for name, (bucket, _) in cuts.items()}


def style_limits(cuts: dict[str, tuple[int, int]], found: list[dict[str, np.ndarray]]) -> dict[str, int]:
    """Per style, the largest hash that stays: the need-th smallest hash inside the cut bucket."""
    out = {}
    for name, (bucket, need) in cuts.items():
        if need > 0:
            out[name] = int(np.sort(np.concatenate([f[name] for f in found]))[need - 1])
        else:
            out[name] = (bucket << (64 - HASH_BUCKET_BITS)) - 1 if bucket else KEEP_NONE
    return out


def over_limit(style: pa.ChunkedArray | pa.Array, hashes: np.ndarray, alive: np.ndarray,
               style_limits: dict[str, int]) -> np.ndarray:
    """Rows to drop as `rebalanced`: survivors of a cut style whose hash is above its limit."""
    drop = np.zeros(len(hashes), bool)
    for name, limit in style_limits.items():
        over = _members(style, name, alive)
        if limit != KEEP_NONE:
            over &= hashes > np.uint64(limit)
        drop |= over
    return drop
