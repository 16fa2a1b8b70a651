"""The download plan's second half: every rule that needs no image runs before anything is fetched.

After the cut (curate/phases/download/plan.py) the shards are screened by Ray tasks, with the driver holding
shard names, object references and counts, never rows:

1. rules   per group of input shards: the columns the `input` rules of manifests/rules.py read
           (with input.caption_first the caption's, computed by filters/text.py exactly as the score
           phase will), those rules applied through the rules table, and the (caption, URL) pairs of
           the rows still in, hash-partitioned by caption;
2. count   per partition: distinct URLs per normalised caption, as decide counts distinct images per
           caption (before download an image is known only by its URL), routed back per group;
           both shuffles go through storage (curate/run/exchange.py), as decide's do;
3. finish  per group: caption_common (the rules table's `caption_urls` rule), then each input shard
           is written again with the plan columns (manifests/schema.py PLAN) and `before_download`,
           the rule that dropped the row. The download never requests such a row.

Loosening (`rescreen`): when a text setting of an existing plan would admit rows it never requested,
the plan is screened again under the new settings. A row a shard's download already requested stays
requested (its `before_download` is null: a rule that now drops it is decide's, a plain re-decide), so
what changes is the rows newly admitted; the shards that have some are listed in the plan's
`increment`, and the download fetches those rows alone (curate/phases/download/phase.py). A downloaded
shard with none has the plan columns of its raw table brought up to date in place, keeping its tar,
its markers and its scores.

decide applies the same rules to the same columns again (they come first in the table), so a row
dropped here has the same reason it would have had after a download, and costs no request.
"""
from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config, ConfigError
from curate.phases.decide.dedupe import concat, partition_of, split
from curate.phases.decide.phase import (
    CODES,
    NONE,
    ROWS_PER_GROUP,
    ROWS_PER_PARTITION,
    _each,
    _fan,
    hash64,
    images_per_caption,
    reason_names,
    rule_codes,
)
from curate.run.exchange import Exchange
from curate.run.rundir import RunDir, shard_index
from curate.run.runtime import log, windowed
from curate.run.storage import Storage
from filters.blocklists import UrlBlocklist
from filters.text import SEGMENTED, TEXT_COLUMNS, plain_caption_columns, segmented_columns
from manifests.rules import INPUT_RULES, URL_COUNT, Rule
from manifests.schema import PLAN, build

SCREENED = [c for c in PLAN if c != "where_excluded"]   # the columns this module writes (the cut writes the other)


@dataclass(frozen=True)
class Job:
    """What every screening task needs; `rules` are the input rules applied before the caption count."""
    cfg: Config
    run: RunDir
    partitions: int
    rules: tuple[Rule, ...]
    count: bool   # caption_common before download (input.caption_first)
    attempt: str  # names this plan's exchanges
    downloaded: frozenset[str] = frozenset()   # a re-screen: the shards whose raw table holds a download

    def exchange(self, name: str) -> Exchange:
        return Exchange(self.run, self.attempt, name)

    @property
    def on(self) -> frozenset[str]:
        return frozenset(r.reason for r in self.rules if r.active(self.cfg))


def input_rules(cfg: Config) -> tuple[Rule, ...]:
    """The input rules the plan applies before the caption count: the caption's only with caption_first."""
    caption = set(TEXT_COLUMNS)
    return tuple(r for r in INPUT_RULES
                 if r is not URL_COUNT and (cfg.input.caption_first or not set(r.columns) <= caption))


def read_url_blocklist(cfg: Config) -> tuple[UrlBlocklist | None, dict | None]:
    """input.url_blocklist, read from its URI (once per task), and what the plan records of it."""
    uri = cfg.input.url_blocklist
    if uri is None:
        return None, None
    data = Storage(cfg.storage).read_bytes(uri)
    try:
        blocklist = UrlBlocklist.parse(data.decode("utf-8"), uri)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"input.url_blocklist: {exc}") from None
    return blocklist, {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(), "entries": len(blocklist)}


def _columns(job: Job, t: pa.Table, blocklist: UrlBlocklist | None) -> pa.Table:
    """The input shard with what the cheaper rules read beside it: the URL blocklist's verdict, and with
    caption_first the caption's columns but the segmented ones (see `_codes`)."""
    blocked = blocklist.match_all(t.column("url").to_pylist()) if blocklist else [None] * t.num_rows
    t = t.append_column("url_blocked_by", pa.array(blocked, pa.string()))
    if job.cfg.input.caption_first:
        for name, values in plain_caption_columns(t.column("caption").to_pylist(), job.cfg.text).items():
            t = t.append_column(name, build({name: values}).column(name))
    return t


