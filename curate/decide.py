"""Phase 3, decide: keep or drop every row, with the first rule that dropped it.

A pure function of the scores and the config: it never reads an image or loads a model, so
re-deciding with new thresholds is cheap. Rules fire in the order of manifests.schema.REASONS.

Built for a billion rows: the driver holds shard names, object references and small counts,
never rows. Work runs in Ray tasks over groups of consecutive input shards ("groups"):

1. rules      per group: per-row rules (vectorised, reason codes), and the (caption, image)
              pairs of rows still in, hash-partitioned -> caption reduce: which rows carry a
              caption shared by more than text.max_caption_images images (caption_common).
2. candidates per group: the rows that passed every per-row rule, hash-partitioned by sha256,
              by pHash band and by embedding cluster -> edge reduce per partition: chains of
              equal sha256, verified near pairs, semantic pairs, each reduced to a spanning
              forest, so a partition returns at most one edge per row it holds.
3. components one task: connected components over the nodes that have an edge, the best
              member(s) of each group by dedupe.keep_order, routed back per group as
              (row, dup_of) pairs.
4. finish     per group: duplicates applied, style counts for the rebalance (two passes:
              counts per style and hash bucket, then the exact cut inside one bucket), then
              decisions/{shard}.parquet and its marker. _decided.json is written last.

Memory bound of step 3 (the only global one): about 64 bytes per row that has a duplicate
edge (edges after forests, preference values, caption hash); 100 M such rows fit a 16 GB
task. Beyond that the components step needs large-star/small-star rounds (not built).
"""
from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.rebalance import key_hashes, keep_counts
from curate.rundir import RunDir, row_keys, shard_index
from curate.runtime import Window, log
from filters.phash import band_values, forest, near_pairs_in_band, roots, split_bits
from filters.text import text_reasons
from manifests.schema import REASONS, TEXT, conform

RAW_INPUTS = ["key", "status", "original_width", "original_height", "sha256"]
SCORE_INPUTS = ["score_error", "aspect_ratio", "entropy", "edge_density", *TEXT,
                "phash", "clip_score", "aesthetic", "nsfw", "watermark", "style"]
REASONS_LIST = list(REASONS)
CODES = {name: i for i, name in enumerate(REASONS)}
NONE = -1
ROWS_PER_GROUP = 1_000_000       # rows one group task holds (a few hundred MB of decide columns)
ROWS_PER_PARTITION = 2_000_000   # rows per shuffle partition; partitions grow with the run
MAX_BUCKET = 10_000              # distinct pHashes sharing one band value beyond this are not compared
HASH_BUCKET_BITS = 12            # rebalance: first pass counts per style and top-12-bit hash bucket
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class Job:
    """What every decide task needs; put in the object store once."""
    cfg: Config
    run: RunDir
    failed: frozenset[str]
    partitions: int


# -- reading and per-row rules ---------------------------------------------------------------

def read_shard(job: Job, shard: str) -> pa.Table:
    """One shard's decide columns: raw (or the input rows, when the download failed) plus scores."""
    storage, run = job.run.storage, job.run
    downloaded = shard not in job.failed or storage.exists(run.marker("download", shard))
    table = storage.read_parquet(run.raw_table(shard) if downloaded else run.input_shard(shard),
                                 columns=RAW_INPUTS)
    if shard not in job.failed:
        scores = storage.read_parquet(run.scores(shard), columns=["key", *SCORE_INPUTS])
        if not scores.column("key").equals(table.column("key")):
            raise ValueError(f"scores/{shard}.parquet does not hold the rows of raw/{shard}.parquet")
        for name in scores.column_names[1:]:
            table = table.append_column(name, scores.column(name))
    row_id = (shard_index(shard) << 32) | np.arange(table.num_rows, dtype=np.int64)
    return table.append_column("row_id", pa.array(row_id))


def _num(t: pa.Table, name: str, fill: float = np.nan) -> np.ndarray:
    if name not in t.column_names:
        return np.full(t.num_rows, fill)
    return t.column(name).to_numpy(zero_copy_only=False).astype(np.float64)


def _apply(code: np.ndarray, name: str, fails: np.ndarray) -> None:
    """Give `name` to rows that fail and have no earlier reason."""
    code[(code == NONE) & fails] = CODES[name]


