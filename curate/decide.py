"""Phase 3, decide: keep or drop every row, with the first rule that dropped it.

A pure function of the scores and the config: it never reads an image or loads a model, so
re-deciding with new thresholds takes seconds. Rules fire in the order of
manifests.schema.REASONS; a row's reason is the first rule it fails.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.rundir import RunDir, write_json, write_parquet
from curate.runtime import log
from filters.text import text_reasons
from manifests.io import run_table
from manifests.schema import REASONS, TEXT, conform

DECIDE_INPUTS = ["key", "shard", "status", "original_width", "original_height", "width", "height", "sha256",
                 "score_error", "aspect_ratio", "entropy", "edge_density", *TEXT,
                 "clip_score", "aesthetic", "nsfw", "watermark", "style"]


def fingerprint(cfg: Config, shards: list[str]) -> str:
    """Hash of everything a decision depends on: the rule settings and the scored shards."""
    relevant = {k: cfg.model_dump(mode="json")[k] for k in ("filters", "text", "dedupe")}
    relevant["shards"] = shards
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _num(table: pa.Table, name: str, fill: float = np.nan) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, fill)
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _apply(reason: np.ndarray, name: str, fails: np.ndarray) -> None:
    """Give `name` to rows that fail and have no earlier reason."""
    assert name in REASONS, name
    reason[(reason == None) & fails] = name  # noqa: E711 (elementwise on an object array)


def row_reasons(t: pa.Table, cfg: Config, failed_shards: set[str]) -> np.ndarray:
    """Reasons from the per-row rules, in REASONS order, before any duplicate logic."""
    f = cfg.filters
    reason = np.full(t.num_rows, None, dtype=object)
    shard = np.array(t.column("shard").to_pylist(), dtype=object)
    _apply(reason, "shard_failed", np.isin(shard, list(failed_shards)))
    _apply(reason, "download_failed", np.array(t.column("status").to_pylist()) != "success")
    score_error = t.column("score_error").to_pylist() if "score_error" in t.column_names else [None] * t.num_rows
    _apply(reason, "decode_error", np.array([e is not None for e in score_error]))
    min_side = np.minimum(_num(t, "original_width"), _num(t, "original_height"))
    _apply(reason, "too_small", ~(min_side >= f.min_side))
    _apply(reason, "bad_aspect", ~(_num(t, "aspect_ratio") <= f.max_aspect_ratio))
    _apply(reason, "low_texture", ~((_num(t, "entropy") >= f.min_entropy)
                                    & (_num(t, "edge_density") >= f.min_edge_density)))
    alive = np.flatnonzero(reason == None)  # noqa: E711 (text rules only see rows still in)
    text_cols = {c: t.column(c).take(pa.array(alive)).to_pylist() for c in TEXT}
    reason[alive] = np.array(text_reasons(text_cols, cfg.text), dtype=object)
    _apply(reason, "caption_common", _common_captions(t, reason, cfg.text.max_caption_images))
    for name, col, bad in (("nsfw", "nsfw", lambda x: x >= f.nsfw_max),
                           ("watermark", "watermark", lambda x: x >= f.watermark_max),
                           ("low_clip", "clip_score", lambda x: x < f.clip_min if f.clip_min is not None else False),
                           ("low_aesthetic", "aesthetic",
                            lambda x: x < f.aesthetic_min if f.aesthetic_min is not None else False)):
        values = _num(t, col)
        with np.errstate(invalid="ignore"):
            _apply(reason, name, np.isfinite(values) & bad(values))
    return reason


def _common_captions(t: pa.Table, reason: np.ndarray, limit: int) -> np.ndarray:
    """Rows whose caption is shared by more than `limit` distinct images among rows still in."""
    alive = pa.array(reason == None)  # noqa: E711
    sub = t.select(["caption_norm", "sha256"]).filter(alive)
    counts = sub.group_by("caption_norm").aggregate([("sha256", "count_distinct")])
    common = counts.filter(pc.greater(counts.column("sha256_count_distinct"), limit)).column("caption_norm")
    return pc.is_in(t.column("caption_norm"), value_set=common).to_numpy(zero_copy_only=False)


def _rank_columns(t: pa.Table, order: list[str]) -> list[tuple[str, str]]:
    """Sort keys that put the preferred member of a duplicate group first."""
    keys = []
    for name in order:
        if name == "pixels" or name in t.column_names:
            keys.append((f"_rank_{name}", "descending"))
    return keys + [("key", "ascending")]


def exact_duplicates(t: pa.Table, reason: np.ndarray, order: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Mark all but the best row of each sha256 group among surviving rows as duplicates."""
    dup_of = np.full(t.num_rows, None, dtype=object)
    alive = np.flatnonzero(reason == None)  # noqa: E711
    if not len(alive):
        return reason, dup_of
    sub = t.take(pa.array(alive))
    ranks = {"_idx": pa.array(alive), "key": sub.column("key"), "sha256": sub.column("sha256")}
    for name in order:
        if name == "pixels":
            ranks["_rank_pixels"] = pa.array(_num(sub, "original_width", 0) * _num(sub, "original_height", 0))
        elif name in sub.column_names:
            ranks[f"_rank_{name}"] = pa.array(np.nan_to_num(_num(sub, name), nan=-np.inf))
    table = pa.table(ranks).sort_by([("sha256", "ascending"), *_rank_columns(t, order)])
    sha = table.column("sha256").to_pylist()
    keys = table.column("key").to_pylist()
    idx = table.column("_idx").to_numpy()
    start = 0
    for i in range(1, len(sha)):
        if sha[i] is None or sha[i] != sha[i - 1]:
            start = i
            continue
        reason[idx[i]] = "duplicate"
        dup_of[idx[i]] = keys[start]
    return reason, dup_of


