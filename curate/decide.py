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

from curate.config import Config, DedupeConfig
from curate.dedupe import near_edges, same_value_edges, semantic_edges
from curate.rebalance import rebalance
from curate.rundir import RunDir, write_json, write_parquet
from curate.runtime import init_ray, log
from filters.phash import roots
from filters.text import text_reasons
from manifests.io import run_table
from manifests.schema import REASONS, TEXT, conform

DECIDE_INPUTS = ["key", "shard", "status", "original_width", "original_height", "width", "height", "sha256",
                 "score_error", "aspect_ratio", "entropy", "edge_density", *TEXT,
                 "phash", "clip_score", "aesthetic", "nsfw", "watermark", "style"]


def fingerprint(cfg: Config, shards: list[str]) -> str:
    """Hash of everything a decision depends on: the rule settings and the scored shards."""
    relevant = {k: cfg.model_dump(mode="json")[k] for k in ("filters", "text", "dedupe", "rebalance")}
    relevant["shards"] = shards
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _num(table: pa.Table, name: str, fill: float = np.nan) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, fill)
    return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _mask(values: pa.ChunkedArray) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(bool)


def _apply(reason: np.ndarray, name: str, fails: np.ndarray) -> None:
    """Give `name` to rows that fail and have no earlier reason."""
    assert name in REASONS, name
    reason[(reason == None) & fails] = name  # noqa: E711 (elementwise on an object array)


def row_reasons(t: pa.Table, cfg: Config, failed_shards: set[str]) -> np.ndarray:
    """Reasons from the per-row rules, in REASONS order, before any duplicate logic."""
    f = cfg.filters
    reason = np.full(t.num_rows, None, dtype=object)
    failed = pa.array(sorted(failed_shards), pa.string())
    _apply(reason, "shard_failed", _mask(pc.is_in(t.column("shard"), value_set=failed)))
    _apply(reason, "download_failed", _mask(pc.not_equal(t.column("status"), "success").fill_null(True)))
    if "score_error" in t.column_names:
        _apply(reason, "decode_error", _mask(pc.is_valid(t.column("score_error"))))
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


def preference(t: pa.Table, order: list[str]) -> np.ndarray:
    """Row positions, best first by dedupe.keep_order (missing scores last), ties by key."""
    ranks: dict[str, pa.Array] = {"key": t.column("key")}
    sort_keys = []
    for name in order:
        if name == "pixels":
            values = _num(t, "original_width", 0) * _num(t, "original_height", 0)
        elif name in t.column_names:
            values = _num(t, name)
        else:
            continue
        ranks[f"_rank_{name}"] = pa.array(np.nan_to_num(values, nan=-np.inf))
        sort_keys.append((f"_rank_{name}", "descending"))
    return pc.sort_indices(pa.table(ranks), sort_keys=[*sort_keys, ("key", "ascending")]).to_numpy()


def _codes(column: pa.ChunkedArray) -> np.ndarray:
    """Integer code per distinct value (-1 for null), for grouping without Python objects."""
    return pc.dictionary_encode(column.combine_chunks()).indices.fill_null(-1) \
        .to_numpy(zero_copy_only=False).astype(np.int64)


def _embedding_rows(t: pa.Table, ranked: np.ndarray, embeddings: dict[str, Path]) -> list[tuple]:
    """Per shard with embeddings: its file, the ranked rows' positions in it, and their ranks."""
    shard = _codes(t.column("shard"))
    names = pc.unique(t.column("shard")).to_pylist()
    starts = {names[c]: int(np.argmax(shard == c)) for c in range(len(names))}
    rank_shard = shard[ranked]
    out = []
    for c, name in enumerate(names):
        if name in embeddings:
            ranks = np.flatnonzero(rank_shard == c)
            out.append((embeddings[name], ranked[ranks] - starts[name], ranks))
    return out


