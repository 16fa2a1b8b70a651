"""Phase 4, write: kept samples into WebDataset shards, the manifest dataset and the stats.

The plan comes from the kept count in each input shard's decide marker: kept rows in key order
(input shard order, then key) fill output shards of exactly `write.samples_per_shard` samples
(only the last may be short), named `{prefix}-{n:06d}.tar`. The driver holds counts, never rows.

Tasks take groups of consecutive input shards. A task writes the manifest of its own input
shards and the output shards that start in them, streaming each raw tar it needs once, in tar
order, into the output tars those images belong to (so an output shard's members are in raw-tar
order, grouped by input shard). An output shard whose content digest matches its marker
(`_done/shards/{prefix}-{n:06d}.json`) is not rewritten, so a re-decide rewrites only the shards
that differ. Each input shard's `_done/write/{shard}.json` carries its counts; stats.json sums them.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.hosts import download_stats
from curate.rundir import RunDir
from curate.runtime import Progress, Window, log
from curate.storage import Storage
from curate.tario import TarWriter, members
from manifests.inspect import funnel_of_counts
from manifests.io import manifest_schema, shard_table
from manifests.schema import ALL

SAMPLE_EXCLUDE = {"keep", "reason", "dup_of", "out_shard", "caption_norm"}
ROWS_PER_TASK = 50_000   # kept rows a task plans for (at least one output shard): few tasks, bounded memory


class DecisionsNotReady(FileNotFoundError):
    """The decisions are missing, or a mix of two decide attempts: write refuses them."""


@dataclass(frozen=True)
class Job:
    """What every write task needs; put in the object store once."""
    run: RunDir
    size: int
    prefix: str
    attempt: str
    schema: pa.Schema
    downloaded: frozenset[str]
    scored: frozenset[str]
    ocr_caption: str | None = None   # write.ocr_caption

    def stem(self, n: int) -> str:
        """Output shard n's name without `.tar`: its marker is `_done/shards/{stem}.json`."""
        return f"{self.prefix}-{n:06d}"

    def name(self, n: int) -> str:
        return f"{self.stem(n)}.tar"


@dataclass
class Task:
    """A group of input shards: it owns their manifests and the output shards [first, stop) that start
    in them; `tail` are the following shards it reads only to complete its last output shard."""
    shards: list[str]
    tail: list[str]
    starts: dict[str, int]   # shard -> global kept index of its first kept row
    first: int
    stop: int
    kept: int = 0


@dataclass
class Sample:
    key: str
    txt: bytes
    json: bytes


@dataclass
class _Out:
    """One output shard: its samples in key order (with their input shard), then, while the raw tars
    stream by, its open tar and how many samples are still to come."""
    stem: str
    samples: list[tuple[str, Sample]] = field(default_factory=list)
    digest: str = ""
    stream: IO[bytes] | None = None
    tar: TarWriter | None = None
    left: int = 0

    def add(self, run: RunDir, image: bytes, sample: Sample) -> None:
        """Append one sample; the last one closes the tar, then writes its marker."""
        if self.tar is None:
            self.stream = run.storage.open_output(run.out_shard(f"{self.stem}.tar"))
            self.tar, self.left = TarWriter(self.stream), len(self.samples)
        self.tar.add(f"{sample.key}.jpg", image)
        self.tar.add(f"{sample.key}.json", sample.json)
        self.tar.add(f"{sample.key}.txt", sample.txt)
        self.left -= 1
        if not self.left:
            self.tar.close()
            self.stream.close()
            run.mark("shards", self.stem, {"digest": self.digest, "samples": len(self.samples)})


# -- planning (driver) --------------------------------------------------------------------------