def decide_table(t: pa.Table, cfg: Config, failed_shards: set[str] = frozenset()) -> pa.Table:
    """keep / reason / dup_of for every row of a joined raw+scores table (the pure core)."""
    reason = row_reasons(t, cfg, set(failed_shards))
    dup_of = np.full(t.num_rows, None, dtype=object)
    if cfg.dedupe.exact:
        reason, dup_of = exact_duplicates(t, reason, cfg.dedupe.keep_order)
    return conform(pa.table({
        "key": t.column("key"),
        "keep": pa.array(reason == None),  # noqa: E711
        "reason": pa.array(reason.tolist(), type=pa.string()),
        "dup_of": pa.array(dup_of.tolist(), type=pa.string()),
    }))


def funnel(decisions: pa.Table) -> dict:
    """Rows in, dropped per reason in rule order, kept."""
    counts = dict(zip(*[c.to_pylist() for c in
                        decisions.group_by("reason").aggregate([("key", "count")]).select(["reason", "key_count"])]))
    return {"rows_in": decisions.num_rows,
            "dropped": {r: counts[r] for r in REASONS if r in counts},
            "kept": counts.get(None, 0)}


def run_decide(cfg: Config, shards: list[str], failed: set[str], dry_run: bool = False) -> dict:
    """Decide every row; skip when the decisions on disk were made from the same inputs."""
    run = RunDir(Path(cfg.run_dir))
    marker = run.decisions / "_decided.json"
    fp = fingerprint(cfg, sorted(set(shards) - failed))
    if not dry_run and marker.exists() and json.loads(marker.read_text())["fingerprint"] == fp:
        log.info("decide: decisions are up to date with this config, nothing to do")
        return json.loads(marker.read_text())["funnel"]
    if failed >= set(shards):
        raise FileNotFoundError(f"no shard of {run.root} has scores yet: run `curate score` first")
    table = run_table(run.root, shards, DECIDE_INPUTS, stages=("raw", "scores"))
    decisions = decide_table(table, cfg, failed)
    result = funnel(decisions)
    if dry_run:
        return result
    shard_col = table.column("shard")
    for shard in shards:
        write_parquet(decisions.filter(pc.equal(shard_col, shard)), run.decisions / f"{shard}.parquet")
    write_json({"fingerprint": fp, "funnel": result}, marker)
    log.info("decide: %d rows, %d kept", result["rows_in"], result["kept"])
    return result
