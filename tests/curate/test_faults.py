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
import json
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
from curate.demo.corpus import generate
from curate.run.rundir import Lease, RunBusy, RunDir
from tests import resume
from tests.procs import Driver, cmdline, descendants
from tests.resume import SHARDS, N
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


@pytest.mark.slow
@pytest.mark.timeout(1200)   # four driver processes, each killed in its phase, then a re-run
def test_driver_killed_in_every_phase_resumes_to_the_same_result(urls, reference, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = config(run, urls)
    resume.kill_in_every_phase(str(run), cfg, tmp_path / "driver.log")
    with caplog.at_level("WARNING", logger="curate"):   # the re-run needs no process of its own
        outcome = run_here(cfg)
    assert outcome.ok, outcome.failures
    assert resume.TAKEOVER in caplog.text
    assert resume.snapshot(str(run)) == reference["snapshot"]
    # The killed attempts' leftovers are gone: score parts of shards that were being scored.
    assert not [k for k in resume.objects(str(run)) if k.startswith("scores/_parts/")]


@pytest.mark.slow
def test_kill_9_during_score_then_an_immediate_rerun_resumes_to_the_same_result(urls, reference, tmp_path, caplog):
    """The killed driver's lease is still valid; its holder is a dead process on this host, so the
    re-run takes it over at once (and logs it) instead of waiting for it to expire."""
    run = tmp_path / "run"
    cfg = config(run, urls)
    copy_downloaded(reference, run)   # straight into score
    driver = Driver(["run", str(cfg)], tmp_path / "driver.log")
    driver.kill_when(lambda: resume.done(str(run), "score") >= 1, poll=0.01)
    assert resume.done(str(run), "score") < SHARDS and resume.left_lease(str(run), driver.proc.pid)
    with caplog.at_level("WARNING", logger="curate"):
        outcome = run_here(cfg)
    assert outcome.ok, outcome.failures
    assert f"held by process {driver.proc.pid} on this host" in caplog.text and resume.TAKEOVER in caplog.text
    assert resume.snapshot(str(run)) == reference["snapshot"]


def lease_of(run: RunDir, **holder) -> Lease:
    """A lease written as another holder would have written it, valid for a minute."""
    lease = Lease(run)
    lease.owner = f"{holder.get('host', lease.holder['host'])}:{holder.get('pid', 1)}:other"
    lease.holder = {**lease.holder, **holder}
    lease._write()
    return lease


def test_a_lease_of_a_dead_process_here_is_taken_over_and_one_from_elsewhere_waits(tmp_path, caplog):
    import subprocess
    import sys

    from curate.run.rundir import process_started

    run = RunDir(tmp_path / "run")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease_of(run, pid=gone.pid, started="12345")
    with caplog.at_level("WARNING", logger="curate"), Lease(run):
        assert f"held by process {gone.pid} on this host" in caplog.text

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease_of(run, pid=alive.pid, started=process_started(alive.pid))
        with pytest.raises(RunBusy, match=rf"in use by another run \(.*:{alive.pid}:other"):
            Lease(run).acquire()
        lease_of(run, pid=alive.pid, started="1")   # the pid now belongs to a later process
        with Lease(run):
            pass
        lease_of(run, host="another-host", pid=gone.pid)   # nobody here can tell whether it lives
        with pytest.raises(RunBusy, match="another-host"):
            Lease(run).acquire()
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.slow
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


@pytest.mark.slow
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
    from curate.phases.score.phase import finish_shard
    from curate.phases.score.provenance import Work

    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    rd = RunDir(run)
    shard = rd.shard_names()[0]
    scores = run / "scores" / f"{shard}.parquet"
    before = scores.read_bytes()
    rows = rd.markers("download", [shard])[0]["rows"]
    work = Work(frozenset({"image", "caption"}), frozenset(), False, "")
    assert finish_shard(rd, shard, rows, work, {}) is None
    assert scores.read_bytes() == before
    rd.unmark("score", shard)
    assert finish_shard(rd, shard, rows, work, {}) == f"scoring returned 0 of {rows} rows"


def assert_failed_alone(run: Path, shard: str, error: str) -> None:
    """One score failure, recorded in failures.json; that shard's rows are `shard_failed`, the rest are not."""
    failures = resume.failures(str(run))
    assert [(f["phase"], f["shard"]) for f in failures] == [("score", shard)], failures
    assert error in failures[0]["error"], failures[0]["error"]
    manifest = pa.concat_tables([pq.read_table(p) for p in sorted((run / "manifest").glob("*.parquet"))]).to_pandas()
    assert len(manifest) == N
    # the caption rules come first in the rules table (they can run before download): their rows keep
    # their own reason; every other row of the failed shard is shard_failed
    from manifests.rules import RULES

    captions = {r.reason for r in RULES if r.when == "input"}
    rest = manifest[(manifest.shard == shard) & ~manifest.reason.isin(captions)]
    assert len(rest) and (rest.reason == "shard_failed").all()
    assert not (manifest[manifest.shard != shard].reason == "shard_failed").any()
    assert RunDir(run).done("score") == set(RunDir(run).shard_names()) - {shard}


@pytest.mark.slow
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


def decided_not_written(reference: dict, run: Path) -> None:
    """The reference run as it stood after decide: everything but write's outputs."""
    shutil.copytree(reference["run"], run)
    for folder in ("shards", "manifest", "_done/write", "_done/shards"):
        shutil.rmtree(run / folder)
    for name in ("stats.json", "report.html"):
        (run / name).unlink()


@pytest.mark.slow
def test_a_raw_tar_cut_after_decide_fails_write_naming_it_and_the_next_run_repairs_it(urls, reference, tmp_path):
    from typer.testing import CliRunner

    from curate.cli import app

    run = tmp_path / "run"
    cfg = config(run, urls)
    decided_not_written(reference, run)
    tar = run / "raw" / "00005.tar"
    tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 2])

    result = CliRunner().invoke(app, ["write", str(cfg)])
    assert result.exit_code == 1, result.output
    assert "failed: write shard 00005: raw shard 00005 is broken" in result.output
    failures = resume.failures(str(run))
    assert ("write", "00005") in [(f["phase"], f["shard"]) for f in failures]
    assert json.loads((run / "stats.json").read_text())["failures"] == failures
    assert "00005" not in RunDir(run).done("download")
    card = (run / "shards" / "README.md").read_text(encoding="utf-8")
    assert "**Incomplete:" in card and "`00005`" in card

    outcome = run_here(cfg)
    assert outcome.ok, outcome.failures
    assert resume.failures(str(run)) == []
    assert resume.snapshot(str(run)) == reference["snapshot"]


