"""Resume and faults: a killed driver, a killed Ray worker and an unreadable shard lose nothing.

Each run is `python -m jobs.curate run CONFIG` in a subprocess with its own embedded Ray, on
a small demo corpus (N rows in shards of SHARD_ROWS) served from 127.0.0.1 with a small
delay per image, so the download phase lasts long enough to be interrupted. Results are
compared by content with one uninterrupted reference run.
"""
from __future__ import annotations

import json
import os
import signal
import shutil
import tarfile
import time
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curate.demo_corpus import generate
from tests.procs import Driver, cmdline, run_cli
from tests.servers import serve

N, SHARD_ROWS, SHARDS = 160, 16, 10


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> Path:
    """The input URL manifest; the server behind it lives as long as this module's tests."""
    folder = tmp_path_factory.mktemp("faults_corpus")
    samples = generate(folder / "images", n=N, seed=3)
    with serve(folder / "images", delay=0.1) as srv:
        path = folder / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{srv.base}/slow/{s.name}" for s in samples],
                                 "caption": [s.caption for s in samples],
                                 "kind": [s.kind for s in samples]}), path)
        yield path


def config(run_dir: Path, urls: Path) -> Path:
    """Small shards everywhere, so every phase has several units of work to be interrupted in."""
    cfg = {"run_dir": str(run_dir),
           "input": {"paths": [str(urls)], "extra_cols": ["kind"], "shard_rows": SHARD_ROWS},
           "download": {"thread_count": 4, "timeout": 20, "allow_networks": ["127.0.0.1/32"]},
           "score": {"batch_size": 8},
           "write": {"samples_per_shard": 10, "prefix": "f"},
           "ray": {"num_cpus": 2}}
    run_dir.mkdir(parents=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(run: Path) -> dict:
    """Everything a consumer reads, by content: manifest and decision rows, shard members' bytes."""
    def rows(path: Path) -> list[dict]:
        nan_free = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731 (NaN != NaN)
        return [{k: nan_free(v) for k, v in r.items()} for r in pq.read_table(path).sort_by("key").to_pylist()]

    shards = {}
    for tar_path in sorted((run / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            shards[tar_path.name] = [(m.name, tar.extractfile(m).read()) for m in tar]
    return {"manifest": rows(run / "manifest.parquet"),
            "decisions": {p.name: rows(p) for p in sorted((run / "decisions").glob("*.parquet"))},
            "shards": shards}


def count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


def run_here(cfg_path: Path):
    """The same phases as `curate run`, in this process on the session's Ray (no start-up cost)."""
    from curate.config import load
    from curate.pipeline import run_phases

    return run_phases(load(cfg_path))


@pytest.fixture(scope="module")
def reference(urls, tmp_path_factory, ray_session) -> dict:
    """One uninterrupted run, the result every interrupted run must reproduce exactly."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    outcome = run_here(config(run, urls))
    assert outcome.ok, outcome.failures
    snap = snapshot(run)
    assert len(snap["manifest"]) == N and count(run / "scores", "*.parquet") == SHARDS
    kept = {r["key"] for r in snap["manifest"] if r["keep"]}
    assert kept and kept == {name.rsplit(".", 1)[0] for members in snap["shards"].values() for name, _ in members}
    return {"run": run, "snapshot": snap}


def test_driver_killed_in_download_score_and_write_resumes_to_the_same_result(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = str(config(run, urls))
    log = tmp_path / "driver.log"
    kill_points = {
        "download": lambda: count(run / "raw", "*.parquet") >= 1,
        "score": lambda: count(run / "scores", "*.parquet") >= 1,
        "write": lambda: count(run / "shards", "*.tar") >= 1,
    }
    for phase, condition in kill_points.items():
        Driver(["run", cfg], log).kill_when(condition)
        # The kill landed inside the phase: its outputs are incomplete.
        assert {"download": count(run / "raw", "*.parquet") < SHARDS,
                "score": count(run / "scores", "*.parquet") < SHARDS,
                "write": not (run / "manifest.parquet").exists()}[phase], f"{phase} had already finished"
    code, out = run_cli(["run", cfg], log)
    assert code == 0, out[-4000:]
    assert snapshot(run) == reference["snapshot"]
    # The killed attempts' scratch space is gone: download work folders, unfinished shards.
    assert not list((run / "raw").glob(".work-*")) and not list((run / "shards").glob(".*.tmp"))


def poll_until(driver: Driver, found: Callable[[], bool], timeout: float = 240) -> None:
    """Call `found()` until it holds while the driver runs; fail if the driver ends first."""
    deadline = time.time() + timeout
    while not found():
        assert driver.proc.poll() is None, f"driver ended first:\n{driver.output()[-4000:]}"
        assert time.time() < deadline, "never found"
        time.sleep(0.01)


def test_a_killed_ray_worker_during_score_loses_no_row(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = str(config(run, urls))
    driver = Driver(["run", cfg], tmp_path / "driver.log")
    killed = []
    try:
        def scoring_worker_killed() -> bool:
            for pid in driver.descendants():
                if "score_cpu" in cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return True
            return False

        poll_until(driver, scoring_worker_killed)
        code = driver.wait()
    finally:
        if driver.proc.poll() is None:
            driver.kill()
    assert killed
    assert code == 0, driver.output()[-4000:]
    assert snapshot(run) == reference["snapshot"]


def test_an_unreadable_raw_shard_fails_alone_and_is_retried_alone(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = str(config(run, urls))
    for part in ("input_shards", "raw"):  # start from downloaded shards: the fault is in score
        shutil.copytree(reference["run"] / part, run / part)
    bad = run / "raw" / "00003.tar"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"this is not a tar archive\n" * 64)
    log = tmp_path / "driver.log"

    code, out = run_cli(["run", cfg], log)
    assert code == 1, out[-4000:]
    assert "score shard 00003" in out and "unreadable" in out
    failures = json.loads((run / "failures.json").read_text())
    assert [(f["phase"], f["shard"]) for f in failures] == [("score", "00003")]
    assert "unreadable" in failures[0]["error"]
    manifest = pq.read_table(run / "manifest.parquet").to_pandas()
    assert len(manifest) == N
    assert (manifest[manifest.shard == "00003"].reason == "shard_failed").all()
    assert not (manifest[manifest.shard != "00003"].reason == "shard_failed").any()
    scored = {p: p.stat().st_mtime_ns for p in (run / "scores").glob("*.parquet")}
    assert len(scored) == SHARDS - 1

    bad.write_bytes(good_bytes)
    assert run_here(Path(cfg)).ok
    assert {p: p.stat().st_mtime_ns for p in scored} == scored  # only 00003 was scored again
    assert json.loads((run / "failures.json").read_text()) == []
    assert snapshot(run) == reference["snapshot"]
