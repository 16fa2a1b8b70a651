"""Thresholds by rank: `filters.clip_min: p30` is the value below which 30% of the rows that reach the rule lie.

A rank is written `pNN` (a percentile, 0-100, decimals allowed) or `pNN by COLUMN` (one value per value
of that column: per source, per language). decide resolves it over the whole run from mergeable
fixed-bin histograms: each task counts the compared values of the rows that reach the rule into
BINS bins between the run's smallest and largest value (integer columns get one bin per integer),
the counts are summed (in any order: the result is the same), and the cut goes at the bin edge whose
count of rows below it is nearest the rank. The share a resolved threshold drops is therefore known
exactly (`share`, recorded with it), and it is off the asked rank by at most half the rows of the bin
at the cut (`bin_rows`): only ties, values no threshold can split, stay in one bin. The driver holds
these counts, never rows.

For a rule that drops values below its threshold (clip_min: p30) the lowest NN% are dropped; for one
that drops values above (nsfw_max: p99) everything above the NN-th percentile is, the highest (100-NN)%.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

BINS = 1 << 14
PATTERN = r"^p(100|[0-9]{1,2}(\.[0-9]+)?)( by [A-Za-z_][A-Za-z0-9_.-]*)?$"
_RANK = re.compile(PATTERN)


@dataclass(frozen=True)
class Rank:
    percentile: float
    by: str | None = None

    @property
    def text(self) -> str:
        return f"p{self.percentile:g}" + (f" by {self.by}" if self.by else "")


def parse(value: Any) -> Rank | None:
    """The rank a threshold's config value asks for, or None for a plain number (or null)."""
    if not isinstance(value, str):
        return None
    match = _RANK.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a rank: write pNN or pNN by COLUMN (e.g. p30, p99.5 by LANGUAGE)")
    return Rank(float(match.group(1)), match.group(3)[4:] if match.group(3) else None)


def edges(lo: float, hi: float, integral: bool) -> np.ndarray:
    """BINS bins over [lo, hi] (one per integer when the values are integers and few enough); the last edge
    lies just above hi, so every value falls in a bin: bin i holds edges[i] <= x < edges[i + 1]."""
    if integral and hi - lo < BINS:
        return np.arange(np.floor(lo), np.floor(hi) + 2, dtype=np.float64)
    out = np.linspace(lo, hi, BINS + 1) if hi > lo else np.array([lo, hi], np.float64)
    out[-1] = np.nextafter(hi, np.inf)
    return out


def counts(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Finite values counted into the bins of `cuts` (int64, len(cuts) - 1)."""
    v = values[np.isfinite(values)]
    index = np.clip(np.searchsorted(cuts, v, side="right") - 1, 0, len(cuts) - 2)
    return np.bincount(index, minlength=len(cuts) - 1).astype(np.int64)


def resolve(hist: np.ndarray, cuts: np.ndarray, rank: Rank, drops: str, integral: bool) -> dict:
    """The threshold for `rank` from summed counts: its value, the rows that reached the rule (with a value),
    the rows it drops and their share, and the rows of the bin at the cut (the tolerance)."""
    n = int(hist.sum())
    below = np.r_[0, np.cumsum(hist)]                  # rows below each edge
    j = int(np.argmin(np.abs(below - rank.percentile / 100 * n))) if n else 0
    edge = float(cuts[j])
    if drops == "below":                                # drops x < edge: exactly below[j] rows
        value, dropped = edge, int(below[j])
    elif drops == "at_or_above":                        # drops x >= edge
        value, dropped = edge, n - int(below[j])
    else:                                               # "above" drops x > value: x >= edge
        value = edge - 1 if integral else float(np.nextafter(edge, -np.inf))
        dropped = n - int(below[j])
    around = hist[max(j - 1, 0):j + 1]
    return {"rank": rank.text, "value": value, "rows": n, "dropped": dropped,
            "share": round(dropped / n, 6) if n else None, "bin_rows": int(around.max()) if len(around) else 0}


def per_row(resolved: dict, groups: np.ndarray) -> np.ndarray:
    """Each row's threshold under a `by` rank ({"values": [[group, value], ...]}): NaN where its group has none."""
    table = {g: v for g, v in resolved["values"]}
    return np.array([table.get(g, np.nan) if g is not None else table.get(None, np.nan) for g in groups.tolist()],
                    np.float64)


def describe(found: dict) -> str:
    """A resolved rank as a person reads it: its value and the share it dropped, or a value per group."""
    if "values" in found:
        return f"by {found['by']}: " + "; ".join(f"{g}: {f['value']:.6g}" for g, f in found["values"])
    share = f"{100 * found['share']:.2f}%" if found["share"] is not None else "none"
    return f"{found['value']:.6g} (drops {share} of the {found['rows']:,} rows that reach it)"
