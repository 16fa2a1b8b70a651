"""Resume and faults on a local run directory: a killed driver, a killed Ray worker, a bad or
truncated shard, an exception in one shard, a second run on a busy directory, a changed input,
a re-score. Each loses nothing and ends with exactly the uninterrupted run's result.

Only what is about a process runs in one: the drivers killed with SIGKILL and the live run that
holds the lease are `python -m jobs.curate run CONFIG` subprocesses with their own embedded Ray
(tests/resume.py has the corpus, the kill points and the snapshot). Everything else, the re-runs
after a kill included, runs the phases in this process on the session's Ray (or the CLI through
typer's CliRunner), starting from a copy of the reference run's files where it can.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curate.config import ConfigError, load
from curate.demo_corpus import generate
from curate.rundir import RunBusy, RunDir
from tests import resume
from tests.procs import Driver, cmdline, descendants
from tests.resume import N, SHARDS
from tests.servers import serve

# Every test here needs the module's reference run (a full run of N rows) or a driver subprocess.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> str:
    """The input URL manifest; the server behind it lives as long as this module's tests."""
    folder = tmp_path_factory.mktemp("faults_corpus")
    samples = generate(folder / "images", n=N, seed=3)
    with serve(folder / "images", delay=0.1) as srv:
        path = str(folder / "urls.parquet")
        resume.write_urls(path, srv.base, samples)
        yield path


def config(run: Path, urls: str, **sections) -> Path:
    """The faults config for a run folder, beside it; `sections` are merged over it (e.g. score={...})."""
    path = resume.config(str(run), urls, run.parent / f"{run.name}.yaml")
    if sections:
        data = yaml.safe_load(path.read_text())
        for name, values in sections.items():
            data[name] = {**data.get(name, {}), **values}
        path.write_text(yaml.safe_dump(data))
    return path


def run_here(cfg_path: Path, phases: tuple[str, ...] = ("download", "score", "decide", "write")):
    """The same phases as `curate run`, in this process on the session's Ray (no start-up cost)."""
    from curate.pipeline import run_phases

    return run_phases(load(cfg_path), phases)


def cli_here(args: list[str]) -> tuple[int, str]:
    """`curate ARGS` through the typer app in this process (on the session's Ray): exit code, output."""
    from typer.testing import CliRunner

    from curate.cli import app

    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def reference(urls, tmp_path_factory, ray_session) -> dict:
    """One uninterrupted run, the result every interrupted run must reproduce exactly."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    outcome = run_here(config(run, urls))
    assert outcome.ok, outcome.failures
    snap = resume.snapshot(str(run))
    resume.check_reference(snap)
    return {"run": run, "snapshot": snap}


def copy_downloaded(reference: dict, run: Path) -> None:
    """Start from the reference's downloaded shards: the fault under test comes later."""
    for part in ("input_shards", "raw", "_done/download"):
        shutil.copytree(reference["run"] / part, run / part)


@pytest.mark.timeout(1200)   # four driver processes, each killed in its phase, then a re-run
def test_driver_killed_in_every_phase_resumes_to_the_same_result(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, urls)
    resume.kill_in_every_phase(str(run), cfg, tmp_path / "driver.log")
    outcome = run_here(cfg)   # the re-run needs no process of its own: the killed ones were the test
    assert outcome.ok, outcome.failures
    assert resume.snapshot(str(run)) == reference["snapshot"]
    # The killed attempts' leftovers are gone: score parts of shards that were being scored.
    assert not [k for k in resume.objects(str(run)) if k.startswith("scores/_parts/")]


def test_a_second_run_on_a_run_directory_in_use_is_refused(urls, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, urls)
    first = Driver(["run", str(cfg)], tmp_path / "driver.log")
    try:
        resume.poll_until(first, lambda: (run / "_lease.json").exists())
        with pytest.raises(RunBusy, match=rf"{run} is in use by another run \(.*:{first.proc.pid}:"):
            run_here(cfg)
        assert first.proc.poll() is None   # the refused run left the live one alone
    finally:
        first.kill()


def test_a_killed_ray_worker_during_score_loses_no_row(urls, reference, tmp_path):
    """The run goes on in this process, on the session's Ray, while the test SIGKILLs one of that
    Ray's workers (a descendant of this process) in the middle of a scoring task."""
    run = tmp_path / "run"
    cfg = config(run, urls)
    copy_downloaded(reference, run)   # the fault is in score: start from the downloaded shards
    killed = []

    def scoring_worker_killed() -> bool:
        for pid in descendants(os.getpid()):
            if "score_cpu" in cmdline(pid):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return True
        return False

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_here, cfg)
        deadline = time.time() + 240
        while not scoring_worker_killed():
            assert not running.done(), f"the run ended before a scoring worker was seen: {running.result()}"
            assert time.time() < deadline, "no scoring worker was ever seen"
            time.sleep(0.01)
        outcome = running.result(timeout=280)
    assert killed
    assert outcome.ok, outcome.failures
    assert resume.snapshot(str(run)) == reference["snapshot"]


def test_finishing_a_scored_shard_again_is_a_success(reference, tmp_path):
    """Ray re-runs a finished merge task whose result died with its node: the re-run finds the
    marker and reports done, where it once reported "0 of N rows" and failed the shard."""
    from curate.score import finish_shard

    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    rd = RunDir(run)
    shard = rd.shard_names()[0]
    scores = run / "scores" / f"{shard}.parquet"
    before = scores.read_bytes()
    rows = rd.markers("download", [shard])[0]["rows"]
    assert finish_shard(rd, shard, rows) is None
    assert scores.read_bytes() == before
    rd.unmark("score", shard)
    assert finish_shard(rd, shard, rows) == f"scoring returned 0 of {rows} rows"


