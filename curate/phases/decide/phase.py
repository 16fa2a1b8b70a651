"""Phase 3, decide: keep or drop every row, with the first rule that dropped it.

A pure function of the scores and the config: it never reads an image or loads a model, so
re-deciding with new thresholds is cheap. Rules fire in the order of manifests.schema.REASONS.

Built for a billion rows: the driver holds shard names, URIs and small counts, never rows. Work
runs in Ray tasks over groups of consecutive input shards ("groups") and hash partitions; every
shuffle between them goes through storage (curate/run/exchange.py: one object per writer, a slice
per reader), because a 1B run's 1,000 groups x 500 partitions make pieces under Ray's inline
limit, which would otherwise be returned into the driver's own memory. Tasks are submitted
through a bounded window.

1. rules      per group: per-row rules (vectorised, reason codes), and the (caption, image)
              pairs of rows still in, hash-partitioned -> caption reduce: which rows carry a
              caption shared by more than text.max_caption_images images (caption_common).
2. candidates per group: the rows that passed every per-row rule, as image classes (curate/phases/decide/dedupe.py):
              each row's attributes to its class's home partition, each class's hash records by
              band and its embedding by cluster -> pair search per partition -> each home keeps
              its classes' rows and the pairs it owns, so each pair and each row counts once.
3. components one task: bounded duplicate groups over the rows that have a pair or a copy, the
              best member(s) of each group by dedupe.keep_order, routed back per group as
              (row, dup_of) pairs.
4. finish     per group: duplicates applied, the two rebalance passes (curate/phases/decide/rebalance.py),
              then decisions/{shard}.parquet and its marker. _decided.json is written last.

Memory bound of step 3 (the only global one): the bytes per row with a pair or a copy that
bench_scale's scale1b regime measures (docs/scale.md); beyond one task's memory the groups need
a distributed scheme (not built).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import uuid
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import curate.phases.decide.dedupe
from curate.config import Config, ConfigError
from curate.phases.decide.dedupe import (
    KMEANS_COARSE,
    KMEANS_SAMPLE,
    components,
    concat,
    home_nodes,
    kmeans,
    nearest,
    normalised,
    partition_of,
    partition_pairs,
    route,
    split,
)
from curate.phases.decide.rebalance import (
    bucket_counts,
    hashes_in_cut,
    key_hashes,
    merge_counts,
    over_limit,
    plan_cuts,
    style_labels,
    style_limits,
)
from curate.run.exchange import Exchange
from curate.run.rundir import RunDir, row_keys, shard_index
from curate.run.runtime import log, windowed
from curate.run.storage import Storage
from filters.blocklists import ImageBlocklist
from filters.registry import COLUMNS, PRODUCER
from manifests import ranks
from manifests.funnel import Funnel
from manifests.rules import AFTER_COMMON, BEFORE_COMMON, REASONS, ROW_RULES, RULES, Rule
from manifests.schema import ALL, PLAN, conform

RAW_INPUTS = ["key", "status", "original_width", "original_height", "sha256", *PLAN]
REASONS_LIST = list(REASONS)
CODES = {name: i for i, name in enumerate(REASONS)}
NONE = -1
ROWS_PER_GROUP = 1_000_000       # rows one group task holds (a few hundred MB of decide columns)
ROWS_PER_PARTITION = 2_000_000   # rows per shuffle partition; partitions grow with the run


@dataclass(frozen=True)
class Job:
    """What every decide task needs; put in the object store once. `on`: the reasons of the row rules
    that apply (check_rules)."""
    cfg: Config
    run: RunDir
    failed: frozenset[str]
    partitions: int
    attempt: str
    max_bucket: int
    on: frozenset[str]
    image_blocklist: str | None = None   # the sha256 of filters.image_blocklist, as the driver read it
    resolved: dict = field(default_factory=dict)   # config key -> threshold resolved from a rank

    def exchange(self, name: str) -> Exchange:
        return Exchange(self.run, self.attempt, name)


class RuleError(ConfigError):
    """A rule cannot be applied to the scores on disk: the message names the scorer or key to change."""


def rank_columns(cfg: Config) -> list[str]:
    """The columns ranks are computed per value of (`pNN by COLUMN`)."""
    found = (ranks.parse(r.limit(cfg)) for r in ROW_RULES if r.numeric and r.threshold)
    return list(dict.fromkeys(rank.by for rank in found if rank and rank.by))


def score_inputs(cfg: Config) -> list[str]:
    """The score columns decide reads: every rule's, the dedupe preference's (dedupe.keep_order), the ranks'."""
    wanted = [c for r in RULES for c in r.columns] + list(cfg.dedupe.keep_order) + rank_columns(cfg)
    return [c for c in dict.fromkeys(wanted) if c in COLUMNS]