def _codes(job: Job, t: pa.Table) -> np.ndarray:
    """Reason codes of the input rules. Segmenting a caption (jieba) is most of its cost and only the rules
    from the first that reads a segmented column on need it, so only the rows the rules before that leave in
    are segmented: a row's reason is its first rule, so the others' segmented values cannot change it."""
    cut = next((i for i, r in enumerate(job.rules) if set(r.columns) & set(SEGMENTED)), len(job.rules))
    code = rule_codes(t, job.cfg, job.rules[:cut], job.on)
    if cut == len(job.rules):
        return code
    alive = np.flatnonzero(code == NONE)
    found = segmented_columns(t.column("caption_norm").take(pa.array(alive)).to_pylist(), job.cfg.text)
    for name, values in found.items():
        full = [None] * t.num_rows
        for i, v in zip(alive.tolist(), values):
            full[i] = v
        t = t.append_column(name, build({name: full}).column(name))
    rest = rule_codes(t, job.cfg, job.rules[cut:], job.on)
    return np.where(code == NONE, rest, code).astype(np.int8)


def _fetchable(urls: pa.ChunkedArray) -> np.ndarray:
    """Rows with a URL at all: a null or empty one is never requested, so it names no image."""
    return np.array([bool(u) for u in urls.to_pylist()], bool)


def screen_group(job: Job, index: int, shards: list[str]) -> list:
    """Each shard's reason codes so far (the group's state, kept for finish_group), and the (caption, URL,
    row) of rows still in, written to the `pairs` exchange by caption partition; [bytes written, state]."""
    blocklist, listed = read_url_blocklist(job.cfg)
    state, parts = {"url_blocklist": listed, "shards": {}}, []
    for shard in shards:
        t = job.run.storage.read_parquet(job.run.input_shard(shard))
        t = t.drop_columns([c for c in SCREENED if c in t.column_names])   # a plan cut again
        t = _columns(job, t, blocklist)
        code = _codes(job, t)
        state["shards"][shard] = (code, t.column("url_blocked_by"))
        if job.count:
            alive = (code == NONE) & _fetchable(t.column("url"))
            sub = t.filter(pa.array(alive))
            parts.append({"caption": hash64(sub.column("caption_norm")), "image": hash64(sub.column("url")),
                          "row": sub.column("row_id").to_numpy()})
    written = 0
    if job.count:
        empty = {"caption": np.empty(0, np.uint64), "image": np.empty(0, np.uint64), "row": np.empty(0, np.int64)}
        cols = concat(tuple(parts)) if parts else empty
        written = job.exchange("pairs").write(index, split(partition_of(cols["caption"], job.partitions),
                                                           job.partitions, **cols))
    return [{"bytes": written}, state]


def shared_captions(job: Job, p: int, groups: int, bounds: np.ndarray) -> dict:
    """(row, distinct URLs of its caption) of every row of partition p whose caption has more than one,
    written to the `shared` exchange per group."""
    rows, count = images_per_caption(concat(job.exchange("pairs").read(groups, p)))
    rows, count = rows[count > 1], count[count > 1]
    cuts = np.searchsorted(rows >> 32, bounds)
    return {"bytes": job.exchange("shared").write(p, [{"row": rows[cuts[g]:cuts[g + 1]],
                                                        "count": count[cuts[g]:cuts[g + 1]]}
                                                       for g in range(groups)])}


def finish_group(job: Job, index: int, state: dict) -> dict:
    """caption_common before download, then every input shard of the group written with its plan columns;
    returns the rows dropped per reason of each shard, and the URL blocklist's record."""
    shared = job.exchange("shared").read(job.partitions, index) if job.count else []
    rows = np.concatenate([s["row"] for s in shared]) if shared else np.empty(0, np.int64)
    counts = np.concatenate([s["count"] for s in shared]) if shared else np.empty(0, np.int64)
    order = np.argsort(rows)   # each partition's rows are sorted, not their concatenation
    rows, counts = rows[order], counts[order]
    out = {}
    for shard, (code, blocked) in state["shards"].items():
        run = job.run
        t = run.storage.read_parquet(run.input_shard(shard))
        t = t.drop_columns([c for c in SCREENED if c in t.column_names])
        t = t.append_column("url_blocked_by", blocked)
        code = code.copy()   # arrays from the object store are read-only
        urls = None
        if job.count:
            row_id = t.column("row_id").to_numpy()
            counted = (code == NONE) & _fetchable(t.column("url"))
            urls = np.where(counted, 1, 0).astype(np.int32)
            hit = np.isin(row_id, rows)
            urls[hit] = counts[np.searchsorted(rows, row_id[hit])]
            view = {"caption_urls": np.where(counted, urls, np.nan)}
            code[counted & URL_COUNT.fails(view, job.cfg)] = CODES[URL_COUNT.reason]
            urls = pa.array(urls, pa.int32(), mask=~counted)
        t = t.append_column("caption_urls", urls if urls is not None else pa.nulls(t.num_rows, pa.int32()))
        t = t.append_column("before_download", reason_names(code))
        admitted, raw = 0, None
        if shard in job.downloaded:
            t, raw, admitted = _against_download(run, shard, t)
        run.storage.write_parquet(t, run.input_shard(shard))
        if raw is not None and not admitted:   # after the input shard: a crash before the plan redoes both
            run.storage.write_parquet(raw, run.raw_table(shard))
        names = t.column("before_download")
        out[shard] = {"reasons": dict(Counter(v for v in names.to_pylist() if v is not None)), "admitted": admitted}
    return {"shards": out, "url_blocklist": state["url_blocklist"]}


