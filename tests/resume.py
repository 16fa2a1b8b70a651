"""Resume after SIGKILL, for any run directory URI (a local path or s3://): the shared half of
tests/curate/test_faults.py (local) and tests/curate/run/test_s3.py (object storage).

A small corpus (N rows in SHARDS input shards of SHARD_ROWS) is served from 127.0.0.1 with a
delay per image, so download lasts long enough to be interrupted; small output shards give
write several units of work. Everything is read back through the storage module, so one
snapshot compares a local run with a local run and an S3 run with an S3 run.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from curate.run.rundir import RunDir
from curate.run.storage import Storage
from tests.procs import Driver

N, SHARD_ROWS, SHARDS = 160, 16, 10
# Files whose content legitimately differs between two runs of the same input.
VOLATILE = {"timings.json", "report.html", "_lease.json"}


def write_urls(uri: str, base: str, samples) -> None:
    """The input URL manifest (with an extra column) at a URI, pointing at the served corpus."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"url": [f"{base}/slow/{s.name}" for s in samples],
                             "caption": [s.caption for s in samples],
                             "kind": [s.kind for s in samples]}), buf)
    Storage().write_bytes(uri, buf.getvalue())


def config(run_dir: str, urls: str, path: Path) -> Path:
    """A config file at `path`: small shards everywhere, so every phase has several units of work."""
    cfg = {"run_dir": run_dir,
           "input": {"paths": [urls], "extra_cols": ["kind"], "shard_rows": SHARD_ROWS},
           "download": {"thread_count": 4, "timeout": 20, "allow_networks": ["127.0.0.1/32"]},
           "score": {"batch_size": 8},
           "write": {"samples_per_shard": 10, "prefix": "f"},
           "ray": {"num_cpus": 2}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def objects(root: str) -> dict[str, int]:
    """Every file under a run directory URI, by path relative to it, with its size."""
    fs, base = Storage().resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _rows(table: pa.Table) -> list[dict]:
    nan_free = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731 (NaN != NaN)
    return [{k: nan_free(v) for k, v in r.items()} for r in table.sort_by("key").to_pylist()]


def members(tar_bytes: bytes) -> list[tuple[str, bytes]]:
    """A tar's members and their bytes, by name: an output shard's members follow its raw tars'
    order, which is the order downloads happened to finish in, so two runs differ there only."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return sorted((m.name, tar.extractfile(m).read()) for m in tar)


def snapshot(root: str) -> dict:
    """Everything a consumer reads, by content: the object listing, each output shard's members,
    the dataset card (less the run's own path), the decisions and the manifest dataset's rows,
    stats.json (less its timings)."""
    run = RunDir(root)
    storage = run.storage
    listing = sorted(k for k in objects(root) if k.rsplit("/", 1)[-1] not in VOLATILE)
    stats = storage.read_json(run.stats)
    stats.pop("timings", None)
    return {"objects": listing,
            "shards": {k: members(storage.read_bytes(run.uri(k))) for k in listing
                       if k.startswith("shards/") and k.endswith(".tar")},
            "card": storage.read_text(run.uri("shards", "README.md")).replace(run.root, "RUN"),
            "decisions": {k: _rows(storage.read_parquet(run.uri(k)))
                          for k in listing if re.fullmatch(r"decisions/\d+\.parquet", k)},
            "manifest": _rows(pa.concat_tables([storage.read_parquet(run.manifest(s)) for s in run.shard_names()])),
            "stats": stats}


def check_reference(snap: dict) -> None:
    """An uninterrupted run accounts for every input row, and its shards hold exactly the kept rows."""
    assert len(snap["manifest"]) == N
    assert sum(k.startswith("scores/") and k.endswith(".parquet") for k in snap["objects"]) == SHARDS
    kept = {r["key"] for r in snap["manifest"] if r["keep"]}
    in_shards = {name.rsplit(".", 1)[0] for found in snap["shards"].values() for name, _ in found}
    assert kept and kept == in_shards


def done(root: str, phase: str) -> int:
    return len(RunDir(root).done(phase))


def exists(root: str, name: str) -> bool:
    run = RunDir(root)
    return run.storage.exists(run.uri(name))


def kill_points(root: str, log: Path) -> dict[str, tuple[Callable[[], bool], Callable[[], bool]]]:
    """Per phase: when to SIGKILL the driver, and what must still be unfinished after the kill
    (proof that it landed inside that phase)."""
    def said(pattern: str) -> bool:
        return bool(re.search(pattern, log.read_text(errors="replace")))

    # A phase's closing line is the driver's last word before the next phase starts. Write runs
    # as one task at this size (milliseconds), so its kill lands when decide has just closed.
    def scored_then_deciding() -> bool:
        return said(r"score: (\d+ shards in|all \d+ shards already scored)")

    def decided_then_writing() -> bool:
        return said(r"decide: \d+ rows, \d+ kept") or done(root, "shards") >= 1

    return {
        "download": (lambda: done(root, "download") >= 1, lambda: done(root, "download") < SHARDS),
        "score": (lambda: done(root, "score") >= 1, lambda: done(root, "score") < SHARDS),
        "decide": (scored_then_deciding, lambda: not exists(root, "decisions/_decided.json")),
        "write": (decided_then_writing, lambda: done(root, "write") < SHARDS),
    }


def left_lease(root: str, pid: int) -> bool:
    """Whether a killed driver left its lease behind (valid until it expires): the next run must take it over."""
    run = RunDir(root)
    lease = run.uri("_lease.json")
    return run.storage.exists(lease) and run.storage.read_json(lease)["pid"] == pid


TAKEOVER = "which is gone: taking it over"   # the lease's log line when its holder died on this host


def kill_in_every_phase(root: str, cfg: Path, log: Path, **driver) -> None:
    """Start `curate run CFG` and SIGKILL it once inside each phase, in order (`driver`: Driver's options).

    Each start follows the last kill at once: it must take over the dead driver's lease (and say so)."""
    dead = None
    for phase, (when, unfinished) in kill_points(root, log).items():
        log.write_text("")   # the decide kill point reads this attempt's lines only
        proc = Driver(["run", str(cfg)], log, **driver)
        proc.kill_when(when, poll=0.01)
        assert unfinished(), f"the kill meant for {phase} landed after it had finished"
        assert dead is None or TAKEOVER in proc.output(), f"the {phase} attempt did not say it took the lease over"
        dead = proc.proc.pid
        assert left_lease(root, dead)


def poll_until(driver: Driver, found: Callable[[], bool], timeout: float = 240) -> None:
    """Call `found()` until it holds while the driver runs; fail if the driver ends first."""
    deadline = time.time() + timeout
    while not found():
        assert driver.proc.poll() is None, f"driver ended first:\n{driver.output()[-4000:]}"
        assert time.time() < deadline, "never found"
        time.sleep(0.01)


def failures(root: str) -> list[dict]:
    run = RunDir(root)
    return json.loads(run.storage.read_text(run.file("failures.json")))