def _scorer_on(cfg: Config, column: str) -> bool:
    from filters.registry import BY_NAME

    scorer = BY_NAME[PRODUCER[column]]
    return not scorer.optional or scorer.name in cfg.models.enabled


def _set_by_user(cfg: Config, key: str) -> bool:
    """A threshold whose default is null was given a value: its rule is asked for, not merely on by default."""
    section, name = key.rsplit(".", 1)
    parent = cfg
    for part in section.split("."):
        parent = getattr(parent, part)
    return type(parent).model_fields[name].default is None


def check_rules(cfg: Config, columns: set[str]) -> tuple[frozenset[str], dict[str, str]]:
    """Which row rules apply to scores with these columns: (reasons on, {reason: why off}).

    A rule is off when its threshold is null, or when the scorer writing its column is not enabled
    and the rule is on only by its default (filters.nsfw_max without the nsfw scorer). A threshold
    the user set for a scorer that is not enabled, or an enabled scorer's column missing from the
    scores, stops decide with the scorer to enable or re-run: never a rule that silently never fires.
    """
    on: set[str] = set()
    off: dict[str, str] = {}
    for rule in ROW_RULES:
        if not rule.active(cfg):
            off.setdefault(rule.reason, f"{rule.threshold} is null")
            continue
        scored = [c for c in rule.columns if c in COLUMNS]
        disabled = [c for c in scored if not _scorer_on(cfg, c)]
        if disabled:
            scorer = PRODUCER[disabled[0]]
            if rule.threshold and _set_by_user(cfg, rule.threshold):
                raise RuleError(f"{rule.threshold} is set but the {scorer} scorer, which writes {disabled[0]}, is not "
                                f"enabled: add {scorer} to models.enabled, or set {rule.threshold}: null")
            off.setdefault(rule.reason, f"the {scorer} scorer is not enabled (models.enabled)")
            continue
        missing = [c for c in scored if c not in columns]
        if missing:
            raise RuleError(f"rule {rule.reason} reads {missing[0]}, which the scores on disk lack: the "
                            f"{PRODUCER[missing[0]]} scorer has not run on them; run `curate score` (or `curate run`)")
        on.add(rule.reason)
    for name in cfg.dedupe.keep_order:
        if name != "pixels" and name not in COLUMNS:
            raise RuleError(f"dedupe.keep_order names {name!r}, which no scorer writes; choose from pixels or "
                            f"{sorted(c for c, col in COLUMNS.items() if pa.types.is_floating(col.type))}")
    return frozenset(on - set(off)), off


# -- reading and per-row rules ---------------------------------------------------------------

def read_shard(job: Job, shard: str) -> pa.Table:
    """One shard's decide columns: raw (or the input rows, when the download failed) plus scores."""
    storage, run = job.run.storage, job.run
    downloaded = shard not in job.failed or storage.exists(run.marker("download", shard))
    style_column = [job.cfg.rebalance.style_column] if job.cfg.rebalance.style_source == "column" else []
    table = storage.read_parquet(run.raw_table(shard) if downloaded else run.input_shard(shard),
                                 columns=RAW_INPUTS + style_column + rank_columns(job.cfg))
    for name in PLAN:   # a plan from before a column existed did not apply its rule
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, ALL[name].type))
    if shard not in job.failed:
        scores = storage.read_parquet(run.scores(shard), columns=["key", *score_inputs(job.cfg)])
        if not scores.column("key").equals(table.column("key")):
            raise ValueError(f"scores/{shard}.parquet does not hold the rows of raw/{shard}.parquet")
        for name in scores.column_names[1:]:
            table = table.append_column(name, scores.column(name))
        if job.image_blocklist is not None:
            table = table.append_column("image_blocked_by", image_blocked(job, table))   # schema.DERIVED
    row_id = (shard_index(shard) << 32) | np.arange(table.num_rows, dtype=np.int64)
    return table.append_column("row_id", pa.array(row_id))


def read_image_blocklist(cfg: Config, expect: str | None = None) -> tuple[ImageBlocklist, str]:
    """filters.image_blocklist and its sha256, read from its URI; `expect`: the digest the driver saw."""
    uri = cfg.filters.image_blocklist
    data = Storage(cfg.storage).read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    if expect is not None and digest != expect:
        raise RuntimeError(f"filters.image_blocklist {uri} changed during decide (sha256 {expect} -> {digest})")
    try:
        return ImageBlocklist.parse(data.decode("utf-8"), uri), digest
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"filters.image_blocklist: {exc}") from None


_IMAGE_LISTS: dict[tuple[str, str], ImageBlocklist] = {}   # read once per worker process (and digest)