def _against_download(run: RunDir, shard: str, t: pa.Table) -> tuple[pa.Table, pa.Table | None, int]:
    """A re-screened shard against its download: (the input shard, with every row the download requested
    left requested; its raw table with the new plan columns when they changed, else None; rows newly
    admitted). A row that was requested keeps its result whatever the new settings say."""
    raw = run.storage.read_parquet(run.raw_table(shard))
    if not raw.column("key").equals(t.column("key")):
        raise RuntimeError(f"raw/{shard}.parquet does not hold the rows of input_shards/{shard}.parquet")
    asked = pc.not_equal(raw.column("status"), "not_requested")
    index = t.schema.get_field_index("before_download")
    t = t.set_column(index, "before_download",
                     pc.if_else(asked, pa.scalar(None, pa.string()), t.column("before_download")))
    admitted = int(pc.sum(pc.and_(pc.invert(asked), pc.is_null(t.column("before_download")))).as_py() or 0)
    if all(c in raw.column_names and raw.column(c).equals(t.column(c)) for c in SCREENED):
        return t, None, admitted
    for c in SCREENED:
        raw = raw.set_column(raw.schema.get_field_index(c), c, t.column(c)) if c in raw.column_names \
            else raw.append_column(c, t.column(c))
    return t, raw, admitted