def assert_failed_alone(run: Path, shard: str, error: str) -> None:
    """One score failure, recorded in failures.json; that shard's rows are `shard_failed`, the rest are not."""
    failures = resume.failures(str(run))
    assert [(f["phase"], f["shard"]) for f in failures] == [("score", shard)], failures
    assert error in failures[0]["error"], failures[0]["error"]
    manifest = pa.concat_tables([pq.read_table(p) for p in sorted((run / "manifest").glob("*.parquet"))]).to_pandas()
    assert len(manifest) == N
    assert (manifest[manifest.shard == shard].reason == "shard_failed").all()
    assert not (manifest[manifest.shard != shard].reason == "shard_failed").any()
    assert RunDir(run).done("score") == set(RunDir(run).shard_names()) - {shard}


def test_an_unreadable_raw_shard_fails_alone_and_is_retried_alone(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, urls)
    copy_downloaded(reference, run)
    bad = run / "raw" / "00003.tar"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"this is not a tar archive\n" * 64)

    code, out = cli_here(["run", str(cfg)])
    assert code == 1, out[-4000:]
    assert "score shard 00003" in out and "unreadable" in out
    assert_failed_alone(run, "00003", "unreadable")
    scored = {p: p.stat().st_mtime_ns for p in (run / "scores").glob("*.parquet")}
    assert len(scored) == SHARDS - 1

    bad.write_bytes(good_bytes)
    assert run_here(cfg).ok
    assert {p: p.stat().st_mtime_ns for p in scored} == scored  # only 00003 was scored again
    assert resume.failures(str(run)) == []
    assert resume.snapshot(str(run)) == reference["snapshot"]


def member_boundary(tar_path: Path) -> int:
    """The byte offset where the middle member of a tar starts: cutting there leaves a tar that
    reads back without error, only shorter."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    assert len(members) >= 2
    return members[len(members) // 2].offset


def test_a_raw_tar_cut_between_two_members_is_a_shard_failure_then_downloaded_again(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, urls)
    copy_downloaded(reference, run)
    tar = run / "raw" / "00005.tar"
    cut = tar.read_bytes()[:member_boundary(tar)]
    with tarfile.open(fileobj=io.BytesIO(cut)) as short:   # no error: only the size tells
        assert 0 < len(short.getmembers()) < len(tarfile.open(tar).getmembers())
    tar.write_bytes(cut)

    outcome = run_here(cfg)
    assert [(f["phase"], f["shard"]) for f in outcome.failures] == [("score", "00005")]
    assert_failed_alone(run, "00005", "truncated")
    assert "00005" not in RunDir(run).done("download")   # so the next run downloads it again

    outcome = run_here(cfg)
    assert outcome.ok, outcome.failures
    assert resume.failures(str(run)) == []
    assert resume.snapshot(str(run)) == reference["snapshot"]


def test_an_exception_in_one_shards_scoring_fails_that_shard_not_the_run(urls, reference, tmp_path):
    run = tmp_path / "run"
    cfg = config(run, urls)
    copy_downloaded(reference, run)
    raw = run / "raw" / "00004.parquet"
    good = raw.read_bytes()
    table = pq.read_table(raw)
    widths = pa.array(["wide"] * table.num_rows)   # the CPU stage's float conversion raises on these
    pq.write_table(table.set_column(table.schema.get_field_index("original_width"), "original_width", widths), raw)

    outcome = run_here(cfg, ("download", "score"))
    assert [(f["phase"], f["shard"]) for f in outcome.failures] == [("score", "00004")]
    assert "CPU scoring failed: ValueError" in outcome.failures[0]["error"]
    assert RunDir(run).done("score") == set(RunDir(run).shard_names()) - {"00004"}

    raw.write_bytes(good)
    assert run_here(cfg).ok
    assert resume.snapshot(str(run)) == reference["snapshot"]


def test_a_changed_input_against_an_existing_plan_is_refused_and_not_recorded(urls, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    recorded = yaml.safe_load((run / "config.yaml").read_text())["input"]
    other = tmp_path / "other.parquet"
    shutil.copy(urls, other)
    for changed, expect in (({"shard_rows": 20}, "input.shard_rows: planned with 16, now 20"),
                            ({"paths": [str(other)]}, f"input.paths: planned with ['{urls}'], now ['{other}']")):
        with pytest.raises(ConfigError, match=r"(?s)" + re.escape(expect) + ".*new run"):
            run_here(config(run, urls, input=changed))
        assert yaml.safe_load((run / "config.yaml").read_text())["input"] == recorded, \
            "config.yaml records the refused input"


def test_decide_after_a_rescore_is_not_up_to_date(urls, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    rundir = RunDir(run)
    before = rundir.storage.read_json(rundir.decided)
    cfg = config(run, urls)
    run_here(cfg, ("decide",))
    assert rundir.storage.read_json(rundir.decided)["attempt"] == before["attempt"]   # same scores: up to date

    rundir.unmark("score", "00002")
    (run / "scores" / "00002.parquet").unlink()
    rescored = config(run, urls, score={"decode_size": 128})
    outcome = run_here(rescored, ("score", "decide", "write"))
    assert outcome.ok, outcome.failures
    after = rundir.storage.read_json(rundir.decided)
    assert after["attempt"] != before["attempt"] and after["fingerprint"] != before["fingerprint"]
    assert {m["attempt"] for m in rundir.markers("decide", rundir.shard_names())} == {after["attempt"]}