def early_codes(t: pa.Table, cfg: Config, failed: bool) -> np.ndarray:
    """Reason codes of the rules before caption_common (the ones it counts survivors of)."""
    f = cfg.filters
    code = np.full(t.num_rows, NONE, np.int8)
    if failed:
        code[:] = CODES["shard_failed"]
        return code
    _apply(code, "download_failed", pc.not_equal(t.column("status"), "success").fill_null(True).to_numpy(False))
    _apply(code, "decode_error", pc.is_valid(t.column("score_error")).to_numpy(False))
    min_side = np.minimum(_num(t, "original_width"), _num(t, "original_height"))
    _apply(code, "too_small", ~(min_side >= f.min_side))
    _apply(code, "bad_aspect", ~(_num(t, "aspect_ratio") <= f.max_aspect_ratio))
    _apply(code, "low_texture", ~((_num(t, "entropy") >= f.min_entropy) & (_num(t, "edge_density") >= f.min_edge_density)))
    alive = np.flatnonzero(code == NONE)
    sub = t.take(pa.array(alive))
    text = {c: sub.column(c).to_numpy(zero_copy_only=False) for c in TEXT}
    names = text_reasons(text, cfg.text)
    code[alive] = np.array([CODES[n] if n else NONE for n in names], np.int8)
    return code


def late_codes(t: pa.Table, cfg: Config) -> np.ndarray:
    """Reason codes of the score rules after caption_common."""
    f = cfg.filters
    code = np.full(t.num_rows, NONE, np.int8)
    for name, col, bad in (("nsfw", "nsfw", lambda x: x >= f.nsfw_max),
                           ("watermark", "watermark", lambda x: x >= f.watermark_max),
                           ("low_clip", "clip_score", lambda x: x < f.clip_min if f.clip_min is not None else False),
                           ("low_aesthetic", "aesthetic",
                            lambda x: x < f.aesthetic_min if f.aesthetic_min is not None else False)):
        values = _num(t, col)
        with np.errstate(invalid="ignore"):
            _apply(code, name, np.isfinite(values) & bad(values))
    return code


