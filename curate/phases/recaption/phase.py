"""Phase 4, recaption (recaption.enabled): a vision-language model describes every KEPT row's image.

It runs after decide and only on the rows decide kept, so its cost follows the output, not the
input. Each recaption actor loads the engine once (filters/models/recaption.py) and takes whole
input shards, chosen by the driver's one bounded window (curate/run/runtime.py `windowed`), the
least busy actor first. For a shard it reads the decisions, the raw table's sha256 and (when OCR
read text) the scores' `ocr_text`, and computes each kept row's cache key: the image's sha256, the
model and generation settings, the prompt text with its OCR hint (filters/models/recaption.py
`cache_key`).

The cache is per shard under the run directory, `recaption/_cache/{shard}/{part}.parquet`
(cache_key, output, error): only rows whose key no part holds go to the model, their images
streamed once from the raw tar, and every `recaption.flush_rows` new captions are written as a new
part (written once under its final name, as object stores want), so a killed task loses at most
that much. A re-decide that keeps new rows captions only those; one that drops rows leaves their
entries unused and costs nothing; a changed model, prompt or setting misses the cache everywhere.

Then the shard's result, `recaption/{shard}.parquet` (every row in key order: `recaption`,
`recaption_error`), and last its marker `_done/recaption/{shard}.json`, which names the decide
attempt and the fingerprint (generation settings plus the caption rules that check the output)
it was made under; the driver skips shards whose marker matches both. The stored output is checked
by the caption rules (normalisation, length up to recaption.max_chars, Chinese share, repetition,
blocklist: manifests/rules.py) as the result is made, so changing a rule re-checks without
re-generating. A row the model fails on, or whose output is empty, garbled or rejected, keeps its
original caption and gets `recaption_error`. A shard that fails is a shard failure (failures.json).
"""
from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config, ConfigError
from curate.run import failures
from curate.run.rundir import RunDir
from curate.run.runtime import Progress, log, windowed
from curate.run.storage import join
from curate.run.tario import members
from filters.declare import digest
from filters.models.options import ModelOptions
from filters.models.recaption import (
    MODEL_ERROR,
    Engine,
    RecaptionOptions,
    cache_key,
    caption,
    describe,
    generation_settings,
    load_engine,
    row_prompt,
    settings_digest,
)
from filters.text import TextOptions
from manifests.rules import explain
from manifests.schema import conform

CACHE_SCHEMA = pa.schema([("cache_key", pa.string()), ("output", pa.string()), ("error", pa.string())])


@dataclass(frozen=True)
class Job:
    """What every recaption task needs; put in the object store once."""

    run: RunDir
    opts: RecaptionOptions
    text: TextOptions
    attempt: str          # the decide attempt whose decisions are captioned
    settings: str         # digest of the generation settings: part of every cache key
    fingerprint: str      # settings + the caption rules that check the output: the marker's

    def check(self, output: str | None, error: str | None) -> tuple[str | None, str | None]:
        """(recaption, recaption_error) of one stored output: normalised and passed by the caption rules,
        with text.max_chars raised to recaption.max_chars, or rejected by the first rule it fails."""
        if output is None:
            return None, error or "no output"
        verdict = explain(output, self.text.model_copy(update={"max_chars": self.opts.max_chars}))
        if not verdict["keep"]:
            return None, f"rejected: {verdict['reason']}"
        return verdict["caption_norm"], None


def make_job(cfg: Config, run: RunDir, attempt: str) -> Job:
    settings = settings_digest(generation_settings(cfg.recaption, cfg.models.weights))
    checks = {"max_chars": cfg.recaption.max_chars, "text": cfg.text.model_dump(mode="json")}
    return Job(run, cfg.recaption, cfg.text, attempt, settings,
               digest({"settings": settings, "checks": checks}))


# -- one shard (inside an actor) ------------------------------------------------------------------

def cache_parts(run: RunDir, shard: str) -> list[str]:
    return [n for n in run.storage.list(run.recaption_cache(shard)) if n.endswith(".parquet")]


