"""What the report shows, computed from a run directory's files (never from a live pipeline).

The manifest dataset is streamed twice, without captions or URLs (those come later for sampled
rows only), and never held whole: the first pass counts reasons and styles and keeps a bounded
sample of each metric to place its axis; the second counts every value into the bins and every
threshold's drops exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from curate.config import redact
from curate.inspect import Sampler, value_counts
from curate.run.storage import Storage, join
from filters.declare import Column
from manifests.funnel import Funnel
from manifests.rules import COMPARE, ROW_RULES, Rule, rules_on
from manifests.schema import ALL

MIN_SIDE = "min_side"  # derived: the shorter original side, what the min-combined size rule (too_small) compares
# Presentation only: each histogram's title, in the order the report shows them. The columns, the rules whose
# lines each draws and their comparators come from the declarations and manifests/rules.py.
TITLES: dict[str, str] = {
    MIN_SIDE: "image size: shorter side of the original, px",
    "aspect_ratio": "aspect ratio",
    "entropy": "texture: entropy, bits",
    "edge_density": "texture: edge density",
    "n_chars": "caption length, characters",
    "zh_ratio": "Chinese share of the caption",
    "repeat_ratio": "caption repetition",
    "caption_urls": "distinct URLs sharing the caption (before download)",
    "clip_score": "CLIP image-caption score",
    "aesthetic": "aesthetic score",
    "nsfw": "NSFW probability",
    "watermark": "watermark probability",
    "text_area": "text area: share of the image under detected text",
    "jpeg_bpp": "JPEG bits per pixel",
}


@dataclass(frozen=True)
class Metric:
    """One histogram: a manifest column, or a combined rule's value (MIN_SIDE), with the table's rules on it."""

    title: str
    column: str
    inputs: tuple[str, ...]          # the manifest columns it is computed from
    doc: str
    integral: bool
    rules: tuple[Rule, ...] = ()

    def values(self, table: pa.Table) -> pa.Array | pa.ChunkedArray | None:
        """Its values in a batch, or None when the manifest lacks an input; a combined value is the rule's own."""
        if any(c not in table.column_names for c in self.inputs):
            return None
        if self.inputs == (self.column,):
            return table.column(self.column)
        cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in self.inputs}
        return pa.array(self.rules[0].value(cols))


def _combined_name(rule: Rule) -> str:
    """A combined rule's metric: MIN_SIDE for the shorter original side, else the rule's reason."""
    return MIN_SIDE if rule.combine == "min" and set(rule.columns) == {"original_width", "original_height"} \
        else rule.reason


def metrics(rules: tuple[Rule, ...] = ROW_RULES, columns: dict[str, Column] = ALL) -> tuple[Metric, ...]:
    """One histogram per titled metric that `columns` declare or `rules` combine (TITLES order), then one per
    other column a threshold rule compares, titled by its name; each draws the lines of the rules in `rules`
    that threshold it."""
    combined: dict[str, list[Rule]] = {}
    for rule in rules:
        if rule.combine and rule.threshold and rule.drops in COMPARE:
            combined.setdefault(_combined_name(rule), []).append(rule)
    compared = [r.columns[0] for r in rules if rules_on(r.columns[0], (r,))]
    out = []
    for name in dict.fromkeys([*TITLES, *combined, *compared]):
        if name in combined:
            on = tuple(combined[name])
            inputs = on[0].columns
            doc = f"{on[0].combine}({', '.join(inputs)}); " + "; ".join(columns[c].doc for c in inputs)
        elif name in columns:
            on, inputs, doc = rules_on(name, rules), (name,), columns[name].doc
        else:
            continue   # a title for a column these declarations lack
        integral = all(pa.types.is_integer(columns[c].type) for c in inputs)
        out.append(Metric(TITLES.get(name, name), name, inputs, doc, integral, on))
    return tuple(out)


METRICS = metrics()
LIGHT = ["key", "shard", "status", "keep", "reason", "dup_of", "style_label", "original_width", "original_height",
         *[c for m in METRICS for c in m.inputs]]
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
    rules_off: dict = field(default_factory=dict)   # decide's {reason: why the rule did not apply}