def duplicate_groups(t: pa.Table, ranked: np.ndarray, cfg: DedupeConfig,
                     embeddings: dict[str, Path] | None = None) -> np.ndarray:
    """For each ranked row (best first), the rank of its group's best row (itself when alone).

    Groups are the connected components of exact (sha256), near (pHash) and semantic
    (embedding) edges; see curate/dedupe.py for how each is found without comparing all pairs.
    """
    sub = t.take(pa.array(ranked))
    edges = [np.empty((2, 0), np.int64)]
    if cfg.exact:
        edges.append(same_value_edges(_codes(sub.column("sha256"))))
    if cfg.phash_max_distance is not None and "phash" in sub.column_names:
        phash = sub.column("phash").combine_chunks()
        valid = phash.is_valid().to_numpy(zero_copy_only=False)
        edges.append(near_edges(phash.fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64), valid,
                                cfg.phash_max_distance, cfg.partitions))
    if cfg.semantic_threshold is not None and embeddings:
        edges.append(semantic_edges(_embedding_rows(t, ranked, embeddings), cfg.semantic_threshold,
                                    cfg.semantic_cluster_size, cfg.partitions))
    root = np.arange(len(ranked))
    nodes, best = roots(np.concatenate(edges, axis=1))
    root[nodes] = best
    return root


def group_keepers(root: np.ndarray, captions: np.ndarray, per_group: int) -> np.ndarray:
    """Which ranked rows stay: per group, the best row of each distinct caption, the best `per_group` of those."""
    _, first = np.unique(np.stack([root, captions]), axis=1, return_index=True)
    distinct = np.zeros(len(root), bool)
    distinct[first] = True
    picks = np.flatnonzero(distinct)
    by_group = picks[np.argsort(root[picks], kind="stable")]   # stable: rank order inside a group
    group = root[by_group]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ordinal = np.zeros(len(root), np.int64)
    ordinal[by_group] = np.arange(len(by_group)) - np.repeat(starts, np.diff(np.r_[starts, len(by_group)]))
    return distinct & (ordinal < per_group)


def decide_table(t: pa.Table, cfg: Config, failed_shards: set[str] = frozenset(),
                 embeddings: dict[str, Path] | None = None) -> tuple[pa.Table, dict]:
    """keep / reason / dup_of for every row of a joined raw+scores table, and the style counts.

    Duplicates are looked for among rows that passed every per-row rule, so the kept member
    of a group is the best surviving one; rebalance then samples the rows still in.
    """
    reason = row_reasons(t, cfg, set(failed_shards))
    dup_idx = np.full(t.num_rows, -1, np.int64)
    alive = np.flatnonzero(reason == None)  # noqa: E711
    if len(alive):
        ranked = alive[preference(t.take(pa.array(alive)), cfg.dedupe.keep_order)]
        root = duplicate_groups(t, ranked, cfg.dedupe, embeddings)
        captions = _codes(t.column("caption_norm").take(pa.array(ranked)))
        dropped = ~group_keepers(root, captions, cfg.dedupe.captions_per_image)
        reason[ranked[dropped]] = "duplicate"
        dup_idx[ranked[dropped]] = ranked[root[dropped]]
    style = t.column("style") if "style" in t.column_names else pa.nulls(t.num_rows, pa.string())
    rebalanced, styles = rebalance(style, t.column("key"), reason == None, cfg.rebalance)  # noqa: E711
    reason[rebalanced] = "rebalanced"
    assert set(reason[reason != None]) <= set(REASONS)  # noqa: E711
    decisions = conform(pa.table({
        "key": t.column("key"),
        "keep": pa.array(reason == None),  # noqa: E711
        "reason": pa.array(reason.tolist(), type=pa.string()),
        "dup_of": t.column("key").take(pa.array(dup_idx, mask=dup_idx < 0)),
    }))
    return decisions, styles


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
    init_ray(cfg.ray)
    embeddings = {s: run.root / "embeddings" / f"{s}.npy" for s in shards
                  if (run.root / "embeddings" / f"{s}.npy").exists()}
    if cfg.dedupe.semantic_threshold is not None and not embeddings:
        log.warning("decide: dedupe.semantic_threshold is set but no embeddings were kept "
                    "(models.keep_embeddings): semantic dedup skipped")
    decisions, styles = decide_table(table, cfg, failed, embeddings)
    result = funnel(decisions)
    if dry_run:
        return result
    shard_col = table.column("shard")
    for shard in shards:
        write_parquet(decisions.filter(pc.equal(shard_col, shard)), run.decisions / f"{shard}.parquet")
    write_json({"fingerprint": fp, "funnel": result, "styles": styles}, marker)
    log.info("decide: %d rows, %d kept", result["rows_in"], result["kept"])
    return result