def read_cache(run: RunDir, shard: str) -> tuple[dict[str, tuple[str | None, str | None]], list[str]]:
    """{cache_key: (output, error)} of every part of a shard's cache, and the parts' names."""
    parts = cache_parts(run, shard)
    found: dict[str, tuple[str | None, str | None]] = {}
    for name in parts:
        t = run.storage.read_parquet(join(run.recaption_cache(shard), name))
        for k, o, e in zip(*(t.column(c).to_pylist() for c in CACHE_SCHEMA.names)):
            found[k] = (o, e)
    return found, parts


PARTIAL = ".partial"   # a part being written: renamed to .parquet once whole, so a kill never leaves half a part


def write_part(run: RunDir, shard: str, entries: dict[str, tuple[str | None, str | None]]) -> str:
    """One new cache part, written under a temporary name and then renamed; returns the name."""
    name = f"{uuid.uuid4().hex[:16]}.parquet"
    keys = list(entries)
    table = pa.table([keys, [entries[k][0] for k in keys], [entries[k][1] for k in keys]], schema=CACHE_SCHEMA)
    final = join(run.recaption_cache(shard), name)
    run.storage.write_parquet(table, final + PARTIAL)
    run.storage.move(final + PARTIAL, final)
    return name


def sweep_partial(run: RunDir, shard: str) -> None:
    """Parts a killed task left half-written (the shard's task is the only writer of its cache)."""
    for name in run.storage.list(run.recaption_cache(shard)):
        if name.endswith(PARTIAL):
            run.storage.delete(join(run.recaption_cache(shard), name))


def kept_rows(job: Job, shard: str, downloaded: bool,
              scored: bool) -> tuple[pa.ChunkedArray, np.ndarray, list[str], list[tuple[str, str]]]:
    """(keys, kept row indices, their keys, their (cache key, prompt)) of one shard."""
    run = job.run
    decisions = run.storage.read_parquet(run.decisions(shard), columns=["key", "keep"])
    keep = pc.fill_null(decisions.column("keep"), False).to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(keep)
    keys = decisions.column("key")
    if not len(rows):
        return keys, rows, [], []
    if not downloaded:
        raise FileNotFoundError(f"{shard} has kept rows but no download marker: run `curate download`")
    take = pa.array(rows)
    sha = run.storage.read_parquet(run.raw_table(shard), columns=["key", "sha256"])
    if not sha.column("key").equals(keys):
        raise ValueError(f"{run.raw_table(shard)} does not hold the rows of {run.decisions(shard)} in the same order")
    sha256 = sha.column("sha256").take(take).to_pylist()
    ocr = [None] * len(rows)
    if scored and "ocr_text" in run.storage.parquet(run.scores(shard)).schema_arrow.names:
        ocr = run.storage.read_parquet(run.scores(shard), columns=["ocr_text"]).column("ocr_text")
        ocr = ocr.take(take).to_pylist()
    kept_keys = keys.take(take).to_pylist()
    prompts = [row_prompt(job.opts, o) for o in ocr]
    return keys, rows, kept_keys, [(cache_key(job.settings, s or f"key:{k}", p), p)
                                   for k, s, p in zip(kept_keys, sha256, prompts)]


def _decode(data: bytes) -> tuple[Any, str | None]:
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image, None
    except Exception as exc:
        return None, f"decode: {type(exc).__name__}: {str(exc)[:200]}"