def test_a_no_op_rerun_keeps_each_phases_timing_and_the_report_says_so(urls, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    before = json.loads((run / "timings.json").read_text())
    assert {p: t["rows"] for p, t in before.items()} == {p: N for p in ("download", "score", "decide", "write")}
    assert run_here(config(run, urls)).ok
    after = json.loads((run / "timings.json").read_text())
    assert {p: after[p] for p in ("download", "score", "decide")} == {p: before[p] for p in ("download", "score",
                                                                                             "decide")}
    assert json.loads((run / "stats.json").read_text())["timings"] == after
    html = (run / "report.html").read_text(encoding="utf-8")
    shown = dict(re.findall(r"<tr><td>(\w+)</td><td class=\"num\">[\d,.]+</td><td class=\"num\">([\d,]+)</td>",
                            html.split('id="timings"')[1].split("</table>")[0]))
    assert shown == {p: f"{N:,}" for p in ("download", "score", "decide", "write")}


def test_a_failed_decide_fails_the_run_as_a_phase_until_decide_completes(urls, reference, tmp_path):
    """decide is global (duplicates span shards): a task of it that fails fails the phase, recorded with
    shard null; write does not run on half-made decisions; the entry goes when decide next completes."""
    run = tmp_path / "run"
    shutil.copytree(reference["run"], run)
    scores = run / "scores" / "00002.parquet"
    good = scores.read_bytes()
    scores.write_bytes(b"not a parquet file\n" * 64)
    stats = (run / "stats.json").read_text()
    stricter = config(run, urls, filters={"min_side": 300})   # new settings: decide must run again
    outcome = run_here(stricter)
    assert [(f["phase"], f["shard"]) for f in outcome.failures] == [("decide", None)]
    assert resume.failures(str(run)) == outcome.failures
    assert not (run / "decisions" / "_decided.json").exists()
    assert (run / "stats.json").read_text() == stats, "write did not run"

    scores.write_bytes(good)
    outcome = run_here(stricter)
    assert outcome.ok, outcome.failures
    assert resume.failures(str(run)) == []