def image_blocked(job: Job, t: pa.Table) -> pa.Array:
    """Why each row's image is on filters.image_blocklist (sha256, or the pHash entry and distance), else null."""
    key = (job.cfg.filters.image_blocklist, job.image_blocklist)
    if key not in _IMAGE_LISTS:
        _IMAGE_LISTS[key] = read_image_blocklist(job.cfg, job.image_blocklist)[0]
    valid = pc.is_valid(t.column("phash")).to_numpy(False) if "phash" in t.column_names else np.zeros(t.num_rows, bool)
    views = view_hash_matrix(t) if "phash" in t.column_names else np.zeros((t.num_rows, 0), np.uint64)
    return pa.array(_IMAGE_LISTS[key].match(t.column("sha256").to_pylist(), views, valid,
                                            job.cfg.filters.image_blocklist_distance), pa.string())


def _num(t: pa.Table, name: str, fill: float = np.nan) -> np.ndarray:
    if name not in t.column_names:
        return np.full(t.num_rows, fill)
    return t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _apply(code: np.ndarray, name: str, fails: np.ndarray) -> None:
    """Give `name` to rows that fail and have no earlier reason."""
    code[(code == NONE) & fails] = CODES[name]


def rule_codes(t: pa.Table, cfg: Config, rules: tuple[Rule, ...], on: frozenset[str],
               resolved: dict | None = None) -> np.ndarray:
    """Reason codes of `rules` (the first that fires), each evaluated on the rows still in; `resolved`:
    the thresholds decide resolved from ranks (manifests/ranks.py), by config key."""
    code = np.full(t.num_rows, NONE, np.int8)
    values: dict[str, np.ndarray] = {}

    def column(c: str) -> np.ndarray:
        if c not in values:
            if c not in t.column_names:
                raise RuleError(f"rule {rule.reason} reads {c}, which this shard's files lack")
            values[c] = t.column(c).to_numpy(zero_copy_only=False)
        return values[c]

    for rule in rules:
        if rule.reason not in on:
            continue
        alive = np.flatnonzero(code == NONE)
        if not len(alive):
            break
        limit = rule.limit(cfg, resolved)
        if isinstance(limit, dict):   # a rank per value of a column
            limit = ranks.per_row(limit, column(limit["by"])[alive])
        fails = rule.fails({c: column(c)[alive] for c in rule.columns}, cfg, limit)
        code[alive[fails]] = CODES[rule.reason]
    return code


def early_codes(t: pa.Table, job: Job, failed: bool) -> np.ndarray:
    """Reason codes of the rules before caption_common (the ones it counts survivors of)."""
    if failed:   # rows the plan dropped were never going to be downloaded: they keep that reason
        planned = t.column("before_download").to_numpy(zero_copy_only=False)
        return np.array([CODES.get(r, CODES["shard_failed"]) for r in planned], np.int8)
    return rule_codes(t, job.cfg, BEFORE_COMMON, job.on, job.resolved)


def late_codes(t: pa.Table, job: Job, rules: tuple[Rule, ...] = AFTER_COMMON) -> np.ndarray:
    """Reason codes of the score rules after caption_common (or the first of them, `rules`)."""
    return rule_codes(t, job.cfg, rules, job.on, job.resolved)


