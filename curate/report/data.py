"""What the report shows, computed from a run directory's files (never from a live pipeline).

The manifest is read once, without captions or URLs (those come later for sampled rows only), so
a report on millions of rows costs a few column reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from manifests.inspect import funnel_of, open_manifest, read_columns
from manifests.schema import ALL


@dataclass(frozen=True)
class Rule:
    """A config threshold on a metric: `key` is its dotted config name, `drops` the side it removes."""

    key: str
    drops: str  # "below" (x < t), "above" (x > t) or "at_or_above" (x >= t), as curate/decide.py applies it


@dataclass(frozen=True)
class Metric:
    title: str
    column: str
    rules: tuple[Rule, ...] = ()


MIN_SIDE = "min_side"  # derived: min(original_width, original_height), what filters.min_side compares
METRICS = (
    Metric("image size: shorter side of the original, px", MIN_SIDE, (Rule("filters.min_side", "below"),)),
    Metric("aspect ratio", "aspect_ratio", (Rule("filters.max_aspect_ratio", "above"),)),
    Metric("texture: entropy, bits", "entropy", (Rule("filters.min_entropy", "below"),)),
    Metric("texture: edge density", "edge_density", (Rule("filters.min_edge_density", "below"),)),
    Metric("caption length, characters", "n_chars", (Rule("text.min_chars", "below"), Rule("text.max_chars", "above"))),
    Metric("Chinese share of the caption", "zh_ratio", (Rule("text.min_zh_ratio", "below"),)),
    Metric("caption repetition", "repeat_ratio", (Rule("text.max_repeat_ratio", "above"),)),
    Metric("CLIP image-caption score", "clip_score", (Rule("filters.clip_min", "below"),)),
    Metric("aesthetic score", "aesthetic", (Rule("filters.aesthetic_min", "below"),)),
    Metric("NSFW probability", "nsfw", (Rule("filters.nsfw_max", "at_or_above"),)),
    Metric("watermark probability", "watermark", (Rule("filters.watermark_max", "at_or_above"),)),
    Metric("JPEG bits per pixel", "jpeg_bpp"),
)
LIGHT = ["key", "shard", "status", "keep", "reason", "dup_of", "style", "original_width", "original_height",
         *[m.column for m in METRICS if m.column != MIN_SIDE]]
BINS = 40
RANGE_SAMPLE = 1_000_000


@dataclass
class Run:
    """A run directory's files, each optional: a report of a half-finished run shows what exists."""

    root: Path
    config_text: str = ""
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def load_run(root: Path) -> Run:
    run = Run(root)
    if (root / "config.yaml").exists():
        run.config_text = (root / "config.yaml").read_text(encoding="utf-8")
        run.config = yaml.safe_load(run.config_text) or {}
    for name in ("stats", "models", "timings"):
        path = root / f"{name}.json"
        if path.exists():
            setattr(run, name, json.loads(path.read_text(encoding="utf-8")))
    run.timings = run.stats.get("timings") or run.timings
    run.models = run.models or run.stats.get("models", {})
    return run


def setting(config: dict, dotted: str):
    """A config value by dotted name; None when absent or disabled (null)."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_light(root: Path) -> tuple[pq.ParquetFile, pa.Table]:
    """The manifest handle (for later sample reads) and every column the report needs, minus text."""
    pf = open_manifest(str(root))
    return pf, read_columns(pf, LIGHT)


def values(table: pa.Table, column: str) -> np.ndarray | None:
    """Finite values of a metric over the rows that have it (all scored rows), or None if absent."""
    if column == MIN_SIDE:
        if "original_width" not in table.column_names:
            return None
        col = pc.min_element_wise(table.column("original_width"), table.column("original_height"))
    elif column in table.column_names:
        col = table.column(column)
    else:
        return None
    v = col.to_numpy().astype(np.float64, copy=False)
    return v[np.isfinite(v)]


@dataclass
class Histogram:
    metric: Metric
    doc: str
    counts: np.ndarray
    edges: np.ndarray
    n: int
    outside: int
    thresholds: list[tuple[Rule, float, float]]  # rule, value, share of scored rows it removes


def histogram(metric: Metric, v: np.ndarray, config: dict) -> Histogram:
    """Bins over p1..p99 widened to show every threshold; rows beyond go to the end bins (long tails
    such as 4000:1 banners or 3000-character captions would otherwise squash the body into one bar)."""
    thresholds = []
    for rule in metric.rules:
        t = setting(config, rule.key)
        if t is None:
            continue
        removed = {"below": v < t, "above": v > t, "at_or_above": v >= t}[rule.drops]
        thresholds.append((rule, float(t), float(removed.mean())))
    lo, hi = np.quantile(v[:: max(len(v) // RANGE_SAMPLE, 1)], [0.01, 0.99])  # the axis only: counts are exact
    lo, hi = min([lo, *(t for _, t, _ in thresholds)]), max([hi, *(t for _, t, _ in thresholds)])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    integral = metric.column == MIN_SIDE or pa.types.is_integer(ALL[metric.column].type)
    if integral and hi - lo <= BINS:
        edges = np.arange(np.floor(lo), np.floor(hi) + 2) - 0.5
    else:
        edges = np.linspace(lo, hi, BINS + 1)
    counts, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    doc = ("min(original_width, original_height); " + ALL["original_width"].doc) if metric.column == MIN_SIDE \
        else ALL[metric.column].doc
    outside = int(((v < edges[0]) | (v > edges[-1])).sum())
    return Histogram(metric, doc, counts, edges, len(v), outside, thresholds)


def histograms(table: pa.Table, config: dict) -> list[Histogram]:
    """One histogram per metric present with at least one scored value, in METRICS order."""
    out = []
    for metric in METRICS:
        v = values(table, metric.column)
        if v is not None and len(v):
            out.append(histogram(metric, v, config))
    return out


def style_balance(table: pa.Table) -> dict | None:
    """Style counts before rebalance (kept + rebalanced rows) and after (kept); None without styles.

    Rebalance is the last rule, so the rows it saw are exactly those two groups.
    """
    if "style" not in table.column_names or table.column("style").null_count == table.num_rows:
        return None
    keep = pc.fill_null(table.column("keep"), False)
    seen = pc.or_(keep, pc.fill_null(pc.equal(table.column("reason"), "rebalanced"), False))

    def counts(mask) -> dict[str, int]:
        return {r["values"]: r["counts"] for r in pc.value_counts(table.column("style").filter(mask)).to_pylist()
                if r["values"] is not None}

    before, after = counts(seen), counts(keep)
    labels = sorted(before, key=lambda s: -before[s])
    return {"labels": labels, "before": [before[s] for s in labels], "after": [after.get(s, 0) for s in labels]}


def funnel(table: pa.Table) -> dict:
    return funnel_of(table.column("reason"))