def load_run(root: str, storage: Storage) -> Run:
    """The run's files; config.yaml as shown is redacted again (a run written before redaction existed
    may hold a secret in storage.options)."""
    run = Run(root)
    if storage.exists(join(root, "config.yaml")):
        run.config = yaml.safe_load(storage.read_text(join(root, "config.yaml"))) or {}
        run.config_text = yaml.safe_dump(redact(run.config), sort_keys=False, allow_unicode=True)
    for name in ("stats", "models", "timings"):
        uri = join(root, f"{name}.json")
        if storage.exists(uri):
            setattr(run, name, storage.read_json(uri))
    decided = join(root, "decisions", "_decided.json")
    if storage.exists(decided):
        run.rules_off = storage.read_json(decided).get("rules_off") or {}
    run.timings = run.timings or run.stats.get("timings") or {}
    run.models = run.models or run.stats.get("models", {})
    return run


def setting(config: dict, dotted: str, absent=None):
    """A config value by dotted name; `absent` when config.yaml lacks it, None when disabled (null)."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return absent
        node = node[part]
    return node


def threshold(run: Run, dotted: str) -> float | None:
    """A threshold as decide applied it: a rank (pNN) as the value it resolved to (stats.json `thresholds`);
    None when off, or when it differs per value of a column (pNN by COLUMN)."""
    value = setting(run.config, dotted)
    if isinstance(value, str):
        value = (run.stats.get("thresholds") or {}).get(dotted, {}).get("value")
    return float(value) if isinstance(value, (int, float)) else None


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
        self.metrics = {m.column: m for m in METRICS}

    def add(self, table: pa.Table) -> None:
        value_counts(table.column("reason"), self.reasons)
        if "style_label" in table.column_names:   # the label rebalance counted, from rebalance.style_source
            keep = pc.fill_null(table.column("keep"), False)
            seen = pc.or_(keep, pc.fill_null(pc.equal(table.column("reason"), "rebalanced"), False))
            value_counts(table.column("style_label").filter(seen), self.before)
            value_counts(table.column("style_label").filter(keep), self.after)
        for column, sampler in self.samplers.items():
            values = self.metrics[column].values(table)
            if values is not None:
                sampler.add(values)

    def funnel(self) -> dict:
        return Funnel.of_counts(self.reasons).to_dict()

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
            self.removed[i] += int(COMPARE[rule.drops](v, t).sum())


def axis(metric: Metric, sample: np.ndarray, run: Run) -> Histogram:
    """Bins over p1..p99 (of the sample) widened to show every threshold that applied (not in decide's
    rules_off; a rank as the value it resolved to); rows beyond go to the end bins (long tails such as
    4000:1 banners or 3000-character captions would otherwise squash the body)."""
    rules = [(rule, t) for rule in metric.rules
             if rule.reason not in run.rules_off and (t := threshold(run, rule.threshold)) is not None]
    lo, hi = np.quantile(sample, [0.01, 0.99])
    lo, hi = min([lo, *(t for _, t in rules)]), max([hi, *(t for _, t in rules)])
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    if metric.integral and hi - lo <= BINS:
        edges = np.arange(np.floor(lo), np.floor(hi) + 2) - 0.5
    else:
        edges = np.linspace(lo, hi, BINS + 1)
    return Histogram(metric, metric.doc, edges, rules, np.zeros(len(edges) - 1, np.int64), [0] * len(rules))


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
        h.add(finite(h.metric.values(table)))


def pass2_columns(hists: list[Histogram]) -> list[str]:
    return [c for h in hists for c in h.metric.inputs]


def why_off(rule: Rule, config: dict, off: dict[str, str]) -> str | None:
    """Why a rule did not apply: decide's rules_off (_decided.json), or a null threshold in the config."""
    if rule.reason in off:
        return off[rule.reason]
    if rule.threshold and setting(config, rule.threshold, absent=False) is None:
        return f"{rule.threshold} is null"
    return None


def described(rule: Rule, config: dict) -> str:
    """Rule.describe with the run's value, when its config.yaml has one."""
    if rule.threshold and setting(config, rule.threshold) is not None:
        return rule.describe(_attributes(config))
    return rule.describe()


def _attributes(config: dict) -> SimpleNamespace:
    """config.yaml's mapping read by attribute, as Rule.describe reads a Config."""
    return json.loads(json.dumps(config), object_hook=lambda d: SimpleNamespace(**d))