def hash64(column: pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hash of each string (nulls hash to 0)."""
    return np.where(pc.is_valid(column).to_numpy(False), key_hashes(column.fill_null("")), np.uint64(0))


# -- step 1: rules and caption counts --------------------------------------------------------

def group_rules(job: Job, index: int, shards: list[str]) -> dict:
    """(caption hash, image hash, row) of rows still in after the early rules, by caption partition."""
    out = []
    for shard in shards:
        t = read_shard(job, shard)
        alive = early_codes(t, job, shard in job.failed) == NONE
        if alive.any():
            sub = t.filter(pa.array(alive))
            out.append({"caption": hash64(sub.column("caption_norm")), "image": hash64(sub.column("sha256")),
                        "row": sub.column("row_id").to_numpy()})
    cols = concat(tuple(out)) if out else {"caption": np.empty(0, np.uint64), "image": np.empty(0, np.uint64),
                                            "row": np.empty(0, np.int64)}
    return {"bytes": job.exchange("rules").write(index, split(partition_of(cols["caption"], job.partitions),
                                                                job.partitions, **cols))}


def images_per_caption(cols: dict) -> tuple[np.ndarray, np.ndarray]:
    """(row, distinct images sharing the row's caption) for every row, in row order; an image is its
    hash (of sha256 in decide, of the URL before download)."""
    order = np.lexsort((cols["image"], cols["caption"]))
    cap, img = cols["caption"][order], cols["image"][order]
    new_pair = np.r_[True, (cap[1:] != cap[:-1]) | (img[1:] != img[:-1])]
    new_cap = np.r_[True, cap[1:] != cap[:-1]]
    starts = np.flatnonzero(new_cap)
    distinct = np.add.reduceat(new_pair.astype(np.int64), starts) if len(cap) else np.empty(0, np.int64)
    count = np.repeat(distinct, np.diff(np.r_[starts, len(cap)]))
    rows = cols["row"][order]
    by_row = np.argsort(rows, kind="stable")
    return rows[by_row], count[by_row]


def common_rows(job: Job, p: int, groups: int, bounds: np.ndarray) -> dict:
    """Rows whose caption is shared by more than text.max_caption_images distinct images, routed
    back per group."""
    rows, count = images_per_caption(concat(job.exchange("rules").read(groups, p)))
    common = rows[count > job.cfg.text.max_caption_images]
    return {"bytes": job.exchange("common").write(p, [{"row": r} for r in _route(common, groups, bounds)])}


def common_of(job: Job, index: int) -> np.ndarray:
    """The caption_common rows of group `index`, from every partition."""
    return np.concatenate([part["row"] for part in job.exchange("common").read(job.partitions, index)])


def _route(rows: np.ndarray, groups: int, bounds: np.ndarray) -> list[np.ndarray]:
    """Sorted row ids cut by group (bounds: first shard index of each group, plus the end)."""
    cuts = np.searchsorted(rows >> 32, bounds)
    return [rows[cuts[g]:cuts[g + 1]] for g in range(groups)]


# -- thresholds by rank (manifests/ranks.py) ---------------------------------------------------

@dataclass(frozen=True)
class Ranked:
    """A rule whose threshold is a rank: where it sits in RULES, the rank, the edges of its bins."""
    position: int
    rank: ranks.Rank
    cuts: np.ndarray | None = None

    @property
    def rule(self) -> Rule:
        return RULES[self.position]


def ranked_rules(cfg: Config, on: frozenset[str]) -> list[Ranked]:
    """The applied rules whose threshold is a rank, in rule order; a `by` column must exist in the run."""
    out = []
    for i, rule in enumerate(RULES):
        if rule.when == "run" or not rule.numeric or rule.reason not in on:
            continue
        rank = ranks.parse(rule.limit(cfg))
        if rank is None:
            continue
        if rank.by and rank.by not in cfg.input.extra_cols and rank.by not in COLUMNS:
            raise RuleError(f"{rule.threshold}: {rank.text!r} ranks by {rank.by!r}, which is neither in "
                            f"input.extra_cols nor a score column")
        out.append(Ranked(i, rank))
    return out


def _reaching(job: Job, t: pa.Table, ranked: Ranked, common: np.ndarray) -> np.ndarray:
    """Rows of a shard that reach a ranked rule: every row rule before it passes them."""
    before = tuple(r for r in RULES[:ranked.position] if r.when != "run")
    if ranked.rule not in AFTER_COMMON:
        return rule_codes(t, job.cfg, before, job.on, job.resolved) == NONE
    code = early_codes(t, job, False)
    _apply(code, "caption_common", np.isin(t.column("row_id").to_numpy(), common))
    return (code == NONE) & (late_codes(t, job, tuple(r for r in AFTER_COMMON if r in before)) == NONE)


def _values(t: pa.Table, rule: Rule) -> np.ndarray:
    return rule.value({c: t.column(c).to_numpy(zero_copy_only=False) for c in rule.columns})


def rank_range(job: Job, shards: list[str], ranked: list[Ranked]) -> list[tuple[float, float, bool]]:
    """(min, max, all integers) of each ranked rule's compared value over the scored rows of the group."""
    lo, hi, integral = [np.inf] * len(ranked), [-np.inf] * len(ranked), [True] * len(ranked)
    for shard in shards:
        if shard in job.failed:
            continue
        t = read_shard(job, shard)
        for k, r in enumerate(ranked):
            v = _values(t, r.rule)
            v = v[np.isfinite(v)]
            if len(v):
                lo[k], hi[k] = min(lo[k], float(v.min())), max(hi[k], float(v.max()))
                integral[k] = integral[k] and bool(np.all(v == np.round(v)))
    return list(zip(lo, hi, integral))


def rank_counts(job: Job, index: int, shards: list[str], ranked: Ranked) -> dict:
    """Bin counts of a ranked rule's compared value over group `index`'s rows that reach it, per `by` value
    (a rule after caption_common reads the group's caption_common rows from the exchange)."""
    common = common_of(job, index) if ranked.rule in AFTER_COMMON else np.empty(0, np.int64)
    out: dict = {}
    for shard in shards:
        if shard in job.failed:
            continue
        t = read_shard(job, shard)
        sub = t.filter(pa.array(_reaching(job, t, ranked, common)))
        v = _values(sub, ranked.rule)
        groups = sub.column(ranked.rank.by).to_pylist() if ranked.rank.by else [None] * sub.num_rows
        for g in dict.fromkeys(groups):
            mask = np.array([x == g for x in groups], bool) if ranked.rank.by else np.ones(len(v), bool)
            part = ranks.counts(v[mask], ranked.cuts)
            out[g] = out[g] + part if g in out else part
    return out


def _resolve_ranks(job_ref, base: Job, groups: list, ranked: list[tuple[int, Ranked]], ranges: list,
                   resolved: dict, info: dict):
    """Resolve each of `ranked` in order (each pass sees the thresholds resolved before it); returns the Job
    (its reference) with them. The driver holds each rule's bin counts, never rows."""
    import ray

    for k, r in ranked:
        lo, hi, integral = ranges[k]
        r = replace(r, cuts=ranks.edges(lo, hi, integral) if np.isfinite(lo) else np.array([0.0, 1.0]))
        merged: dict = {}
        for part in _each(rank_counts, [(job_ref, i, g, r) for i, g in enumerate(groups)]):
            for g, c in part.items():
                merged[g] = merged[g] + c if g in merged else c
        drops = r.rule.drops
        if r.rank.by:
            found = {g: ranks.resolve(c, r.cuts, r.rank, drops, integral) for g, c in merged.items()}
            resolved[r.rule.threshold] = {"by": r.rank.by, "values": [[g, f["value"]] for g, f in found.items()]}
            info[r.rule.threshold] = {"rank": r.rank.text, "by": r.rank.by,
                                      "values": [[g, f] for g, f in found.items()]}
        else:
            found = ranks.resolve(merged.get(None, np.zeros(len(r.cuts) - 1, np.int64)), r.cuts, r.rank, drops,
                                  integral)
            resolved[r.rule.threshold] = found["value"]
            info[r.rule.threshold] = found
        log.info("decide: %s = %s resolved to %s", r.rule.threshold, r.rank.text, resolved[r.rule.threshold])
        job_ref = ray.put(replace(base, resolved=dict(resolved)))
    return job_ref


# -- step 2: duplicate candidates -------------------------------------------------------------

def survivors(job: Job, shard: str, common: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """A shard's table and reason codes after every per-row rule, caption_common included."""
    t = read_shard(job, shard)
    code = early_codes(t, job, shard in job.failed)
    if shard in job.failed:
        return t, code
    is_common = np.isin(t.column("row_id").to_numpy(), common)
    _apply(code, "caption_common", is_common)
    late = late_codes(t, job)
    code = np.where(code == NONE, late, code).astype(np.int8)
    return t, code


def preference(t: pa.Table, order: list[str]) -> np.ndarray:
    """(n, k) preference values, larger is better, missing worst; ties are broken by row id later."""
    cols = []
    for name in order:
        values = _num(t, "original_width", 0) * _num(t, "original_height", 0) if name == "pixels" else _num(t, name)
        cols.append(np.nan_to_num(values, nan=-np.inf))
    return np.stack(cols, axis=1) if cols else np.zeros((t.num_rows, 0))


def view_hash_matrix(t: pa.Table) -> np.ndarray:
    """(n, views) uint64: `phash`, then `phash_views` when the scores have them (rows without a
    hash are masked by phash_valid, so their zeros are never routed)."""
    whole = t.column("phash").fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)
    if "phash_views" not in t.column_names:
        return whole[:, None]
    views = t.column("phash_views").combine_chunks()
    width = views.type.list_size
    flat = pc.fill_null(views.values, 0).to_numpy(zero_copy_only=False).astype(np.uint64)
    flat = flat[views.offset * width:(views.offset + len(views)) * width]
    return np.column_stack([whole, flat.reshape(len(views), width)])


def _load_npy(run: RunDir, shard: str) -> np.ndarray:
    return np.load(io.BytesIO(run.storage.read_bytes(run.embeddings(shard))))


def group_candidates(job: Job, index: int, shards: list[str], clusters: int) -> dict:
    """Every surviving row of a group, routed as image classes: search records to the partitions
    of their sha256, pHash bands and cluster; each row's attributes to its class's home."""
    d = job.cfg.dedupe
    common = common_of(job, index)
    centroids = job.exchange("centroids").read(1, 0)[0]["centroids"] if clusters else None
    nodes = []
    for shard in shards:
        t, code = survivors(job, shard, common)
        alive = code == NONE
        if not alive.any():
            continue
        sub = t.filter(pa.array(alive))
        node = {"row": sub.column("row_id").to_numpy(), "pref": preference(sub, d.keep_order),
                "caption": hash64(sub.column("caption_norm")), "sha": hash64(sub.column("sha256"))}
        if "phash" in sub.column_names:
            node["phash_valid"] = pc.is_valid(sub.column("phash")).to_numpy(False)
            node["phash"] = view_hash_matrix(sub)
        if centroids is not None and job.run.storage.exists(job.run.embeddings(shard)):
            emb, ok = normalised(_load_npy(job.run, shard)[alive])
            node["semantic"] = (ok, nearest(emb, centroids), emb.astype(np.float16))
        nodes.append(node)
    search, classes = route(nodes, d.exact, d.phash_max_distance, len(d.keep_order), job.partitions)
    return {"bytes": job.exchange("search").write(index, search) + job.exchange("classes").write(index, classes),
            "payload": int(sum(v.nbytes for part in (*search, *classes) for v in part.values())),
            "pieces": len(search) + len(classes), "survivors": int(sum(len(n["row"]) for n in nodes))}


def fit_centroids(job: Job, shards: list[str], rows: int) -> dict:
    """Coarse k-means centroids (at most KMEANS_COARSE; the partitions split their clusters down to
    dedupe.semantic_cluster_size) from a fixed-seed sample of at most KMEANS_SAMPLE embeddings, read
    from evenly spaced shards, so the clusters are the same on every run. They go to storage, and
    the driver learns only how many there are (0: no embeddings)."""
    run = job.run
    have = [s for s in shards if run.storage.exists(run.embeddings(s))]
    rng = np.random.default_rng(0)
    sample, taken = [], 0
    for shard in have[::max(1, len(have) * 10_000 // KMEANS_SAMPLE)]:
        emb, _ = normalised(_load_npy(run, shard))
        pick = emb[rng.permutation(len(emb))[:KMEANS_SAMPLE - taken]]
        sample.append(pick)
        taken += len(pick)
        if taken >= KMEANS_SAMPLE:
            break
    if taken < 2:
        return {"clusters": 0}
    sample = np.concatenate(sample)
    k = max(1, min(len(sample), KMEANS_COARSE, round(rows / job.cfg.dedupe.semantic_cluster_size)))
    job.exchange("centroids").write(0, [{"centroids": kmeans(sample, k)}])
    return {"clusters": k}


def partition_search(job: Job, p: int, groups: int) -> dict:
    """Partition p's verified class pairs, each sent to the homes of both its classes."""
    d = job.cfg.dedupe
    pairs, counts = partition_pairs(d.phash_max_distance, d.semantic_threshold, job.max_bucket,
                                    d.semantic_cluster_size, job.exchange("search").read(groups, p))
    home_a, home_b = partition_of(pairs["a"], job.partitions), partition_of(pairs["b"], job.partitions)
    both = home_a != home_b
    routed = {k: np.concatenate([v, v[both]]) for k, v in pairs.items()}
    counts["bytes"] = job.exchange("pairs").write(p, split(np.concatenate([home_a, home_b[both]]), job.partitions,
                                                           **routed))
    return counts


def home(job: Job, q: int, groups: int) -> dict:
    """Home partition q: its classes' rows that have a pair or a copy, and the pairs it owns."""
    nodes = home_nodes(q, job.partitions, job.exchange("classes").read(groups, q),
                       job.exchange("pairs").read(job.partitions, q))
    return {"bytes": job.exchange("homes").write(q, [nodes]), "rows": int(len(nodes["row"]))}


def group_components(job: Job, groups: int, bounds: np.ndarray) -> dict:
    """The bounded duplicate groups over every home, written per decide group."""
    parts = job.exchange("homes").read(job.partitions, 0)
    dups, counts = components(job.cfg.dedupe.captions_per_image, groups, bounds, parts)
    counts["bytes_in"] = int(sum(v.nbytes for part in parts for v in part.values()))
    counts["rows"] = int(sum(len(part["row"]) for part in parts))
    counts["bytes"] = job.exchange("dups").write(0, dups)
    return counts


# -- step 4: rebalance counts and decisions ----------------------------------------------------

def group_state(job: Job, index: int, shards: list[str]) -> tuple[list, dict]:
    """Reason codes and dup_of per shard after duplicates, and the style counts per hash bucket."""
    common = common_of(job, index)
    dups = job.exchange("dups").read_one(0, index)
    states, counts = [], []
    for shard in shards:
        t, code = survivors(job, shard, common)
        row = t.column("row_id").to_numpy()
        hit = np.isin(row, dups["row"])
        where = np.searchsorted(dups["row"], row[hit])
        code[hit & (code == NONE)] = CODES["duplicate"]
        dup_of = np.full(t.num_rows, -1, np.int64)
        dup_of[hit] = dups["dup_of"][where]
        style = style_labels(t, job.cfg.rebalance)
        hashes = key_hashes(t.column("key"))
        counts.append(bucket_counts(style, hashes, code == NONE))
        states.append((shard, code, dup_of, style, hashes))
    return states, merge_counts(counts)


def cut_hashes(states: list, cuts: dict) -> list[dict]:
    return [hashes_in_cut(style, hashes, code == NONE, cuts) for _, code, _, style, hashes in states]


def write_group(job: Job, states: list, limits: dict[str, int], attempt: str, write: bool) -> dict[str, dict]:
    """Apply the rebalance limits (keep rows whose hash <= the style's limit), write each shard's
    decisions and marker; return per-shard counts."""
    run = job.run
    out = {}
    for shard, code, dup_of, style, hashes in states:
        code = code.copy()   # arrays from the object store are read-only
        code[over_limit(style, hashes, code == NONE, limits)] = CODES["rebalanced"]
        n = len(code)
        decisions = conform(pa.table({
            "key": row_keys(shard_index(shard) << 32 | np.arange(n, dtype=np.int64)),
            "keep": pa.array(code == NONE),
            "reason": reason_names(code),
            "dup_of": row_keys(dup_of, valid=dup_of >= 0),
            "style_label": style}))
        counts = {REASONS_LIST[c]: int(k) for c, k in zip(*np.unique(code[code != NONE], return_counts=True))}
        info = {"attempt": attempt, "rows": n, "kept": int((code == NONE).sum()), "reasons": counts}
        if write:
            run.storage.write_parquet(decisions, run.decisions(shard))
            run.mark("decide", shard, info)
        out[shard] = info
    return out


def reason_names(code: np.ndarray) -> pa.Array:
    """Reason codes as names (null where kept), without a Python object per row."""
    return pa.DictionaryArray.from_arrays(pa.array(code.astype(np.int32), mask=code == NONE),
                                          pa.array(REASONS_LIST)).cast(pa.string())


# -- the driver -------------------------------------------------------------------------------

def fingerprint(cfg: Config, run: RunDir, failed: set[str], image_list: str | None = None) -> str:
    """Everything a decision depends on: the rule settings, the models config, and the identity
    (name, size, time) of every score marker, so a re-score is never mistaken for the old one."""
    relevant = {k: cfg.model_dump(mode="json")[k] for k in ("filters", "text", "dedupe", "rebalance", "models")}
    relevant["scores"] = run.storage.stat_list(run.uri("_done", "score"))
    relevant["failed"] = sorted(failed)
    relevant["image_blocklist"] = image_list   # the list's contents, not only its name
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def groups_of(shards: list[str], rows_per_shard: int) -> list[list[str]]:
    per = max(1, ROWS_PER_GROUP // max(rows_per_shard, 1))
    return [shards[i:i + per] for i in range(0, len(shards), per)]


def run_decide(cfg: Config, run: RunDir, dry_run: bool = False) -> dict:
    """Decide every row; skip when the decisions were made from the same scores and settings."""
    import ray

    shards = run.shard_names()
    scored = run.done("score")
    failed = set(shards) - scored
    if not scored:
        raise FileNotFoundError(f"no shard of {run.root} has scores yet: run `curate score` first")
    image_list = read_image_blocklist(cfg)[1] if cfg.filters.image_blocklist else None
    fp = fingerprint(cfg, run, failed, image_list)
    storage = run.storage
    if not dry_run and storage.exists(run.decided):
        previous = storage.read_json(run.decided)
        if previous["fingerprint"] == fp:
            log.info("decide: decisions are up to date with these scores and settings, nothing to do")
            return previous["funnel"]
    if not dry_run:
        storage.delete(run.decided)   # from here on, write refuses the decisions until they are whole
    on, off = check_rules(cfg, set(storage.parquet(run.scores(min(scored))).schema_arrow.names))
    for reason, why in off.items():
        log.info("decide: rule %s is off: %s", reason, why)
    plan = storage.read_json(run.plan)
    partitions = max(cfg.dedupe.partitions, math.ceil(plan["rows"] / ROWS_PER_PARTITION))
    attempt = uuid.uuid4().hex[:12]
    storage.delete_dir(Exchange.folder(run))   # what a killed attempt left (the lease keeps out live ones)
    base = Job(cfg, run, frozenset(failed), partitions, attempt, curate.phases.decide.dedupe.MAX_BUCKET, on,
               image_list)
    job = ray.put(base)
    groups = groups_of(shards, cfg.input.shard_rows)
    bounds = np.array([shard_index(g[0]) for g in groups] + [shard_index(shards[-1]) + 1], np.int64)
    G, P = len(groups), partitions
    ranked = ranked_rules(cfg, on)
    resolved: dict = {}
    thresholds: dict = {}   # what _decided.json records of each rank
    ranges = _merge_ranges(_each(rank_range, [(job, g, ranked) for g in groups])) if ranked else []
    early = [(k, r) for k, r in enumerate(ranked) if r.rule not in AFTER_COMMON]
    job = _resolve_ranks(job, base, groups, early, ranges, resolved, thresholds)
    shuffled = {"rules": _each(group_rules, [(job, i, g) for i, g in enumerate(groups)]),
                "common": _each(common_rows, [(job, p, G, bounds) for p in range(P)])}
    late = [(k, r) for k, r in enumerate(ranked) if r.rule in AFTER_COMMON]
    job = _resolve_ranks(job, base, groups, late, ranges, resolved, thresholds)
    clusters = 0
    if cfg.dedupe.semantic_threshold is not None:
        (fitted,) = _each(fit_centroids, [(job, sorted(scored), plan["rows"])])
        clusters = fitted["clusters"]
        if not clusters:
            log.warning("decide: dedupe.semantic_threshold is set but no embeddings were kept "
                        "(models.keep_embeddings): semantic dedup skipped")
    candidates = _each(group_candidates, [(job, i, g, clusters) for i, g in enumerate(groups)])
    searched = _each(partition_search, [(job, p, G) for p in range(P)])
    homes = _each(home, [(job, q, G) for q in range(P)])
    (comp,) = _each(group_components, [(job, G, bounds)])
    shuffled.update(candidates=candidates, pairs=searched, homes=homes, dups=[comp])
    states = [_fan(group_state, 2)(job, i, g) for i, g in enumerate(groups)]
    limits, styles = _rebalance_limits(cfg, [s[0] for s in states], [s[1] for s in states])
    write = ray.remote(num_cpus=1)(write_group)
    per_shard: dict[str, dict] = {}
    groups_decided = [s[0] for s in states]
    del states
    for _, result in windowed(range(len(groups_decided)),
                              lambda i: write.remote(job, groups_decided[i], limits, attempt, not dry_run)):
        _collect(result, per_shard)
    storage.delete_dir(Exchange.folder(run, attempt))
    result = Funnel.total(per_shard).to_dict()
    report = dedupe_report(shuffled, comp, sum(c["survivors"] for c in candidates))
    if not dry_run:
        storage.write_json(run.decided, {"fingerprint": fp, "attempt": attempt, "funnel": result, "styles": styles,
                                         "rules_off": off, "dedupe": report, "thresholds": thresholds})
    log.info("decide: %d rows, %d kept; %d duplicate groups, the largest of %d rows", result["rows_in"],
             result["kept"], report["groups"]["count"], report["groups"]["largest"])
    return result


def dedupe_report(shuffled: dict[str, list[dict]], comp: dict, survivors: int) -> dict:
    """_decided.json's `dedupe` section: the groups (sizes histogram: rows per group, the
    representative included), what the components task held, and the bytes each shuffle moved
    (the candidates shuffle's records apart from its framing)."""
    return {"groups": {"count": comp["groups"], "rows": comp["rows_in_groups"], "largest": comp["largest"],
                       "size_histogram": comp["size_histogram"]},
            "components": {"rows": comp["rows"], "pairs": comp["pairs"], "same_edges": comp["same_edges"],
                           "bytes": comp["bytes_in"]},
            "survivors": survivors,
            "split_buckets": sum(s["split_buckets"] for s in shuffled["pairs"]),
            "shuffle_bytes": {name: sum(s["bytes"] for s in stats) for name, stats in shuffled.items()},
            # the candidates shuffle apart: the records themselves (they grow with the survivors) and
            # the slices' framing (headers and offsets: they grow with groups x partitions)
            "candidates_payload_bytes": sum(s["payload"] for s in shuffled["candidates"]),
            "candidates_pieces": sum(s["pieces"] for s in shuffled["candidates"])}


def _each(f, calls: list[tuple]) -> list:
    """f(*args) for each args tuple as Ray tasks through a bounded window; results in call order.
    A failed task fails decide (its error is the message)."""
    import ray

    task = ray.remote(num_cpus=1)(f)
    out = dict(windowed(range(len(calls)), lambda i: task.remote(*calls[i])))
    for i, result in out.items():
        if isinstance(result, str):
            raise RuntimeError(f"decide: {f.__name__} task {i} failed: {result}")
    return [out[i] for i in range(len(calls))]


def _merge_ranges(parts: list[list[tuple[float, float, bool]]]) -> list[tuple[float, float, bool]]:
    """Per ranked rule: the smallest min, the largest max, and whether every group saw integers only."""
    return [(min(p[k][0] for p in parts), max(p[k][1] for p in parts), all(p[k][2] for p in parts))
            for k in range(len(parts[0]))]


def _fan(f, n: int):
    """`f` as a Ray task whose list result comes back as n separate object references."""
    import ray

    return ray.remote(num_cpus=1, num_returns=n)(f).remote


def _collect(result, per_shard: dict) -> None:
    if isinstance(result, str):
        raise RuntimeError(f"decide: a task failed: {result}")
    per_shard.update(result)


def _rebalance_limits(cfg: Config, state_refs: list, count_refs: list) -> tuple[dict[str, int], dict]:
    """Both rebalance passes: global counts per style and hash bucket, then the exact cuts."""
    import ray

    report, cuts = plan_cuts(merge_counts(ray.get(count_refs)), cfg.rebalance)
    if not cuts:
        return {}, report
    gather = ray.remote(num_cpus=1)(cut_hashes)
    found = [f for part in ray.get([gather.remote(s, cuts) for s in state_refs]) for f in part]
    return style_limits(cuts, found), report

