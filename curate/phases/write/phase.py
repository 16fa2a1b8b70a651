"""Phase 5, write: kept samples into WebDataset shards, the manifest dataset, the stats and the card.

Each kept row gets a `bucket` (write.buckets): the training resolution whose aspect ratio is
nearest that of the stored image, i.e. the bytes in the shard (download keeps the ratio, so it
is the original's up to rounding); the trainer resizes to it, the bytes stay as downloaded.

The plan comes from kept counts per input shard, per stream: one stream of every kept row, or
with `write.group_by_bucket` one per bucket (counted by small tasks over the raw size columns).
A stream's kept rows in key order (input shard order, then key) fill output shards of exactly
`write.samples_per_shard` samples (only its last may be short), named `{prefix}-{n:06d}.tar`, or
`{prefix}-{w}x{h}-{n:06d}.tar` per bucket. The driver holds counts, never rows.

Tasks take groups of consecutive input shards. A task writes the manifest of its own input
shards and the output shards that start in them, streaming each raw tar it needs once, in tar
order, into the output tars those images belong to (so an output shard's members are in raw-tar
order, grouped by input shard). An output shard whose content digest matches its marker
(`_done/shards/{stem}.json`) is not rewritten, so a re-decide rewrites only the shards that
differ. Each input shard's `_done/write/{shard}.json` carries its counts; stats.json sums them,
and the dataset card (curate/phases/write/card.py) is made from stats.json and the config.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import PREFIX, Config
from curate.phases.download.marker_stats import download_summary
from curate.phases.download.screen import spared
from curate.phases.write.card import write_card
from curate.phases.write.record import manifest_schema, shard_table
from curate.phases.write.sample import sample_json
from curate.run.failures import failure, record, skipped
from curate.run.rundir import RunDir
from curate.run.runtime import Progress, log, windowed
from curate.run.storage import Storage
from curate.run.tario import TarWriter, members
from filters.buckets import bucket_name, nearest_buckets
from manifests.funnel import Funnel
from manifests.schema import ALL

ROWS_PER_TASK = 50_000   # kept rows a task plans for (at least one output shard): few tasks, bounded memory
COUNT_SHARDS = 256       # input shards per bucket-counting task
UNBUCKETED = "unbucketed"   # the stream (and stats key) of kept rows whose size is unknown, when grouping
EXAMPLES_PER_SHARD = 2   # recaption pairs a write marker carries; stats.json keeps the first EXAMPLES
EXAMPLES = 8
NOT_RECAPTIONED = "not recaptioned: the shard's recaption failed (failures.json)"


class DecisionsNotReady(FileNotFoundError):
    """The decisions are missing, or a mix of two decide attempts: write refuses them."""


@dataclass(frozen=True)
class Job:
    """What every write task needs; put in the object store once.

    `streams` holds each stream's infix in the shard names: one empty one, or with grouping one
    `{w}x{h}-` per bucket and `unbucketed-` last."""
    run: RunDir
    size: int
    prefix: str
    attempt: str
    schema: pa.Schema
    downloaded: frozenset[str]
    scored: frozenset[str]
    ocr_caption: str | None = None   # write.ocr_caption
    buckets: tuple[tuple[int, int], ...] | None = None   # write.buckets
    streams: tuple[str, ...] = ("",)
    recaption: bool = False                      # recaption.enabled: the manifest has the recaption columns
    recaptioned: frozenset[str] = frozenset()    # shards whose recaption result is current
    caption: str = "original"                    # write.caption
    recaption_share: float = 0.5                 # write.recaption_share

    @property
    def grouped(self) -> bool:
        return len(self.streams) > 1

    def stem(self, stream: int, n: int) -> str:
        """Output shard n of a stream without `.tar`: its marker is `_done/shards/{stem}.json`."""
        return f"{self.prefix}-{self.streams[stream]}{n:06d}"

    def name(self, stream: int, n: int) -> str:
        return f"{self.stem(stream, n)}.tar"

    def buckets_of(self, table: pa.Table) -> np.ndarray:
        """Each row's bucket index, from the stored size (-1: unknown size, or bucketing off)."""
        if self.buckets is None:
            return np.full(table.num_rows, -1)
        size = [table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in ("width", "height")]
        return nearest_buckets(*size, list(self.buckets))

    def streams_of(self, bucket: np.ndarray) -> np.ndarray:
        """Each row's stream: its bucket when grouping (unknown sizes last), else the one stream."""
        if not self.grouped:
            return np.zeros(len(bucket), np.int64)
        return np.where(bucket < 0, len(self.streams) - 1, bucket)

    def bucket_column(self, bucket: np.ndarray) -> pa.Array:
        """The `bucket` column ("WxH", null where unknown), without a string per row."""
        if self.buckets is None:
            return pa.nulls(len(bucket), pa.string())
        names = pa.array([bucket_name(w, h) for w, h in self.buckets], pa.string())
        indices = pa.array(np.maximum(bucket, 0).astype(np.int32), mask=bucket < 0)
        return pa.DictionaryArray.from_arrays(indices, names).cast(pa.string())


