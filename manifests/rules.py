"""The rules table: every reason a row can be dropped for, in the order decide applies them.

A rule names its reason, the columns it reads, the config key of its threshold, its comparator,
and when it can run: `input` rules read only the caption's columns or the input's own, so they can
run before anything is downloaded; `download` rules read what the download recorded; `score` rules
read the score columns; `run` rules need the whole run (counts, duplicates, the rebalance) and
are computed by decide's global steps, not by `fails`. decide applies this table, and the report's
histogram lines, the card's funnel, `inspect` and the docs read it: nothing restates a comparator.
A row's reason is the first rule that fires.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np

from filters.declare import lookup
from filters.text import TEXT_COLUMNS, TextOptions, bilingual_spared, caption_row

When = Literal["input", "download", "score", "run"]
# below: x < t; above: x > t; at_or_above: x >= t; true: a flag column is set; present: a string column
# is non-empty; not_success: the download status is anything but success (a null status included).
Comparator = Literal["below", "above", "at_or_above", "true", "present", "not_success"]
SYMBOLS: dict[str, str] = {"below": "<", "above": ">", "at_or_above": ">=", "true": "is true",
                           "present": "is set", "not_success": "is not success"}
# The comparators against a threshold, as numpy functions of (values, threshold).
COMPARE: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "below": np.less, "above": np.greater, "at_or_above": np.greater_equal}


@dataclass(frozen=True)
class Rule:
    reason: str
    doc: str
    when: When
    columns: tuple[str, ...] = ()
    threshold: str | None = None        # dotted config key; its value None switches the rule off
    drops: Comparator | None = None
    combine: Literal["min"] | None = None   # several columns compared as one value (too_small: the shorter side)
    spare: Callable[[Mapping[str, np.ndarray], Any], np.ndarray] | None = None   # rows kept although they fail
    nan_drops: bool = False             # a missing value fails the rule (a size or texture not shown to pass)
    keys: tuple[str, ...] = ()          # other config keys (or whole sections) the rule reads, besides its threshold

    @property
    def config_keys(self) -> tuple[str, ...]:
        """Every config key that changes what this rule drops: its threshold, then its other keys."""
        return (*([self.threshold] if self.threshold else []), *self.keys)

    def limit(self, cfg: Any, resolved: Mapping[str, Any] | None = None) -> Any:
        """The threshold: its resolved value where decide resolved a rank (manifests/ranks.py), else the config's."""
        if resolved and self.threshold in resolved:
            return resolved[self.threshold]
        return lookup(cfg, self.threshold) if self.threshold else None

    @property
    def numeric(self) -> bool:
        """A threshold compared with a number: the kind a rank (pNN) may stand for."""
        return self.drops in COMPARE

    def active(self, cfg: Any) -> bool:
        """A thresholded rule whose threshold is null is off; rules without a threshold always apply."""
        return self.threshold is None or self.limit(cfg) is not None

    def value(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The compared value per row, as float (NaN where missing)."""
        if self.combine != "min":
            return np.asarray(columns[self.columns[0]], dtype=np.float64)
        return np.minimum.reduce([np.asarray(columns[c], dtype=np.float64) for c in self.columns])

    def fails(self, columns: Mapping[str, np.ndarray], cfg: Any, limit: Any = None) -> np.ndarray:
        """Rows this rule drops. A row whose value is missing (NaN) fails only a `nan_drops` rule: the
        size and texture floors, where an unknown value is not shown to pass; a missing model score
        never drops a row. `limit`: the threshold decide resolved (a number, or one per row), instead
        of the config's; a row whose threshold is NaN is not dropped by it."""
        n = len(columns[self.columns[0]])
        if not self.active(cfg):
            return np.zeros(n, bool)
        if self.drops == "true":
            out = np.asarray(columns[self.columns[0]], dtype=object)
            out = np.array([bool(v) for v in out], bool)
        elif self.drops == "present":
            out = np.array([isinstance(v, str) and v != "" for v in columns[self.columns[0]]], bool)
        elif self.drops == "not_success":
            out = np.array([v != "success" for v in columns[self.columns[0]]], bool)
        else:
            t = self.limit(cfg) if limit is None else limit
            if isinstance(t, str):
                raise ValueError(f"{self.threshold} is the rank {t!r}: decide resolves it over the whole run")
            x, t = self.value(columns), np.asarray(t, dtype=np.float64)
            with np.errstate(invalid="ignore"):
                out = COMPARE[self.drops](x, t)
            if self.nan_drops:
                out |= np.isnan(x)
        if self.spare is not None and out.any():
            out &= ~self.spare(columns, cfg)
        return out

    def describe(self, cfg: Any | None = None) -> str:
        """`column < filters.key (value)`: how the report and the docs print the rule."""
        if self.drops is None:
            return self.doc
        what = f"min({', '.join(self.columns)})" if self.combine == "min" else self.columns[0]
        if self.threshold is None:
            return f"{what} {SYMBOLS[self.drops]}"
        value = f" ({self.limit(cfg)})" if cfg is not None else ""
        return f"{what} {SYMBOLS[self.drops]} {self.threshold}{value}"


def _bilingual(columns: Mapping[str, np.ndarray], cfg: Any) -> np.ndarray:
    return bilingual_spared(columns["caption_norm"], cfg.text.keep_bilingual_share)


RULES: tuple[Rule, ...] = (
    Rule("shard_failed", "the row's shard could not be processed (failures.json names the error)", "run"),
    # Before download (the plan applies these; the row is never requested): the URL, the input's own
    # columns, the caption. decide applies them again from the same columns, so they come first.
    Rule("url_blocked", "the URL matches an entry of input.url_blocklist (url_blocked_by names it)", "input",
         ("url_blocked_by",), "input.url_blocklist", "present"),
    Rule("input_where", "input.where is not true for the row's own input columns", "input", ("where_excluded",),
         "input.where", "true"),
    Rule("caption_junk", "the caption is nothing but file-name junk or boilerplate", "input", ("caption_junk",),
         drops="true"),
    Rule("caption_short", "the normalised caption is shorter than text.min_chars", "input", ("n_chars",),
         "text.min_chars", "below"),
    Rule("caption_long", "the normalised caption is longer than text.max_chars", "input", ("n_chars",),
         "text.max_chars", "above"),
    Rule("not_chinese", "the share of CJK characters is below text.min_zh_ratio (text.keep_bilingual_share "
                        "of such captions is kept)", "input", ("zh_ratio", "caption_norm"), "text.min_zh_ratio",
         "below", spare=_bilingual, keys=("text.keep_bilingual_share",)),
    Rule("caption_repetitive", "the repeated-character ratio exceeds text.max_repeat_ratio", "input",
         ("repeat_ratio",), "text.max_repeat_ratio", "above"),
    Rule("caption_unsafe", "the caption matches the text-safety blocklist", "input", ("blocked_term",),
         drops="present"),
    # Before download an image is known only by its URL: the plan counts distinct URLs (input.caption_first).
    Rule("caption_common", "the caption is shared by more distinct images than text.max_caption_images "
                           "(before download: by more distinct URLs, caption_urls)", "input", ("caption_urls",),
         "text.max_caption_images", "above"),
    Rule("download_failed", "the image could not be fetched (status is not success)", "download",
         ("status",), drops="not_success"),
    Rule("decode_error", "the fetched bytes could not be decoded as an image", "score", ("score_error",),
         drops="present"),
    Rule("image_blocked", "the image's sha256, or a pHash within filters.image_blocklist_distance bits, is on "
                          "filters.image_blocklist", "score", ("image_blocked_by",), "filters.image_blocklist",
         "present", keys=("filters.image_blocklist_distance",)),
    Rule("too_small", "the original image's shorter side is below filters.min_side", "download",
         ("original_width", "original_height"), "filters.min_side", "below", combine="min", nan_drops=True),
    Rule("bad_aspect", "the aspect ratio exceeds filters.max_aspect_ratio", "score", ("aspect_ratio",),
         "filters.max_aspect_ratio", "above", nan_drops=True),
    Rule("low_texture", "gray-level entropy or edge density is below the texture floor", "score", ("entropy",),
         "filters.min_entropy", "below", nan_drops=True),
    Rule("low_texture", "gray-level entropy or edge density is below the texture floor", "score",
         ("edge_density",), "filters.min_edge_density", "below", nan_drops=True),
    Rule("caption_common", "the caption is shared by more distinct images than text.max_caption_images", "run",
         ("caption_norm", "sha256"), "text.max_caption_images", "above"),
    Rule("nsfw", "NSFW probability is at or above filters.nsfw_max", "score", ("nsfw",), "filters.nsfw_max",
         "at_or_above"),
    Rule("watermark", "watermark probability is at or above filters.watermark_max", "score", ("watermark",),
         "filters.watermark_max", "at_or_above"),
    Rule("text_heavy", "detected text covers more of the image than filters.text_area_max (posters, screenshots)",
         "score", ("text_area",), "filters.text_area_max", "above"),
    Rule("low_clip", "image-caption CLIP similarity is below filters.clip_min", "score", ("clip_score",),
         "filters.clip_min", "below"),
    Rule("low_aesthetic", "aesthetic score is below filters.aesthetic_min", "score", ("aesthetic",),
         "filters.aesthetic_min", "below"),
    Rule("duplicate", "an exact, near or semantic duplicate of its group's representative (dup_of names it)", "run",
         ("sha256", "phash", "phash_views"), keys=("dedupe",)),
    Rule("rebalanced", "dropped to bring its style's share to the configured target", "run", ("style", "graphic"),
         keys=("rebalance",)),
)

# Reason -> meaning, in the order decide applies them (a reason of two rules sits at its first):
# stats, inspect, the report and the card use it.
REASONS: dict[str, str] = {}
for _rule in RULES:
    REASONS.setdefault(_rule.reason, _rule.doc)
# Rules decide applies row by row; the `run` rules are its global steps.
ROW_RULES: tuple[Rule, ...] = tuple(r for r in RULES if r.when != "run")
_COMMON = next(i for i, r in enumerate(RULES) if r.reason == "caption_common" and r.when == "run")
BEFORE_COMMON = tuple(r for r in RULES[:_COMMON] if r.when != "run")   # caption_common counts their survivors
AFTER_COMMON = tuple(r for r in RULES[_COMMON + 1:] if r.when != "run")
# Rules that need no image: the download plan applies them, and the rows they drop are never requested.
INPUT_RULES = tuple(r for r in ROW_RULES if r.when == "input")
CAPTION_RULES = tuple(r for r in INPUT_RULES if set(r.columns) <= set(TEXT_COLUMNS))   # the caption's alone
# The plan's caption count: distinct URLs per normalised caption among the rows every other input rule passes.
URL_COUNT = next(r for r in INPUT_RULES if r.columns == ("caption_urls",))


def rules_on(column: str, rules: tuple[Rule, ...] = ROW_RULES) -> tuple[Rule, ...]:
    """The thresholded rules comparing `column` (the report draws their lines on its histogram)."""
    return tuple(r for r in rules if r.threshold and r.drops in COMPARE and column in r.columns[:1]
                 and r.combine is None)


def first_reasons(columns: Mapping[str, np.ndarray], cfg: Any, rules: tuple[Rule, ...]) -> list[str | None]:
    """The first of `rules` each row fails (None where it passes all): for `curate text` and tests."""
    n = len(next(iter(columns.values())))
    out: list[str | None] = [None] * n
    for rule in reversed(rules):   # earlier rules overwrite later ones
        for i in np.flatnonzero(rule.fails(columns, cfg)):
            out[i] = rule.reason
    return out


def text_reasons(columns: Mapping[str, Any], opts: TextOptions) -> list[str | None]:
    """The first caption rule each row fails, under these text options alone."""
    return first_reasons(columns, SimpleNamespace(text=opts), CAPTION_RULES)


def text_reason(row: Mapping[str, Any], opts: TextOptions) -> str | None:
    """text_reasons for one row."""
    return text_reasons({name: [value] for name, value in row.items()}, opts)[0]


def explain(caption: str | None, opts: TextOptions) -> dict[str, Any]:
    """Everything `curate text` prints for one caption: its columns and the caption rules' decision.

    `keep` covers the per-caption rules only: caption_common needs the whole corpus."""
    row = caption_row(caption, opts)
    reason = text_reason(row, opts)
    return {**row, "keep": reason is None, "reason": reason}
