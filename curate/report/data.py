"""What the report shows, computed from a run directory's files (never from a live pipeline).

The manifest dataset is streamed twice, without captions or URLs (those come later for sampled
rows only), and never held whole: the first pass counts reasons and styles and keeps a bounded
sample of each metric to place its axis; the second counts every value into the bins and every
threshold's drops exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from curate.storage import Storage, join
from manifests.inspect import Sampler, funnel_of_counts, value_counts
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
    Metric("text area: share of the image under detected text", "text_area", (Rule("filters.text_area_max", "above"),)),
    Metric("JPEG bits per pixel", "jpeg_bpp"),
)
LIGHT = ["key", "shard", "status", "keep", "reason", "dup_of", "style_label", "original_width", "original_height",
         *[m.column for m in METRICS if m.column != MIN_SIDE]]
BINS = 40
RANGE_SAMPLE = 1_000_000


@dataclass
class Run:
    """A run directory's files, each optional: a report of a half-finished run shows what exists."""

    root: str
    config_text: str = ""
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def load_run(root: str, storage: Storage) -> Run:
    run = Run(root)
    if storage.exists(join(root, "config.yaml")):
        run.config_text = storage.read_text(join(root, "config.yaml"))
        run.config = yaml.safe_load(run.config_text) or {}
    for name in ("stats", "models", "timings"):
        uri = join(root, f"{name}.json")
        if storage.exists(uri):
            setattr(run, name, storage.read_json(uri))
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


def threshold(run: Run, dotted: str) -> float | None:
    """A threshold as decide applied it: a rank (pNN) as the value it resolved to (stats.json `thresholds`);
    None when off, or when it differs per value of a column (pNN by COLUMN)."""
    value = setting(run.config, dotted)
    if isinstance(value, str):
        value = (run.stats.get("thresholds") or {}).get(dotted, {}).get("value")
    return float(value) if isinstance(value, (int, float)) else None


def metric_column(table: pa.Table, column: str) -> pa.Array | pa.ChunkedArray | None:
    """A metric's values in a batch (MIN_SIDE derived), or None when the manifest lacks it."""
    if column == MIN_SIDE:
        if "original_width" not in table.column_names:
            return None
        return pc.min_element_wise(table.column("original_width"), table.column("original_height"))
    return table.column(column) if column in table.column_names else None


def finite(column) -> np.ndarray:
    v = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    return v[np.isfinite(v)]


class Tally:
    """Pass 1: rows per reason, styles before and after rebalance, and each metric's axis sample."""

    def __init__(self, rows: int, seed: int = 0):
        self.reasons: dict = {}
        self.before: dict = {}
        self.after: dict = {}
        self.samplers = {m.column: Sampler(RANGE_SAMPLE / max(rows, 1), seed) for m in METRICS}

    def add(self, table: pa.Table) -> None:
        value_counts(table.column("reason"), self.reasons)
        if "style_label" in table.column_names:   # the label rebalance counted, from rebalance.style_source
            keep = pc.fill_null(table.column("keep"), False)
            seen = pc.or_(keep, pc.fill_null(pc.equal(table.column("reason"), "rebalanced"), False))
            value_counts(table.column("style_label").filter(seen), self.before)
            value_counts(table.column("style_label").filter(keep), self.after)
        for column, sampler in self.samplers.items():
            values = metric_column(table, column)
            if values is not None:
                sampler.add(values)

    def funnel(self) -> dict:
        return funnel_of_counts(self.reasons)

    def style_balance(self) -> dict | None:
        """Style counts before rebalance (kept + rebalanced rows) and after (kept); None without styles.

        Rebalance is the last rule, so the rows it saw are exactly those two groups.
        """
        before = {s: n for s, n in self.before.items() if s is not None}
        if not before:
            return None
        labels = sorted(before, key=lambda s: -before[s])
        return {"labels": labels, "before": [before[s] for s in labels],
                "after": [self.after.get(s, 0) for s in labels]}


@dataclass
class Histogram:
    metric: Metric
    doc: str
    edges: np.ndarray
    rules: list[tuple[Rule, float]]
    counts: np.ndarray
    removed: list[int]
    n: int = 0
    outside: int = 0

    @property
    def thresholds(self) -> list[tuple[Rule, float, float]]:
        """(rule, value, share of scored rows it removes)."""
        return [(rule, t, removed / max(self.n, 1)) for (rule, t), removed in zip(self.rules, self.removed)]

    def add(self, v: np.ndarray) -> None:
        """Pass 2: count a batch's finite values into the bins (the tails into the end bins)."""
        self.counts += np.histogram(np.clip(v, self.edges[0], self.edges[-1]), bins=self.edges)[0]
        self.n += len(v)
        self.outside += int(((v < self.edges[0]) | (v > self.edges[-1])).sum())
        for i, (rule, t) in enumerate(self.rules):
            self.removed[i] += int({"below": v < t, "above": v > t, "at_or_above": v >= t}[rule.drops].sum())


def axis(metric: Metric, sample: np.ndarray, run: Run) -> Histogram:
    """Bins over p1..p99 (of the sample) widened to show every threshold; rows beyond go to the end
    bins (long tails such as 4000:1 banners or 3000-character captions would otherwise squash the body)."""
    rules = [(rule, t) for rule in metric.rules if (t := threshold(run, rule.key)) is not None]
    lo, hi = np.quantile(sample, [0.01, 0.99])
    lo, hi = min([lo, *(t for _, t in rules)]), max([hi, *(t for _, t in rules)])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    integral = metric.column == MIN_SIDE or pa.types.is_integer(ALL[metric.column].type)
    if integral and hi - lo <= BINS:
        edges = np.arange(np.floor(lo), np.floor(hi) + 2) - 0.5
    else:
        edges = np.linspace(lo, hi, BINS + 1)
    doc = ("min(original_width, original_height); " + ALL["original_width"].doc) if metric.column == MIN_SIDE \
        else ALL[metric.column].doc
    return Histogram(metric, doc, edges, rules, np.zeros(len(edges) - 1, np.int64), [0] * len(rules))


def axes(tally: Tally, run: Run) -> list[Histogram]:
    """One empty histogram per metric with at least one scored value, in METRICS order."""
    out = []
    for metric in METRICS:
        sample = tally.samplers[metric.column].values()
        if len(sample):
            out.append(axis(metric, sample, run))
    return out


def fill(hists: list[Histogram], table: pa.Table) -> None:
    for h in hists:
        h.add(finite(metric_column(table, h.metric.column)))


def pass2_columns(hists: list[Histogram]) -> list[str]:
    cols = []
    for h in hists:
        cols += ["original_width", "original_height"] if h.metric.column == MIN_SIDE else [h.metric.column]
    return cols