@dataclass
class Task:
    """A group of input shards: it owns their manifests and, in each stream, the output shards that
    start in them (`spans[stream]` = [first, stop)); `tail` are following shards it reads only to
    complete its last output shards."""
    shards: list[str]
    tail: list[str]
    starts: dict[str, list[int]]   # shard -> per stream, the global index of its first kept row there
    spans: list[tuple[int, int]]
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


def check_recaptions(cfg: Config, run: RunDir, shards: list[str], decided: dict) -> set[str]:
    """The shards whose recaption result is current (made from these decisions under this config); refuse
    when another shard is not, unless its recaption failed (failures.json): its rows then keep the original."""
    from curate.phases.recaption.phase import make_job, up_to_date
    from curate.run.failures import read

    job = make_job(cfg, run, decided["attempt"])
    done = sorted(run.done("recaption") & set(shards))
    current = {s for s, m in zip(done, run.markers("recaption", done)) if up_to_date(job, m)}
    failed = {f["shard"] for f in read(run) if f["phase"] == "recaption"}
    stale = [s for s in shards if s not in current and s not in failed]
    if stale:
        raise DecisionsNotReady(f"{len(stale)} shard(s) have no recaption made from these decisions and settings "
                                f"({run.marker('recaption', stale[0])}{', ...' if len(stale) > 1 else ''}): run "
                                f"`curate recaption` first")
    return current