def generate(job: Job, engine: Engine, shard: str, todo: dict[str, tuple[str, str]],
             cache: dict[str, tuple[str | None, str | None]]) -> int:
    """Caption the rows `todo` ({member name: (cache_key, prompt)}) from the shard's raw tar in tar order,
    in batches of recaption.batch_size, adding them to `cache` and writing a part every flush_rows; returns
    how many were generated. A model error (an out-of-memory, say) may not recur: it is kept for this
    result only, never written to the cache, so the next run tries the row again."""
    run, opts = job.run, job.opts
    pending: dict[str, tuple[str | None, str | None]] = {}
    batch: list[tuple[str, str, Any, str | None]] = []
    done = 0

    def flush(at_least: int) -> None:
        lasting = {k: v for k, v in pending.items() if not (v[1] or "").startswith(MODEL_ERROR)}
        if lasting and len(pending) >= at_least:
            write_part(run, shard, lasting)
        if len(pending) >= at_least:
            cache.update(pending)
            pending.clear()

    def run_batch() -> None:
        nonlocal done
        out = caption(engine, [b[2] for b in batch], [b[1] for b in batch], [b[3] for b in batch])
        for (key, _, _, _), c in zip(batch, out):
            pending[key] = (c.text, c.error)
        done += len(batch)
        batch.clear()
        flush(opts.flush_rows)

    left = set(todo)
    with run.storage.open_input(run.raw_tar(shard)) as f:
        for member, data in members(f, set(todo)):
            key, prompt = todo[member]
            left.discard(member)
            if key in cache or key in pending or any(b[0] == key for b in batch):
                continue   # the same image and prompt twice in a shard: captioned once
            batch.append((key, prompt, *_decode(data)))
            if len(batch) >= opts.batch_size:
                run_batch()
    for member in sorted(left):   # kept but not in the tar: the download phase recorded otherwise
        pending[todo[member][0]] = (None, "image missing from the raw tar")
    if batch:
        run_batch()
    flush(1)
    return done


def compact(run: RunDir, shard: str, parts: list[str], cache: dict[str, tuple[str | None, str | None]]) -> None:
    """Many parts into one: the new one is written before the old ones go, so a kill loses nothing."""
    if len(parts) > 1:
        write_part(run, shard, {k: v for k, v in cache.items() if not (v[1] or "").startswith(MODEL_ERROR)})
        for name in parts:
            run.storage.delete(join(run.recaption_cache(shard), name))


def recaption_shard(job: Job, engine: Callable[[], Engine], shard: str, downloaded: bool, scored: bool) -> dict:
    """Caption one shard's kept rows that the cache lacks, write its result and then its marker. `engine`
    gives the engine when a row needs it: a shard whose rows are all cached loads no model."""
    run = job.run
    run.unmark("recaption", shard)   # first: a task that dies leaves no stale marker
    sweep_partial(run, shard)
    keys, rows, kept_keys, wanted = kept_rows(job, shard, downloaded, scored)
    cache, _ = read_cache(run, shard)
    todo = {f"{k}.jpg": w for k, w in zip(kept_keys, wanted) if w[0] not in cache}
    generated = generate(job, engine(), shard, todo, cache) if todo else 0
    compact(run, shard, cache_parts(run, shard), cache)
    text: list[str | None] = [None] * len(keys)
    error: list[str | None] = [None] * len(keys)
    for r, (key, _) in zip(rows.tolist(), wanted):
        text[r], error[r] = job.check(*cache[key])
    run.storage.write_parquet(conform(pa.table({"key": keys, "recaption": pa.array(text, pa.string()),
                                                "recaption_error": pa.array(error, pa.string())})),
                              run.recaption(shard))
    failed = [e for e in error if e is not None]
    info = {"attempt": job.attempt, "fingerprint": job.fingerprint, "settings": job.settings, "rows": len(keys),
            "kept": len(rows), "generated": generated, "cached": len(rows) - generated,
            "recaptioned": len(rows) - len(failed), "rejected": sum(e.startswith("rejected:") for e in failed),
            "failed": sum(not e.startswith("rejected:") for e in failed)}
    run.mark("recaption", shard, info)
    return info


class Recaptioner:
    """A Ray actor: whole shards captioned one at a time, the engine loaded once, on the first row that
    needs it (a re-decide that only drops rows loads no model)."""

    def __init__(self, opts: RecaptionOptions, models: ModelOptions):
        self.opts, self.models = opts, models
        self._engine: Engine | None = None

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = load_engine(self.opts, self.models)
        return self._engine

    def shard(self, job: Job, shard: str, downloaded: bool, scored: bool) -> dict:
        return recaption_shard(job, self.engine, shard, downloaded, scored)


# -- the driver ------------------------------------------------------------------------------------