def check_decisions(run: RunDir, shards: list[str]) -> tuple[dict, list[dict]]:
    """_decided.json and every shard's decide marker, all from that one attempt; otherwise refuse."""
    if not run.storage.exists(run.decided):
        raise DecisionsNotReady(f"{run.decided} is missing: decide has not finished (or a re-decide was "
                                f"interrupted); run `curate decide` first")
    decided = run.storage.read_json(run.decided)
    done = run.done("decide")
    missing = [s for s in shards if s not in done]
    if missing:
        raise DecisionsNotReady(f"{len(missing)} shard(s) have no decisions marker ({run.marker('decide', missing[0])}"
                                f"{', ...' if len(missing) > 1 else ''}): run `curate decide` again")
    markers = run.markers("decide", shards)
    stale = [s for s, m in zip(shards, markers) if m.get("attempt") != decided["attempt"]]
    if stale:
        raise DecisionsNotReady(f"decisions of {len(stale)} shard(s) come from another decide attempt than "
                                f"{run.decided} ({run.marker('decide', stale[0])}"
                                f"{', ...' if len(stale) > 1 else ''}): run `curate decide` again")
    return decided, markers


def plan_tasks(shards: list[str], kept: list[int], size: int, rows_per_task: int) -> list[Task]:
    """Groups of consecutive shards with at least max(size, rows_per_task) kept rows (the last may
    have fewer), each owning the output shards that start in it."""
    starts = np.concatenate([[0], np.cumsum(kept, dtype=np.int64)]).tolist()
    total = starts[-1]
    tasks, begin = [], 0
    for i in range(len(shards)):
        if starts[i + 1] - starts[begin] < max(size, rows_per_task) and i < len(shards) - 1:
            continue
        first, stop = -(-starts[begin] // size), -(-starts[i + 1] // size)
        end = min(stop * size, total)            # where the last owned output shard ends
        j = i + 1
        while j < len(shards) and starts[j] < end:
            j += 1
        tasks.append(Task(shards[begin:i + 1], shards[i + 1:j], dict(zip(shards[begin:j], starts[begin:j])),
                          first, stop, kept=max(end - first * size, 0)))
        begin = i + 1
    return tasks


# -- one task ----------------------------------------------------------------------------------

def sample_json(table: pa.Table) -> list[bytes]:
    """Each row's sample .json: every column but SAMPLE_EXCLUDE, keys sorted, pHash as 16 hex digits,
    NaN and infinities as null."""
    names = sorted(c for c in table.column_names if c not in SAMPLE_EXCLUDE)
    values = []
    for name in names:
        col = table.column(name)
        if name == "phash":
            values.append([None if v is None else f"{v:016x}" for v in col.to_pylist()])
            continue
        if pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_finite(col), col, pa.scalar(None, col.type))
        values.append(col.to_pylist())
    return [json.dumps(dict(zip(names, row)), ensure_ascii=False, sort_keys=True, allow_nan=False,
                       default=str).encode("utf-8") for row in zip(*values)]


def out_shard_column(job: Job, keep: np.ndarray, start: int) -> pa.Array:
    """The output shard name of every kept row (null for dropped rows), without a string per row."""
    n = (start + np.cumsum(keep) - 1) // job.size
    first = int(n[keep].min()) if keep.any() else 0
    indices = pa.array((n - first).astype(np.int32), mask=~keep)
    names = pa.array([job.name(i) for i in range(first, int(n.max()) + 1 if keep.any() else first)], pa.string())
    return pa.DictionaryArray.from_arrays(indices, names).cast(pa.string())