def plan_tasks(shards: list[str], kept, size: int, rows_per_task: int) -> list[Task]:
    """Groups of consecutive shards with at least max(size, rows_per_task) kept rows (the last may
    have fewer), each owning, per stream, the output shards that start in it.

    `kept` is one count per shard, or a (shards, streams) array of counts. A group's tail holds the
    later shards with rows of the output shards it owns (it skips those without)."""
    kept = np.asarray(kept, np.int64).reshape(len(shards), -1)
    starts = np.vstack([np.zeros((1, kept.shape[1]), np.int64), np.cumsum(kept, axis=0)])
    total = starts[-1]
    rows = np.concatenate([[0], np.cumsum(kept.sum(axis=1))])
    tasks, begin = [], 0
    for i in range(len(shards)):
        if rows[i + 1] - rows[begin] < max(size, rows_per_task) and i < len(shards) - 1:
            continue
        first, stop = -(-starts[begin] // size), -(-starts[i + 1] // size)
        owned = stop > first
        end = np.where(owned, np.minimum(stop * size, total), starts[i + 1])   # where its last owned shard ends
        last = max([i + 1, *(int(np.searchsorted(starts[:, k], end[k], side="left")) for k in np.flatnonzero(owned))])
        later = np.arange(i + 1, min(last, len(shards)))
        needed = later[((starts[later] < end) & (kept[later] > 0)).any(axis=1)] if len(later) else later
        group = list(range(begin, i + 1)) + needed.tolist()
        tasks.append(Task(shards[begin:i + 1], [shards[j] for j in needed],
                          {shards[j]: starts[j].tolist() for j in group},
                          list(zip(first.tolist(), stop.tolist())),
                          kept=int(np.where(owned, end - first * size, 0).sum())))
        begin = i + 1
    return tasks


def count_streams(job: Job, shards: list[str]) -> list[list[int]]:
    """Kept rows per stream of each shard, from its stored sizes and decisions (a small task's work)."""
    out = []
    for shard in shards:
        keep = job.run.storage.read_parquet(job.run.decisions(shard), columns=["keep"]).column("keep")
        keep = pc.fill_null(keep, False).to_numpy(zero_copy_only=False)
        if shard in job.downloaded:
            sizes = job.run.storage.read_parquet(job.run.raw_table(shard), columns=["width", "height"])
            stream = job.streams_of(job.buckets_of(sizes))
        else:
            stream = job.streams_of(np.full(len(keep), -1))
        out.append(np.bincount(stream[keep], minlength=len(job.streams)).tolist())
    return out


def count_remote(job: Job, shards: list[str]) -> list[list[int]]:
    """count_streams over groups of COUNT_SHARDS shards as Ray tasks, in a bounded window."""
    import ray

    remote = ray.remote(num_cpus=0.5)(count_streams)
    job_ref = ray.put(job)
    groups = [shards[i:i + COUNT_SHARDS] for i in range(0, len(shards), COUNT_SHARDS)]
    found: dict[int, list[list[int]]] = {}
    for i, result in windowed(range(len(groups)), lambda i: remote.remote(job_ref, groups[i])):
        if not isinstance(result, list):
            raise RuntimeError(f"write: counting buckets of shards {groups[i][0]}..{groups[i][-1]} failed: {result}")
        found[i] = result
    return [row for i in range(len(groups)) for row in found[i]]


# -- one task ----------------------------------------------------------------------------------

def out_shard_column(job: Job, keep: np.ndarray, stream: np.ndarray, n: np.ndarray) -> pa.Array:
    """The output shard name of every kept row (null for dropped rows), without a string per row."""
    code = np.where(keep, stream * (1 << 40) + n, 0)
    unique, inverse = np.unique(code[keep], return_inverse=True)
    indices = np.zeros(len(keep), np.int32)
    indices[keep] = inverse
    names = pa.array([job.name(int(c >> 40), int(c & ((1 << 40) - 1))) for c in unique.tolist()], pa.string())
    return pa.DictionaryArray.from_arrays(pa.array(indices, mask=~keep), names).cast(pa.string())


def placement(job: Job, keep: np.ndarray, stream: np.ndarray, starts: list[int]) -> np.ndarray:
    """Each row's output shard number within its stream (meaningful for kept rows only)."""
    index = np.zeros(len(keep), np.int64)
    for k in np.unique(stream[keep]):
        rows = keep & (stream == k)
        index[rows] = starts[k] + np.arange(int(rows.sum()))
    return index // job.size


def shard_stats(job: Job, table: pa.Table, keep: np.ndarray, stream: np.ndarray, starts: list[int]) -> dict:
    """The write marker: this shard's counts (kept rows per bucket too), summed by the driver into stats.json."""
    def counts(column: pa.Array) -> dict:
        return {r["values"]: r["counts"] for r in pc.value_counts(column).to_pylist() if r["values"] is not None}

    kept = int(keep.sum())
    per_stream = np.bincount(stream[keep], minlength=len(job.streams))
    started = [job.name(k, n) for k, (s, c) in enumerate(zip(starts, per_stream.tolist()))
               for n in range(-(-s // job.size), -(-(s + c) // job.size))]
    bucket = table.column("bucket").filter(pa.array(keep))
    buckets = {**counts(bucket), **({UNBUCKETED: bucket.null_count} if bucket.null_count else {})}
    info = {"attempt": job.attempt, "rows": table.num_rows, "kept": kept, "first_kept": starts,
            "reasons": counts(table.column("reason")), "status": counts(table.column("status")),
            "buckets": buckets if job.buckets is not None else None, "out_shards": started}
    if job.recaption:   # a few pairs for the card and the report, side by side
        pairs = table.filter(pc.and_(pa.array(keep), pc.is_valid(table.column("recaption"))))
        info["recaption_examples"] = pairs.select([c for c in ("key", "caption_norm", "recaption")
                                                   if c in pairs.column_names]).slice(
            0, EXAMPLES_PER_SHARD).to_pylist()
    return info


def read_group(job: Job, task: Task) -> tuple[dict[tuple[int, int], _Out], dict[str, dict]]:
    """Write the group's manifests; return the samples of its output shards and its shards' markers."""
    run = job.run
    outs = {(k, n): _Out(job.stem(k, n)) for k, (first, stop) in enumerate(task.spans) for n in range(first, stop)}
    first, stop = (np.array(x) for x in zip(*task.spans))
    markers = {}
    own = set(task.shards)
    for shard in task.shards + task.tail:
        table = shard_table(run, shard, shard in job.downloaded, shard in job.scored, job.schema,
                            shard in job.recaptioned)
        keep = pc.fill_null(table.column("keep"), False).to_numpy(zero_copy_only=False)
        if job.recaption and shard not in job.recaptioned:
            table = table.set_column(table.schema.get_field_index("recaption_error"), "recaption_error", pa.array(
                np.where(keep, NOT_RECAPTIONED, None).tolist(), pa.string()))
        bucket = job.buckets_of(table)
        table = table.set_column(table.schema.get_field_index("bucket"), "bucket", job.bucket_column(bucket))
        stream = job.streams_of(bucket)
        n = placement(job, keep, stream, task.starts[shard])
        if shard in own:
            table = table.set_column(table.schema.get_field_index("out_shard"), "out_shard",
                                     out_shard_column(job, keep, stream, n))
            run.storage.write_parquet(table, run.manifest(shard))
            markers[shard] = shard_stats(job, table, keep, stream, task.starts[shard])
        mine = keep & (n >= first[stream]) & (n < stop[stream])
        if not mine.any():
            continue
        rows = np.flatnonzero(mine)
        kept = table.take(pa.array(rows))
        for key, text, meta, k, out in zip(kept.column("key").to_pylist(), captions(kept, job),
                                           sample_json(kept), stream[rows].tolist(), n[rows].tolist()):
            outs[k, out].samples.append((shard, Sample(key, text.encode("utf-8"), meta)))
    return outs, markers


def originals(kept: pa.Table, template: str | None) -> list[str]:
    """The normalised captions, or `write.ocr_caption` filled in where OCR read text."""
    n = kept.num_rows
    txt = kept.column("caption_norm").fill_null("").to_pylist() if "caption_norm" in kept.column_names else [""] * n
    if template is None or "ocr_text" not in kept.column_names:
        return txt
    return [template.format(caption=c, ocr_text=o) if o else c
            for c, o in zip(txt, kept.column("ocr_text").to_pylist())]


def takes_recaption(key: str, share: float) -> bool:
    """write.caption mix: whether a row's .txt is its recaption, by a stable hash of its key (the same on
    every run), true for about `share` of the rows."""
    h = int.from_bytes(hashlib.sha256(f"write.caption:{key}".encode()).digest()[:8], "big")
    return h < share * 2.0 ** 64


def captions(kept: pa.Table, job: Job) -> list[str]:
    """Each sample's .txt as write.caption says: the original (originals), the recaption, or a stable mix;
    a row without a recaption (recaption_error says why) keeps its original."""
    txt = originals(kept, job.ocr_caption)
    if job.caption == "original" or "recaption" not in kept.column_names:
        return txt
    recaptions = kept.column("recaption").to_pylist()
    if job.caption == "recaption":
        return [r or o for r, o in zip(recaptions, txt)]
    return [r if r and takes_recaption(k, job.recaption_share) else o
            for k, r, o in zip(kept.column("key").to_pylist(), recaptions, txt)]


def digest(samples: list[tuple[str, Sample]]) -> str:
    h = hashlib.sha256()
    for _, s in samples:
        h.update(s.key.encode() + b"\0" + s.txt + b"\0" + s.json + b"\0")
    return h.hexdigest()


class BrokenRawTar(ValueError):
    """A raw tar that does not hold what its download recorded: cut short, unreadable, or missing kept
    images. Its shard is downloaded again by the next run."""

    def __init__(self, shard: str, why: str):
        super().__init__(f"raw shard {shard} is broken: {why}; it loses its download marker and is downloaded "
                         f"again by the next `curate run`")
        self.shard = shard


def check_raw_size(run: RunDir, shard: str) -> None:
    """The tar's size against its download marker's: a tar cut between two members reads without error."""
    try:
        expected = run.storage.read_json(run.marker("download", shard)).get("tar_bytes")
    except FileNotFoundError:
        raise BrokenRawTar(shard, "its download marker is gone") from None
    size = run.storage.size(run.raw_tar(shard))
    if expected is not None and size != expected:
        raise BrokenRawTar(shard, f"{run.raw_tar(shard)} holds {size:,} of the {expected:,} bytes downloaded")


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
        try:
            check_raw_size(run, shard)
            with run.storage.open_input(run.raw_tar(shard)) as f:
                for member, data in members(f, left.copy()):
                    out, sample = wanted[shard][member]
                    out.add(run, data, sample)
                    left.discard(member)
        except (FileNotFoundError, ValueError) as exc:   # TruncatedTar and bad headers are ValueErrors
            raise exc if isinstance(exc, BrokenRawTar) else BrokenRawTar(shard, f"{run.raw_tar(shard)}: {exc}") from exc
        if left:
            raise BrokenRawTar(shard, f"{run.raw_tar(shard)} lacks {len(left)} kept image(s): {sorted(left)[:3]}")


def discard_unfinished(run: RunDir, outs: list[_Out]) -> None:
    """Close and delete the output tars a failed task left open: an object store's upload completes when
    its stream is closed, even by the garbage collector, so it is closed here, then deleted."""
    for out in outs:
        if out.stream is not None and out.left:
            out.stream.close()
            run.storage.delete(run.out_shard(f"{out.stem}.tar"))


@dataclass
class Written:
    """A write task's outcome: the write markers of its input shards, or the raw shard that broke it."""
    markers: dict[str, dict] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)   # raw shard -> error


def write_group(job: Job, task: Task) -> Written:
    """One task: manifests, the output shards whose content changed, then the write markers.

    Its shards' write markers go first, so a task that dies leaves them unwritten, never stale. A
    broken raw tar fails the task and takes its shard's markers from download on (the next run
    fetches it again and redoes what was made from it)."""
    run = job.run
    for shard in task.shards:
        run.unmark("write", shard)
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
    try:
        stream_images(run, task.shards + task.tail, todo)
    except BrokenRawTar as exc:
        run.invalidate(exc.shard, "download")
        return Written(broken={exc.shard: str(exc)})
    finally:
        discard_unfinished(run, todo)
    for shard, info in markers.items():
        run.mark("write", shard, info)
    return Written(markers)


# -- the driver --------------------------------------------------------------------------------

OUTPUT_NAME = re.compile(rf"{PREFIX}-(?:\d+x\d+-|{UNBUCKETED}-)?\d{{6,}}")   # an output shard's stem, any prefix


def settle_outputs(run: RunDir, names: list[str]) -> list[str]:
    """Leave shards/ holding the planned output shards that are whole, and nothing a `*.tar` glob would
    load twice; return those shards, in plan order.

    Deleted: output shards outside the plan, whatever their prefix (an older or longer plan's, the
    other layout's, a changed write.prefix's), with their markers, and planned ones without a marker
    (a failed task's half-written tars). A tar not named like an output shard is left, with a warning."""
    planned = {n.removesuffix(".tar") for n in names}
    marked = run.done("shards")
    removed = []
    for name in run.storage.list(run.uri("shards")):
        stem = name.removesuffix(".tar")
        if not name.endswith(".tar") or (stem in planned and stem in marked):
            continue
        if stem in planned or OUTPUT_NAME.fullmatch(stem):
            run.storage.delete(run.out_shard(name))
            removed.append(name)
        else:
            log.warning("write: %s is not an output shard of this run, but the card's `*.tar` loads it",
                        run.out_shard(name))
    for stem in marked - planned:
        run.unmark("shards", stem)
    if removed:
        log.info("write: removed %d output shard(s) outside this plan or half-written, e.g. %s",
                 len(removed), removed[0])
    return [n for n in names if n.removesuffix(".tar") in marked]


@dataclass
class Plan:
    """The driver's view of one write: counts and names, never rows."""
    job: Job
    tasks: list[Task]
    decided: dict
    models: dict
    totals: list[int]   # kept rows per stream

    @property
    def total(self) -> int:
        return sum(self.totals)

    @property
    def names(self) -> list[str]:
        """Every output shard of the plan, stream by stream."""
        return list(self.samples)

    @property
    def samples(self) -> dict[str, int]:
        """Every output shard of the plan, stream by stream, with its sample count (only a stream's last is short)."""
        size = self.job.size
        return {self.job.name(k, n): min(size, t - n * size) for k, t in enumerate(self.totals)
                for n in range(-(-t // size))}


def plan(cfg: Config, shards: list[str],
         count: Callable[[Job, list[str]], list[list[int]]] = count_streams) -> Plan:
    """Check the decisions, fix the manifest schema and cut the work into tasks; with grouping by
    bucket, `count` gives each shard's kept rows per bucket (run_write passes the Ray version)."""
    run = RunDir(cfg.run_dir, Storage(cfg.storage))
    storage = run.storage
    decided, decide_markers = check_decisions(run, shards)
    downloaded, scored = run.done("download"), run.done("score")
    models_uri = run.file("models.json")
    models = storage.read_json(models_uri) if storage.exists(models_uri) else {}
    recaptioned = check_recaptions(cfg, run, shards, decided) if cfg.recaption.enabled else set()
    schema = manifest_schema(run, shards, downloaded, scored, cfg.input.extra_cols,
                             cfg.recaption.enabled).with_metadata(
        {"curate.models": json.dumps(models, ensure_ascii=False)})
    buckets = None if cfg.write.buckets is None else tuple(tuple(b) for b in cfg.write.buckets)
    streams = ("",) if not cfg.write.group_by_bucket else \
        (*(f"{bucket_name(*b)}-" for b in buckets), f"{UNBUCKETED}-")
    job = Job(run, cfg.write.samples_per_shard, cfg.write.prefix, decided["attempt"], schema,
              frozenset(downloaded), frozenset(scored), cfg.write.ocr_caption, buckets, streams,
              cfg.recaption.enabled, frozenset(recaptioned), cfg.write.caption, cfg.write.recaption_share)
    kept = np.array([m["kept"] for m in decide_markers], np.int64).reshape(-1, 1)
    if job.grouped:
        per_stream = np.array(count(job, shards), np.int64).reshape(len(shards), len(streams))
        wrong = np.flatnonzero(per_stream.sum(axis=1) != kept[:, 0])
        if len(wrong):
            raise DecisionsNotReady(f"{run.decisions(shards[wrong[0]])}: kept rows differ from its decide marker's "
                                    f"count: run `curate decide` again")
        kept = per_stream
    return Plan(job, plan_tasks(shards, kept, job.size, ROWS_PER_TASK), decided, models, kept.sum(axis=0).tolist())


def run_write(cfg: Config, shards: list[str]) -> dict:
    """Write the changed output shards, the manifest and the card; write and return stats.json's content.

    A task that fails records its input shards as `write` failures (and a broken raw tar its own
    shard) in failures.json, without stopping the others; stats.json and the card count only
    what was written, and say what was not.
    """
    import ray

    p = plan(cfg, shards, count_remote)
    run = p.job.run
    progress = Progress("write", p.total)
    remote = ray.remote(num_cpus=1)(write_group)
    job_ref = ray.put(p.job)
    per_shard: dict[str, dict] = {}
    errors: list[dict] = []
    for i, result in windowed(range(len(p.tasks)), lambda i: remote.remote(job_ref, p.tasks[i])):
        task = p.tasks[i]
        if not isinstance(result, Written):   # it raised, after Ray's retries, maybe before unmarking
            log.error("write: shards %s..%s failed: %s", task.shards[0], task.shards[-1], result)
            for shard in task.shards:
                run.unmark("write", shard)
            errors.extend(failure("write", s, result) for s in task.shards)
        elif result.broken:
            for shard, error in result.broken.items():
                log.error("write: %s", error)
                errors.append(failure("write", shard, error))
            why = f"not written: raw shard {', '.join(sorted(result.broken))} is broken"
            errors.extend(failure("write", s, why) for s in task.shards if s not in result.broken)
        else:
            per_shard.update(result.markers)
            progress.add(task.kept)
    progress.finish()
    return finish(cfg, p, per_shard, errors)


def finish(cfg: Config, p: Plan, per_shard: dict[str, dict], errors: list[dict]) -> dict:
    """Settle shards/ (settle_outputs), record the failures, then write stats.json and the card from the
    shards' markers (the funnel and buckets from the write markers; error kinds, waits and top hosts
    from the download markers)."""
    run = p.job.run
    names = settle_outputs(run, p.names)
    samples = p.samples
    stats = aggregate(per_shard, p.job)
    stats["download"] = download_summary(run, sorted(p.job.downloaded & run.done("download")))
    stats["before_download"] = spared(run.storage.read_json(run.plan), stats["download"])
    stats.update(shards={"count": len(names), "samples": sum(samples[n] for n in names), "names": names},
                 failures=record(run, errors, skip=skipped(cfg)), models=p.models, styles=p.decided.get("styles"),
                 thresholds=p.decided.get("thresholds") or {})
    if len(names) < len(samples):
        stats["shards"]["not_written"] = [n for n in samples if n not in set(names)]
    if p.job.recaption:
        from curate.phases.recaption.phase import summary

        examples = [e for s in sorted(per_shard) for e in per_shard[s].get("recaption_examples", [])]
        stats["recaption"] = {**summary(run, list(per_shard)), "caption": cfg.write.caption,
                              "recaption_share": cfg.write.recaption_share, "examples": examples[:EXAMPLES]}
    run.storage.write_json(run.stats, stats)
    write_card(run, cfg, stats)
    return stats


def aggregate(markers: dict[str, dict], job: Job) -> dict:
    """stats.json's funnel, download counts and kept rows per bucket, summed from the write markers (O(shards))."""
    status: dict[str, int] = {}
    buckets: dict[str, int] = {bucket_name(*b): 0 for b in job.buckets or ()}
    for info in markers.values():
        for into, counts in ((status, info["status"]), (buckets, info.get("buckets") or {})):
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
    return {"funnel": Funnel.total(markers).to_dict(),
            "download_status": status,
            "buckets": buckets if job.buckets is not None else None,
            "columns": {c: ALL[c].doc for c in job.schema.names if c in ALL}}