def up_to_date(job: Job, marker: dict) -> bool:
    return marker.get("attempt") == job.attempt and marker.get("fingerprint") == job.fingerprint


def run_recaption(cfg: Config, run: RunDir) -> tuple[list[dict], int]:
    """Recaption every shard whose marker is missing or stale; (failures, kept rows worked on)."""
    import ray

    if not cfg.recaption.enabled:
        return [], 0
    if not run.storage.exists(run.decided):
        raise FileNotFoundError(f"{run.decided} is missing: run `curate decide` first")
    shards = run.shard_names()
    decided = run.storage.read_json(run.decided)
    job = make_job(cfg, run, decided["attempt"])
    done = sorted(run.done("recaption") & set(shards))
    current = {s for s, m in zip(done, run.markers("recaption", done)) if up_to_date(job, m)}
    todo = [s for s in shards if s not in current]
    if cfg.models.weights == "random":
        log.warning("recaption runs with RANDOM weights: every recaption is meaningless")
    if not todo:
        log.info("recaption: all %d shards up to date, nothing to do", len(shards))
        return [], 0
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.recaption.num_gpus > gpus:   # the actors would wait for a GPU forever
        raise ConfigError(f"recaption.num_gpus={cfg.recaption.num_gpus:g} per actor but the cluster has {gpus:g} "
                          f"GPUs: set recaption.num_gpus=0 to recaption on CPU")
    kept = dict(zip(todo, (m["kept"] for m in run.markers("decide", todo))))
    downloaded, scored = run.done("download"), run.done("score")
    producer = run.uri("recaption", "_producers", f"{job.settings}.json")
    if not run.storage.exists(producer):
        run.storage.write_json(producer, describe(cfg.recaption, cfg.models))
    actor = ray.remote(num_cpus=cfg.recaption.num_cpus, num_gpus=cfg.recaption.num_gpus or None,
                       max_restarts=1)(Recaptioner)
    actors = [actor.remote(cfg.recaption, cfg.models) for _ in range(min(cfg.recaption.num_actors, len(todo)))]
    busy = [0] * len(actors)
    where: dict[str, int] = {}
    job_ref = ray.put(job)

    def submit(shard: str):
        i = where[shard] = int(np.argmin(busy))
        busy[i] += 1
        return actors[i].shard.remote(job_ref, shard, shard in downloaded, shard in scored)

    progress = Progress("recaption", sum(kept.values()))
    failed: list[dict] = []
    totals = {"generated": 0, "cached": 0, "rejected": 0, "failed": 0}
    try:
        for shard, result in windowed(todo, submit, limit=2 * len(actors)):
            busy[where.pop(shard)] -= 1
            if isinstance(result, dict):
                progress.add(result["kept"])
                for k in totals:
                    totals[k] += result[k]
            else:
                failed.append(failures.failure("recaption", shard, result))
                log.error("recaption: shard %s failed: %s", shard, result)
    finally:
        for a in actors:
            ray.kill(a)
    progress.finish()
    log.info("recaption: %d shards, %d kept rows: %d generated, %d from the cache, %d rejected by the caption "
             "rules, %d failed", len(todo), progress.done, totals["generated"], totals["cached"], totals["rejected"],
             totals["failed"])
    return failed, progress.done


def summary(run: RunDir, shards: list[str]) -> dict:
    """What wrote the recaptions on disk, from the shards' markers and the producers they name (never the
    config): the model and prompt per settings digest with its shard count, and the row counts."""
    done = sorted(run.done("recaption") & set(shards))
    markers = run.markers("recaption", done)
    rows = {k: sum(m[k] for m in markers) for k in ("kept", "recaptioned", "rejected", "failed")}
    producers = []
    for settings in dict.fromkeys(m["settings"] for m in markers):
        uri = run.uri("recaption", "_producers", f"{settings}.json")
        described = run.storage.read_json(uri) if run.storage.exists(uri) else {}
        producers.append({**described, "settings": settings, "shards": sum(m["settings"] == settings for m in markers)})
    return {"shards": len(done), "rows": rows, "producers": producers}