def shard_stats(job: Job, table: pa.Table, keep: np.ndarray, start: int) -> dict:
    """The write marker: this shard's counts, summed by the driver into stats.json."""
    def counts(column: str) -> dict:
        return {r["values"]: r["counts"] for r in pc.value_counts(table.column(column)).to_pylist()
                if r["values"] is not None}

    kept = int(keep.sum())
    started = range(-(-start // job.size), -(-(start + kept) // job.size))
    return {"attempt": job.attempt, "rows": table.num_rows, "kept": kept, "first_kept": start,
            "reasons": counts("reason"), "status": counts("status"), "out_shards": [job.name(n) for n in started]}


def read_group(job: Job, task: Task) -> tuple[dict[int, _Out], dict[str, dict]]:
    """Write the group's manifests; return the samples of its output shards and its shards' markers."""
    run = job.run
    outs = {n: _Out(job.stem(n)) for n in range(task.first, task.stop)}
    markers = {}
    own = set(task.shards)
    for shard in task.shards + task.tail:
        table = shard_table(run, shard, shard in job.downloaded, shard in job.scored, job.schema)
        keep = pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False)
        start = task.starts[shard]
        if shard in own:
            table = table.set_column(table.schema.get_field_index("out_shard"), "out_shard",
                                     out_shard_column(job, keep, start))
            run.storage.write_parquet(table, run.manifest(shard))
            markers[shard] = shard_stats(job, table, keep, start)
        rows = np.flatnonzero(keep)
        n = (start + np.arange(len(rows))) // job.size
        mine = (n >= task.first) & (n < task.stop)
        if not mine.any():
            continue
        kept = table.take(pa.array(rows[mine]))
        for key, text, meta, out in zip(kept.column("key").to_pylist(), captions(kept, job.ocr_caption),
                                        sample_json(kept), n[mine].tolist()):
            outs[out].samples.append((shard, Sample(key, text.encode("utf-8"), meta)))
    return outs, markers


def captions(kept: pa.Table, template: str | None) -> list[str]:
    """Each sample's .txt: the normalised caption, or `write.ocr_caption` filled in where OCR read text."""
    n = kept.num_rows
    txt = kept.column("caption_norm").fill_null("").to_pylist() if "caption_norm" in kept.column_names else [""] * n
    if template is None or "ocr_text" not in kept.column_names:
        return txt
    return [template.format(caption=c, ocr_text=o) if o else c
            for c, o in zip(txt, kept.column("ocr_text").to_pylist())]


def digest(samples: list[tuple[str, Sample]]) -> str:
    h = hashlib.sha256()
    for _, s in samples:
        h.update(s.key.encode() + b"\0" + s.txt + b"\0" + s.json + b"\0")
    return h.hexdigest()


def stream_images(run: RunDir, shards: list[str], todo: list[_Out]) -> None:
    """Stream each raw tar holding a wanted image once, in tar order, into the output tars."""
    wanted: dict[str, dict[str, tuple[_Out, Sample]]] = {}
    for out in todo:
        for shard, sample in out.samples:
            wanted.setdefault(shard, {})[f"{sample.key}.jpg"] = (out, sample)
    for shard in shards:
        if shard not in wanted:
            continue
        left = set(wanted[shard])
        with run.storage.open_input(run.raw_tar(shard)) as f:
            for member, data in members(f, left.copy()):
                out, sample = wanted[shard][member]
                out.add(run, data, sample)
                left.discard(member)
        if left:
            raise FileNotFoundError(f"{run.raw_tar(shard)} lacks {len(left)} kept image(s): {sorted(left)[:3]}")


def write_group(job: Job, task: Task) -> dict[str, dict]:
    """One task: manifests, the output shards whose content changed, then the write markers."""
    run = job.run
    outs, markers = read_group(job, task)
    todo = []
    for out in outs.values():
        out.digest = digest(out.samples)
        try:
            same = run.storage.read_json(run.marker("shards", out.stem))["digest"] == out.digest
        except FileNotFoundError:
            same = False
        if not same:
            run.unmark("shards", out.stem)   # first: a half-written tar must never carry a valid marker
            todo.append(out)
    stream_images(run, task.shards + task.tail, todo)
    for shard, info in markers.items():
        run.mark("write", shard, info)
    return markers


# -- the driver --------------------------------------------------------------------------------

def _delete_stale(run: RunDir, prefix: str, count: int) -> None:
    """Output shards (and markers) of an older, longer plan, and unmarked leftovers beyond the plan."""
    def stale(stem: str) -> bool:
        head, _, number = stem.rpartition("-")
        return head == prefix and number.isdigit() and int(number) >= count

    for name in run.storage.list(run.uri("shards")):
        if name.endswith(".tar") and stale(name.removesuffix(".tar")):
            run.storage.delete(run.out_shard(name))
    for stem in run.done("shards"):
        if stale(stem):
            run.unmark("shards", stem)


@dataclass
class Plan:
    """The driver's view of one write: counts and names, never rows."""
    job: Job
    tasks: list[Task]
    decided: dict
    models: dict
    total: int

    @property
    def count(self) -> int:
        return math.ceil(self.total / self.job.size)


def plan(cfg: Config, shards: list[str]) -> Plan:
    """Check the decisions, fix the manifest schema and cut the work into tasks."""
    run = RunDir(cfg.run_dir, Storage(cfg.storage))
    storage = run.storage
    decided, decide_markers = check_decisions(run, shards)
    downloaded, scored = run.done("download"), run.done("score")
    models_uri = run.file("models.json")
    models = storage.read_json(models_uri) if storage.exists(models_uri) else {}
    schema = manifest_schema(run, shards, downloaded, scored, cfg.input.extra_cols).with_metadata(
        {"curate.models": json.dumps(models, ensure_ascii=False)})
    job = Job(run, cfg.write.samples_per_shard, cfg.write.prefix, decided["attempt"], schema,
              frozenset(downloaded), frozenset(scored), cfg.write.ocr_caption)
    kept = [m["kept"] for m in decide_markers]
    return Plan(job, plan_tasks(shards, kept, job.size, ROWS_PER_TASK), decided, models, sum(kept))


def run_write(cfg: Config, shards: list[str], failures: list[dict]) -> dict:
    """Write the changed output shards and the manifest; write and return stats.json's content.

    A task that fails records each of its input shards as a `write` failure in the stats
    instead of stopping the others.
    """
    import ray

    p = plan(cfg, shards)
    progress = Progress("write", p.total)
    remote = ray.remote(num_cpus=1)(write_group)
    job_ref = ray.put(p.job)
    window = Window()
    per_shard: dict[str, dict] = {}
    errors = []

    def collect(results: dict) -> None:
        for i, result in results.items():
            task = p.tasks[i]
            if isinstance(result, dict):
                per_shard.update(result)
                progress.add(task.kept)
            else:
                log.error("write: shards %s..%s failed: %s", task.shards[0], task.shards[-1], result)
                errors.extend({"phase": "write", "shard": s, "error": result} for s in task.shards)

    for i, task in enumerate(p.tasks):
        collect(window.submit(remote.remote(job_ref, task), i))
    collect(window.drain())
    progress.finish()
    return finish(p, per_shard, [*failures, *errors])


def finish(p: Plan, per_shard: dict[str, dict], failures: list[dict]) -> dict:
    """Delete what an older plan left beyond this one, then write stats.json from the shards' markers
    (the funnel from the write markers; error kinds, waits and top hosts from the download markers)."""
    run = p.job.run
    _delete_stale(run, p.job.prefix, p.count)
    stats = aggregate(per_shard, p.job.schema)
    stats["download"] = download_stats(run.markers("download", sorted(p.job.downloaded)))
    stats.update(shards={"count": p.count, "samples": p.total, "names": [p.job.name(n) for n in range(p.count)]},
                 failures=failures, models=p.models, styles=p.decided.get("styles"))
    run.storage.write_json(run.stats, stats)
    return stats


def aggregate(markers: dict[str, dict], schema: pa.Schema) -> dict:
    """stats.json's funnel and download counts, summed from the write markers (O(shards))."""
    reasons: dict[str, int] = {}
    status: dict[str, int] = {}
    for info in markers.values():
        for bucket, counts in ((reasons, info["reasons"]), (status, info["status"])):
            for k, v in counts.items():
                bucket[k] = bucket.get(k, 0) + v
    kept = sum(i["kept"] for i in markers.values())
    return {"funnel": funnel_of_counts({**reasons, None: kept}),
            "download_status": status,
            "columns": {c: ALL[c].doc for c in schema.names if c in ALL}}