def _groups(shards: list[str], shard_rows: int, rows: int, cpus: float) -> list[list[str]]:
    """Groups of consecutive shards: the caption's columns cost far more per row than decide's rules, so a
    small run is still cut into a few groups per CPU; a large one into groups of decide's size."""
    per_group = max(shard_rows, min(ROWS_PER_GROUP, math.ceil(rows / (4 * max(cpus, 1.0)))))
    per = max(1, per_group // max(shard_rows, 1))
    return [shards[i:i + per] for i in range(0, len(shards), per)]


def run_screen(cfg: Config, run: RunDir, shards: list[str], rows: int,
               downloaded: frozenset[str] = frozenset()) -> dict:
    """Screen every input shard (module docstring); return what the plan records: rows dropped per reason
    (and, re-screening the `downloaded` shards, `admitted`: the rows newly admitted per shard that has some)."""
    import ray

    rules = input_rules(cfg)
    count = cfg.input.caption_first
    partitions = max(cfg.dedupe.partitions, math.ceil(rows / ROWS_PER_PARTITION)) if count else 1
    attempt = "plan-" + uuid.uuid4().hex[:12]
    job = ray.put(Job(cfg, run, partitions, rules, count, attempt, downloaded))
    groups = _groups(shards, cfg.input.shard_rows, rows, ray.cluster_resources().get("CPU", 1.0))
    bounds = np.array([shard_index(g[0]) for g in groups] + [shard_index(shards[-1]) + 1], np.int64)
    G, P = len(groups), partitions
    mapped = [_fan(screen_group, 2)(job, i, g) for i, g in enumerate(groups)]
    ray.get([m[0] for m in mapped])   # every pair written before any is counted (a failed task raises here)
    if count:
        _each(shared_captions, [(job, p, G, bounds) for p in range(P)])
    finish = ray.remote(num_cpus=1)(finish_group)
    dropped: Counter = Counter()
    admitted: dict[str, int] = {}
    lists: list = []
    for g, result in windowed(range(G), lambda g: finish.remote(job, g, mapped[g][1])):
        if not isinstance(result, dict):
            raise RuntimeError(f"plan: screening shards {groups[g][0]}..{groups[g][-1]} failed: {result}")
        for shard, done in result["shards"].items():
            dropped.update(done["reasons"])
            if done["admitted"]:
                admitted[shard] = done["admitted"]
        lists.append(result["url_blocklist"])
    run.storage.delete_dir(Exchange.folder(run, attempt))
    ordered = {r.reason: dropped[r.reason] for r in INPUT_RULES if dropped.get(r.reason)}
    log.info("plan: %d of %d rows dropped before download (%s)", sum(ordered.values()), rows,
             ", ".join(f"{r} {n:,}" for r, n in ordered.items()) or "none")
    if any(entry != lists[0] for entry in lists):   # the file changed while the tasks read it
        raise RuntimeError(f"plan: input.url_blocklist changed during the plan: {lists}")
    out = {"caption_first": count, "rows": sum(ordered.values()), "reasons": ordered,
           "text": cfg.text.model_dump(mode="json") if count else None, "url_blocklist": lists[0]}
    return {**out, "admitted": dict(sorted(admitted.items()))} if downloaded else out


def spared(plan: dict, download: dict) -> dict | None:
    """stats.json's `before_download`: the rows never requested, per reason, and the raw-tar bytes they would
    have cost at the bytes per requested row the download actually spent (an estimate: None before any).
    `download`: stats.json's download section (its rows, not_requested and tar_bytes summed over the markers)."""
    screened = plan.get("before_download")
    if screened is None:
        return None
    asked = download.get("rows", 0) - download.get("not_requested", 0)
    per_row = download.get("tar_bytes", 0) / asked if asked else None
    return {"rows": screened["rows"], "reasons": screened["reasons"],
            "raw_bytes_per_requested_row": None if per_row is None else round(per_row),
            "raw_bytes_estimate": None if per_row is None else round(per_row * screened["rows"])}


def looser(cfg: Config, screened: dict) -> dict[str, tuple]:
    """The text settings that admit rows a caption-first plan (`screened`: the plan's before_download)
    dropped before download: key -> (planned, now); empty when none does (a tighter one is a re-decide)."""
    planned = screened.get("text")
    if not screened.get("caption_first") or not planned or not screened.get("rows"):
        return {}
    now = cfg.text.model_dump(mode="json")
    sides = {r.threshold.removeprefix("text."): r.drops for r in INPUT_RULES
             if r.threshold and r.threshold.startswith("text.")}
    found = {}
    for key, was in planned.items():
        value = now.get(key)
        if value == was:
            continue
        if key in sides:   # the rule's comparator says which way admits more
            admits = value < was if sides[key] == "below" else value > was
        else:              # keep_bilingual_share spares more as it grows; any other key changes the columns
            admits = value > was if key == "keep_bilingual_share" else True
        if admits:
            found[f"text.{key}"] = (was, value)
    return found


def _lines(found: dict[str, tuple]) -> str:
    return "\n".join(f"  - {key}: planned with {was!r}, now {now!r}" for key, (was, now) in found.items())


def check_screen(cfg: Config, run: RunDir, downloading: bool) -> None:
    """Refuse text settings that admit rows the plan never requested when the phases asked for do not
    download (`curate decide`, `curate score`, a dry run): those rows would read as download_failed. With
    the download, `rescreen` fetches them."""
    screened = run.storage.read_json(run.plan).get("before_download") or {}
    found = looser(cfg, screened)
    if found and not downloading:
        raise ConfigError(f"{run.root}: the plan dropped {screened['rows']:,} rows before download under other text "
                          f"settings, and these would admit rows it never requested:\n" + _lines(found) +
                          "\nrun `curate run` (or `curate download`) to download only the newly admitted rows, "
                          "or restore the settings (a tighter setting is a plain re-decide)")


def rescreen(cfg: Config, run: RunDir) -> dict | None:
    """Loosening, incrementally: when a text setting admits rows the plan dropped before download, screen
    every shard again under the new settings (module docstring) and record them in the plan, with the
    `increment` the download then makes: the shards with rows newly admitted, and how many. None (and
    nothing done) when no setting admits more. The plan is written last, so a crash redoes it all."""
    info = run.storage.read_json(run.plan)
    screened = info.get("before_download") or {}
    found = looser(cfg, screened)
    if not found:
        return None
    shards = info["shards"]
    pending = set((screened.get("increment") or {}).get("admitted", {}))   # an earlier one not finished
    downloaded = run.done("download") | {s for s in pending if run.storage.exists(run.raw_table(s))}
    log.info("plan: these text settings admit rows the plan never requested; screening again:\n%s",
             _lines(found))
    now = run_screen(cfg, run, shards, info["rows"], frozenset(downloaded))
    admitted = now.pop("admitted", {})
    now["increment"] = {"loosened": list(found), "rows": sum(admitted.values()), "shards": len(admitted),
                        "admitted": admitted, "screen": uuid.uuid4().hex[:12]}
    info["before_download"] = now
    run.storage.write_json(run.plan, info)
    log.info("plan: %d rows newly admitted in %d of %d shards; only those rows are requested, and only those "
             "shards re-scored", now["increment"]["rows"], len(admitted), len(shards))
    return now["increment"]