def _hash64(column: pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hash of each string (nulls hash to 0)."""
    return np.where(pc.is_valid(column).to_numpy(False), key_hashes(column.fill_null("")), np.uint64(0))


def _partition(values: np.ndarray, partitions: int) -> np.ndarray:
    return ((values * _MIX) >> np.uint64(40)).astype(np.int64) % partitions


def _split(target: np.ndarray, partitions: int, **cols: np.ndarray) -> list[dict]:
    """Rows routed to partitions: one dict of columns per partition."""
    order = np.argsort(target, kind="stable")
    bounds = np.searchsorted(target[order], np.arange(partitions + 1))
    return [{k: v[order[bounds[p]:bounds[p + 1]]] for k, v in cols.items()} for p in range(partitions)]


def _concat(parts: tuple[dict, ...]) -> dict:
    keys = parts[0].keys() if parts else ()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


# -- step 1: rules and caption counts --------------------------------------------------------

def group_rules(job: Job, shards: list[str]) -> list[dict]:
    """(caption hash, image hash, row) of rows still in after the early rules, by caption partition."""
    out = []
    for shard in shards:
        t = read_shard(job, shard)
        alive = early_codes(t, job.cfg, shard in job.failed) == NONE
        if alive.any():
            sub = t.filter(pa.array(alive))
            out.append({"caption": _hash64(sub.column("caption_norm")), "image": _hash64(sub.column("sha256")),
                        "row": sub.column("row_id").to_numpy()})
    cols = _concat(tuple(out)) if out else {"caption": np.empty(0, np.uint64), "image": np.empty(0, np.uint64),
                                            "row": np.empty(0, np.int64)}
    return _split(_partition(cols["caption"], job.partitions), job.partitions, **cols)


def common_rows(limit: int, groups: int, bounds: np.ndarray, *parts: dict) -> list[np.ndarray]:
    """Rows whose caption is shared by more than `limit` distinct images, routed back per group."""
    cols = _concat(parts)
    order = np.lexsort((cols["image"], cols["caption"]))
    cap, img = cols["caption"][order], cols["image"][order]
    new_pair = np.r_[True, (cap[1:] != cap[:-1]) | (img[1:] != img[:-1])]
    new_cap = np.r_[True, cap[1:] != cap[:-1]]
    starts = np.flatnonzero(new_cap)
    distinct = np.add.reduceat(new_pair.astype(np.int64), starts) if len(cap) else np.empty(0, np.int64)
    common = np.repeat(distinct > limit, np.diff(np.r_[starts, len(cap)]))
    rows = np.sort(cols["row"][order][common])
    return _route(rows, groups, bounds)


def _route(rows: np.ndarray, groups: int, bounds: np.ndarray) -> list[np.ndarray]:
    """Sorted row ids cut by group (bounds: first shard index of each group, plus the end)."""
    cuts = np.searchsorted(rows >> 32, bounds)
    return [rows[cuts[g]:cuts[g + 1]] for g in range(groups)]


# -- step 2: duplicate candidates -------------------------------------------------------------

def survivors(job: Job, shard: str, common: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """A shard's table and reason codes after every per-row rule, caption_common included."""
    t = read_shard(job, shard)
    code = early_codes(t, job.cfg, shard in job.failed)
    is_common = np.isin(t.column("row_id").to_numpy(), common)
    _apply(code, "caption_common", is_common)
    late = late_codes(t, job.cfg)
    code = np.where(code == NONE, late, code).astype(np.int8)
    return t, code


def preference(t: pa.Table, order: list[str]) -> np.ndarray:
    """(n, k) preference values, larger is better, missing worst; ties are broken by row id later."""
    cols = []
    for name in order:
        values = _num(t, "original_width", 0) * _num(t, "original_height", 0) if name == "pixels" else _num(t, name)
        cols.append(np.nan_to_num(values, nan=-np.inf))
    return np.stack(cols, axis=1) if cols else np.zeros((t.num_rows, 0))


def group_candidates(job: Job, shards: list[str], *common: np.ndarray) -> list[dict]:
    """Every surviving row, routed to the partitions of its sha256, of each pHash band, of its cluster."""
    d = job.cfg.dedupe
    common_rows = np.concatenate(common) if common else np.empty(0, np.int64)
    pieces = []
    for shard in shards:
        t, code = survivors(job, shard, common_rows)
        alive = code == NONE
        if not alive.any():
            continue
        sub = t.filter(pa.array(alive))
        row = sub.column("row_id").to_numpy()
        node = {"row": row, "pref": preference(sub, d.keep_order), "caption": _hash64(sub.column("caption_norm"))}
        if d.exact:
            sha = _hash64(sub.column("sha256"))
            has = sha != 0
            pieces.append(_piece(0, sha[has], np.zeros(has.sum(), np.uint64), node, has))
        if d.phash_max_distance is not None and "phash" in sub.column_names:
            ph = sub.column("phash")
            has = pc.is_valid(ph).to_numpy(False)
            hashes = ph.fill_null(0).to_numpy(zero_copy_only=False).astype(np.uint64)[has]
            for b, (offset, width) in enumerate(split_bits(64, d.phash_max_distance + 1)):
                key = band_values(hashes, offset, width) * np.uint64(64) + np.uint64(b)
                pieces.append(_piece(1, key, hashes, node, has))
    if not pieces:
        return [_empty_piece(job.cfg) for _ in range(job.partitions)]
    cols = _concat(tuple(pieces))
    return _split(_partition(cols["key"] ^ cols["kind"].astype(np.uint64), job.partitions), job.partitions, **cols)


def _piece(kind: int, key: np.ndarray, value: np.ndarray, node: dict, take: np.ndarray) -> dict:
    return {"kind": np.full(len(key), kind, np.uint8), "key": key, "value": value,
            **{k: v[take] for k, v in node.items()}}


def _empty_piece(cfg: Config) -> dict:
    return {"kind": np.empty(0, np.uint8), "key": np.empty(0, np.uint64), "value": np.empty(0, np.uint64),
            "row": np.empty(0, np.int64), "pref": np.empty((0, len(cfg.dedupe.keep_order))),
            "caption": np.empty(0, np.uint64)}


def partition_edges(max_distance: int | None, *parts: dict) -> tuple[dict, int]:
    """A partition's duplicate edges as a spanning forest, with the nodes' attributes; and the
    number of rows whose band bucket was too large to compare (reported, never silent)."""
    cols = _concat(parts)
    found = [np.empty((2, 0), np.int64)]
    skipped = 0
    exact = cols["kind"] == 0
    if exact.any():
        found.append(_chains(cols["key"][exact], cols["row"][exact]))
    near = np.flatnonzero(cols["kind"] == 1)
    if near.size and max_distance is not None:
        key, value, row = cols["key"][near], cols["value"][near], cols["row"][near]
        found.append(_chains(value, row))                       # identical hashes: one chain
        first = np.unique(np.stack([key, value]), axis=1, return_index=True)[1]
        key, value, row = key[first], value[first], row[first]  # one row per distinct hash per band
        order = np.argsort(key, kind="stable")
        key, value, row = key[order], value[order], row[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        sizes = np.diff(np.r_[starts, len(key)])
        big = np.repeat(sizes > MAX_BUCKET, sizes)
        skipped = int(big.sum())
        key, value, row = key[~big], value[~big], row[~big]
        for b, (offset, width) in enumerate(split_bits(64, max_distance + 1)):
            mine = (key % np.uint64(64)) == np.uint64(b)
            if mine.sum() > 1:
                found.append(near_pairs_in_band(row[mine], value[mine], offset, width, max_distance))
    edges = forest(np.concatenate(found, axis=1))
    nodes = np.unique(edges)
    by_row = np.argsort(cols["row"], kind="stable")
    index = by_row[np.searchsorted(cols["row"], nodes, sorter=by_row)] if len(nodes) else np.empty(0, np.int64)
    return {"edges": edges, "row": nodes, "pref": cols["pref"][index], "caption": cols["caption"][index]}, skipped


def _chains(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows with equal values joined as a chain (n - 1 edges per value, never all pairs)."""
    order = np.lexsort((rows, values))
    v, r = values[order], rows[order]
    same = v[1:] == v[:-1]
    return np.stack([r[:-1][same], r[1:][same]])


# -- step 3: components and keepers -----------------------------------------------------------

def components(per_group: int, groups: int, bounds: np.ndarray, *parts: dict) -> list[dict]:
    """Duplicate groups over every partition's forest; per group the best rows stay, up to
    `per_group` with distinct captions; the others get dup_of = the group's best row."""
    edges = np.concatenate([p["edges"] for p in parts], axis=1) if parts else np.empty((2, 0), np.int64)
    nodes, label = roots(edges)
    if not len(nodes):
        return [{"row": np.empty(0, np.int64), "dup_of": np.empty(0, np.int64)} for _ in range(groups)]
    rows = np.concatenate([p["row"] for p in parts])
    first = np.unique(rows, return_index=True)[1]
    pref = np.concatenate([p["pref"] for p in parts])[first]
    caption = np.concatenate([p["caption"] for p in parts])[first]   # aligned with `nodes` (both sorted)
    order = np.lexsort((nodes, *(-pref[:, k] for k in reversed(range(pref.shape[1]))), label))
    lab, cap = label[order], caption[order]
    group_start = np.r_[True, lab[1:] != lab[:-1]]
    best = nodes[order][np.maximum.accumulate(np.where(group_start, np.arange(len(lab)), 0))]
    _, first_caption = np.unique(np.stack([lab, cap]), axis=1, return_index=True)
    distinct = np.zeros(len(lab), bool)
    distinct[first_caption] = True
    ordinal = np.cumsum(distinct) - np.repeat(np.cumsum(distinct)[group_start] - distinct[group_start],
                                              np.diff(np.r_[np.flatnonzero(group_start), len(lab)])) - 1
    keep = distinct & (ordinal < per_group)
    dropped = nodes[order][~keep]
    dup_of = best[~keep]
    sort = np.argsort(dropped)
    dropped, dup_of = dropped[sort], dup_of[sort]
    cuts = np.searchsorted(dropped >> 32, bounds)
    return [{"row": dropped[cuts[g]:cuts[g + 1]], "dup_of": dup_of[cuts[g]:cuts[g + 1]]} for g in range(groups)]


# -- step 4: rebalance counts and decisions ---------------------------------------------------

def group_state(job: Job, shards: list[str], dups: dict, *common: np.ndarray) -> tuple[list, dict]:
    """Reason codes and dup_of per shard after duplicates, and the style counts per hash bucket."""
    common_rows = np.concatenate(common) if common else np.empty(0, np.int64)
    states, counts = [], {}
    for shard in shards:
        t, code = survivors(job, shard, common_rows)
        row = t.column("row_id").to_numpy()
        hit = np.isin(row, dups["row"])
        where = np.searchsorted(dups["row"], row[hit])
        code[hit & (code == NONE)] = CODES["duplicate"]
        dup_of = np.full(t.num_rows, -1, np.int64)
        dup_of[hit] = dups["dup_of"][where]
        style = t.column("style") if "style" in t.column_names else pa.nulls(t.num_rows, pa.string())
        hashes = key_hashes(t.column("key"))
        labelled = (code == NONE) & pc.is_valid(style).to_numpy(False)
        for name in pc.unique(style.filter(pa.array(labelled))).to_pylist():
            mine = labelled & pc.equal(style, name).fill_null(False).to_numpy(False)
            counts.setdefault(name, np.zeros(1 << HASH_BUCKET_BITS, np.int64))
            counts[name] += np.bincount((hashes[mine] >> np.uint64(64 - HASH_BUCKET_BITS)).astype(np.int64),
                                        minlength=1 << HASH_BUCKET_BITS)
        states.append((shard, code, dup_of, style, hashes))
    return states, counts


def bucket_hashes(states: list, cuts: dict[str, int]) -> dict[str, np.ndarray]:
    """Second rebalance pass: the hashes of each style's rows inside its cut bucket."""
    out: dict[str, list] = {name: [] for name in cuts}
    for _, code, _, style, hashes in states:
        for name, bucket in cuts.items():
            mine = (code == NONE) & pc.equal(style, name).fill_null(False).to_numpy(False)
            mine &= (hashes >> np.uint64(64 - HASH_BUCKET_BITS)) == np.uint64(bucket)
            out[name].append(hashes[mine])
    return {name: np.concatenate(v) if v else np.empty(0, np.uint64) for name, v in out.items()}


def write_group(job: Job, states: list, limits: dict[str, int], attempt: str, write: bool) -> dict[str, dict]:
    """Apply the rebalance limits (keep rows whose hash <= the style's limit), write each shard's
    decisions and marker; return per-shard counts."""
    run = job.run
    out = {}
    for shard, code, dup_of, style, hashes in states:
        for name, limit in limits.items():   # limit -1: the style keeps no row
            over = (code == NONE) & pc.equal(style, name).fill_null(False).to_numpy(False)
            if limit >= 0:
                over &= hashes > np.uint64(limit)
            code[over] = CODES["rebalanced"]
        n = len(code)
        decisions = conform(pa.table({
            "key": row_keys(shard_index(shard) << 32 | np.arange(n, dtype=np.int64)),
            "keep": pa.array(code == NONE),
            "reason": reason_names(code),
            "dup_of": row_keys(dup_of, valid=dup_of >= 0)}))
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

def fingerprint(cfg: Config, run: RunDir, failed: set[str]) -> str:
    """Everything a decision depends on: the rule settings, the models config, and the identity
    (name, size, time) of every score marker, so a re-score is never mistaken for the old one."""
    relevant = {k: cfg.model_dump(mode="json")[k] for k in ("filters", "text", "dedupe", "rebalance", "models")}
    relevant["scores"] = run.storage.stat_list(run.uri("_done", "score"))
    relevant["failed"] = sorted(failed)
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
    fp = fingerprint(cfg, run, failed)
    storage = run.storage
    if not dry_run and storage.exists(run.decided):
        previous = storage.read_json(run.decided)
        if previous["fingerprint"] == fp:
            log.info("decide: decisions are up to date with these scores and settings, nothing to do")
            return previous["funnel"]
    if not dry_run:
        storage.delete(run.decided)   # from here on, write refuses the decisions until they are whole
    plan = storage.read_json(run.plan)
    partitions = max(cfg.dedupe.partitions, math.ceil(plan["rows"] / ROWS_PER_PARTITION))
    job = ray.put(Job(cfg, run, frozenset(failed), partitions))
    groups = groups_of(shards, cfg.input.shard_rows)
    bounds = np.array([shard_index(g[0]) for g in groups] + [shard_index(shards[-1]) + 1], np.int64)
    G, P = len(groups), partitions
    rules = [_fan(group_rules, P)(job, g) for g in groups]
    common = [_fan(common_rows, G)(cfg.text.max_caption_images, G, bounds, *[r[p] for r in rules])
              for p in range(P)]
    cands = [_fan(group_candidates, P)(job, g, *[c[i] for c in common]) for i, g in enumerate(groups)]
    edges = [_fan(partition_edges, 2)(cfg.dedupe.phash_max_distance, *[c[p] for c in cands]) for p in range(P)]
    skipped = sum(ray.get([e[1] for e in edges]))
    dups = _fan(components, G)(cfg.dedupe.captions_per_image, G, bounds, *[e[0] for e in edges])
    states = [_fan(group_state, 2)(job, g, dups[i], *[c[i] for c in common]) for i, g in enumerate(groups)]
    del rules, cands, edges
    limits, styles = _rebalance_limits(cfg, [s[0] for s in states], [s[1] for s in states])
    attempt = uuid.uuid4().hex[:12]
    write = ray.remote(num_cpus=1)(write_group)
    per_shard: dict[str, dict] = {}
    window = Window()
    for s in states:
        for result in window.submit(write.remote(job, s[0], limits, attempt, not dry_run), None).values():
            _collect(result, per_shard)
    for result in window.drain().values():
        _collect(result, per_shard)
    result = _funnel(per_shard)
    styles["near_dup_skipped_rows"] = skipped
    if skipped:
        log.warning("decide: %d rows sat in pHash band buckets larger than %d and were not compared", skipped, MAX_BUCKET)
    if not dry_run:
        storage.write_json(run.decided, {"fingerprint": fp, "attempt": attempt, "funnel": result, "styles": styles})
    log.info("decide: %d rows, %d kept", result["rows_in"], result["kept"])
    return result


def _fan(f, n: int):
    """`f` as a Ray task whose list result comes back as n separate object references."""
    import ray

    if n == 1:
        single = ray.remote(num_cpus=1)(_only)
        return lambda *args: [single.remote(f, *args)]
    return ray.remote(num_cpus=1, num_returns=n)(f).remote


def _only(f, *args):
    (result,) = f(*args)
    return result


def _collect(result, per_shard: dict) -> None:
    if isinstance(result, str):
        raise RuntimeError(f"decide: a task failed: {result}")
    per_shard.update(result)


def _rebalance_limits(cfg: Config, state_refs: list, count_refs: list) -> tuple[dict[str, int], dict]:
    """Keep counts per style from the global counts, then the exact hash cut for each style."""
    import ray

    counts: dict[str, np.ndarray] = {}
    for part in ray.get(count_refs):
        for name, c in part.items():
            counts[name] = counts.get(name, 0) + c
    before = {name: int(c.sum()) for name, c in sorted(counts.items())}
    report = {"before": before, "after": dict(before)}
    if not cfg.rebalance.styles:
        return {}, report
    if not before:
        report["note"] = "no surviving row has a style label: nothing was rebalanced"
        log.warning("rebalance: %s", report["note"])
        return {}, report
    kept = keep_counts(before, cfg.rebalance)
    report["after"] = kept
    cuts, need = {}, {}
    for name, keep in kept.items():
        if keep >= before[name]:
            continue
        cum = np.cumsum(counts[name])
        bucket = int(np.searchsorted(cum, keep, side="right"))  # first bucket where the count passes `keep`
        cuts[name] = bucket
        need[name] = keep - (int(cum[bucket - 1]) if bucket else 0)
    limits = {}
    if cuts:
        gather = ray.remote(num_cpus=1)(bucket_hashes)
        found: dict[str, list] = {name: [] for name in cuts}
        for part in ray.get([gather.remote(s, cuts) for s in state_refs]):
            for name, h in part.items():
                found[name].append(h)
        for name, bucket in cuts.items():
            h = np.sort(np.concatenate(found[name]))
            base = np.uint64(bucket) << np.uint64(64 - HASH_BUCKET_BITS)
            limits[name] = int(h[need[name] - 1]) if need[name] > 0 else int(base) - 1  # -1: keep none
    return limits, report


def _funnel(per_shard: dict[str, dict]) -> dict:
    """Rows in, dropped per reason in rule order, kept: summed from per-shard counts."""
    dropped: dict[str, int] = {}
    for info in per_shard.values():
        for r, n in info["reasons"].items():
            dropped[r] = dropped.get(r, 0) + n
    return {"rows_in": sum(i["rows"] for i in per_shard.values()),
            "dropped": {r: dropped[r] for r in REASONS if r in dropped},
            "kept": sum(i["kept"] for i in per_shard.values())}
