"""Style rebalance: down-sample styles so their shares meet the configured caps and floors.

Shares are counted among surviving rows that carry a style label; rows whose style is null
(the style model did not run, or failed on that row) are never rebalanced and are not part
of any share. The driver solves for the largest kept set that meets every target (a tiny
linear program, one variable per style), which fixes how many rows of each style stay; a
row stays when its key's hash is among the smallest that many of its style. The hash makes
the choice deterministic and independent of shard order and of every other column.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.optimize import linprog

from curate.config import RebalanceConfig
from curate.runtime import log


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
    result = linprog(c=-np.ones(len(styles)), A_ub=np.array(rows), b_ub=np.array(bound),
                     bounds=[(0, counts[s]) for s in styles], method="highs")
    if not result.success:
        raise ValueError(f"rebalance: no kept set meets rebalance.styles: {result.message}")
    kept = {s: int(math.floor(a + 1e-6)) for s, a in zip(styles, result.x)}
    if sum(kept.values()) == 0:
        log.warning("rebalance: the targets can only be met by dropping every labelled row")
    return kept


def rebalance(style: pa.Array, keys: pa.Array, alive: np.ndarray, cfg: RebalanceConfig) -> tuple[np.ndarray, dict]:
    """Rows to drop as `rebalanced`, and the style counts before and after.

    `alive` marks rows that passed every rule and dedup; only those are counted and sampled.
    """
    encoded = pc.dictionary_encode(style).combine_chunks() if isinstance(style, pa.ChunkedArray) \
        else pc.dictionary_encode(style)
    names = encoded.dictionary.to_pylist()
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    labelled = alive & (codes >= 0)
    counts = np.bincount(codes[labelled], minlength=len(names))
    before = {name: int(n) for name, n in sorted(zip(names, counts)) if n > 0}
    drop = np.zeros(len(codes), bool)
    report = {"before": before, "after": dict(before), "unlabelled": int((alive & ~labelled).sum())}
    if not cfg.styles:
        return drop, report
    if not before:
        report["note"] = "no surviving row has a style label: nothing was rebalanced"
        log.warning("rebalance: %s", report["note"])
        return drop, report
    kept = keep_counts(before, cfg)
    hashes = key_hashes(keys)
    for name, keep in kept.items():
        members = np.flatnonzero(labelled & (codes == names.index(name)))
        order = members[np.lexsort((members, hashes[members]))]
        drop[order[keep:]] = True
    report["after"] = kept
    return drop, report
