"""The five phases in order (recaption only with recaption.enabled), each skipping the shards whose done
marker exists.

A shard that fails in any phase (after Ray's retries), whatever the exception, is recorded in
failures.json (curate/run/failures.py) and, from score on, in the manifest (`shard_failed`); the
other shards carry on, and the run ends non-zero while failures.json is not empty, naming each
shard. A global step that fails (decide's) fails its phase, is recorded as such, and stops the
phases after it. Running again retries what failed. The run holds a lease on its directory
while it works, so a second run on it is refused.

timings.json keeps, per phase, the seconds and rows of its last run that did work: a phase with
nothing to do leaves its entry as it was.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from curate import config as config_mod
from curate.config import Config, ConfigError
from curate.guards import check_paths_reach_every_node
from curate.phases.download.phase import download_shard
from curate.phases.download.plan import check_input, check_plan
from curate.run import failures
from curate.run.rundir import PHASES, Lease, RunBusy, RunDir
from curate.run.runtime import Progress, error_text, init_ray, log, windowed
from curate.run.storage import Storage


@dataclass
class Outcome:
    stats: dict = field(default_factory=dict)
    funnel: dict | None = None
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def open_run(cfg: Config) -> RunDir:
    return RunDir(cfg.run_dir, Storage(cfg.storage))


def run_download(cfg: Config, run: RunDir) -> tuple[list[dict], int]:
    """Download every planned shard without a marker; (failures, rows downloaded)."""
    import ray

    from curate.phases.download.plan import cut
    from curate.phases.download.screen import rescreen, run_screen

    if run.storage.exists(run.plan):   # run_phases has checked it against this config
        shards = run.shard_names()
        rescreen(cfg, run)   # a loosened text setting: the plan admits more rows, listed as its increment
    else:  # the input streams through a worker, not the driver; the plan is written once screened
        info = ray.get(ray.remote(num_cpus=0.5)(cut).remote(cfg.input, run))
        info["before_download"] = run_screen(cfg, run, info["shards"], info["rows"])
        run.storage.write_json(run.plan, info)
        shards = info["shards"]
    done = run.done("download")
    increment = (run.storage.read_json(run.plan).get("before_download") or {}).get("increment") or {}
    again = _increment_todo(run, increment, done)
    todo = [s for s in shards if s not in done or s in again]
    if not todo:
        log.info("download: all %d shards already downloaded, nothing to do", len(shards))
        return [], 0
    remote = ray.remote(num_cpus=cfg.download.num_cpus, max_retries=2, retry_exceptions=True)(download_shard)
    cfg_ref = ray.put(cfg)
    progress = Progress("download", len(todo) * cfg.input.shard_rows)
    failed: list[dict] = []
    grown: Counter = Counter()
    for shard, result in windowed(todo, lambda shard: remote.remote(
            cfg_ref, shard, increment["screen"] if shard in again else None)):
        if isinstance(result, dict):
            progress.add(result["rows"])
            if shard in again:
                grown.update(shards=1, requested=result["requested"], stored=result["stored"])
        else:
            failed.append(failures.failure("download", shard, result))
            log.error("download: shard %s failed: %s", shard, result)
    progress.total = progress.done
    progress.finish()
    if again:
        log.info("download: increment after %s: %d shards downloaded again, %d requests for the rows newly "
                 "admitted, %d images kept from the raw tars without a request",
                 ", ".join(increment["loosened"]), grown["shards"], grown["requested"], grown["stored"])
    return failed, progress.done


def _increment_todo(run: RunDir, increment: dict, done: set[str]) -> set[str]:
    """The shards of the plan's increment whose download does not yet hold its newly admitted rows: those
    without a download marker from this increment (a shard it failed or a crash cut short, too)."""
    shards = increment.get("admitted", {})
    listed = [s for s in shards if s in done]
    current = {s for s, m in zip(listed, run.markers("download", listed))
               if (m.get("increment") or {}).get("screen") == increment["screen"]}
    return {s for s in shards if s not in current}


def check_models(cfg: Config, skip_missing: bool) -> dict:
    """Before Ray starts: stop on missing weights, or (demo) drop the scorers that lack them.

    The scorers skipped here are recorded in models.json beside what the score markers say ran
    (curate/phases/score/provenance.py summarise), which stats.json and the report repeat.
    """
    info: dict = {"skipped": {}}
    if cfg.models.enabled:
        from filters.models import skipped_when_offline

        skipped = skipped_when_offline(cfg.models)
        if skipped and not skip_missing:
            lines = "\n".join(f"  - {why}" for why in dict.fromkeys(skipped.values()))
            raise ConfigError(f"models: weights for {sorted(skipped)} are missing:\n{lines}")
        cfg.models.enabled = [s for s in cfg.models.enabled if s not in skipped]
        info["skipped"] = skipped
        for scorer, why in skipped.items():
            log.warning("score: skipping %s: %s", scorer, why)
    if cfg.models.weights == "random" and cfg.models.enabled:
        log.warning("models run with RANDOM weights: every model score is meaningless")
    return info


def run_phases(cfg: Config, phases: tuple[str, ...] = PHASES, dry_run: bool = False,
               skip_missing_models: bool = False) -> Outcome:
    """Run the given phases in order on one config, holding the run directory's lease."""
    models = check_models(cfg, skip_missing_models) if "score" in phases else None
    if "recaption" in phases:
        from filters.models.recaption import missing

        if missing(cfg.recaption, cfg.models):
            raise ConfigError(missing(cfg.recaption, cfg.models))
    run = open_run(cfg)
    if "download" in phases and not run.storage.exists(run.plan):   # a missing column, before Ray starts
        check_input(cfg.input, run.storage)
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    check_paths_reach_every_node(cfg)
    if dry_run:
        if run.storage.exists(run.plan):
            from curate.phases.download.screen import check_screen

            check_screen(cfg, run, downloading=False)
        return _phases(cfg, run, phases, models, dry_run)
    with Lease(run):
        if run.storage.exists(run.plan):   # refuse a changed input before config.yaml records it
            from curate.phases.download.screen import check_screen

            check_plan(cfg.input, run)
            check_screen(cfg, run, downloading="download" in phases)
        run.storage.write_text(run.config, config_mod.dump(cfg))
        return _phases(cfg, run, phases, models, dry_run)


# Errors that are the user's to fix before anything can run (exit 2): not failures of the run.
REFUSALS = (ConfigError, FileNotFoundError, RunBusy)


def _phases(cfg: Config, run: RunDir, phases: tuple[str, ...], models: dict | None, dry_run: bool) -> Outcome:
    out = Outcome()
    timings = _read_json(run, run.file("timings.json"), {})
    for phase in phases:
        started = time.time()
        try:
            new, rows = _run_phase(phase, cfg, run, out, models, dry_run)
        except REFUSALS:
            raise
        except Exception as exc:   # a global step failed: the phase fails, and the phases after it cannot run
            log.exception("%s failed", phase)
            out.failures = [failures.failure(phase, None, error_text(exc))]
            if not dry_run:
                out.failures = failures.record(run, out.failures, skip=failures.skipped(cfg))
            break
        if dry_run:
            out.failures += new
            continue
        out.failures = failures.record(run, new, finished=(phase,), skip=failures.skipped(cfg))
        if rows:   # a phase that had nothing to do keeps the timing of its last real run
            timings[phase] = {"seconds": round(time.time() - started, 3), "rows": rows}
    if dry_run:
        return out
    run.storage.write_json(run.file("timings.json"), timings)
    if out.stats:
        out.stats.update(failures=out.failures, timings=timings)
        run.storage.write_json(run.stats, out.stats)
        _report(run)
    return out


def _run_phase(phase: str, cfg: Config, run: RunDir, out: Outcome, models: dict | None,
               dry_run: bool) -> tuple[list[dict], int]:
    """One phase: (its failures, the input rows it worked on; 0 when it had nothing to do)."""
    if phase == "download":
        return run_download(cfg, run)
    if phase == "score":
        from curate.phases.score.phase import run_score
        from curate.phases.score.provenance import summarise

        downloaded = run.done("download")
        failed, todo = run_score(cfg, run, [s for s in run.shard_names() if s in downloaded])
        if not dry_run:   # what produced the scores on disk, read from their markers, never from the config
            run.storage.write_json(run.file("models.json"), summarise(run, (models or {}).get("skipped")))
        return failed, planned_rows(run, set(todo), cfg.input.shard_rows)
    if phase == "decide":
        from curate.phases.decide.phase import run_decide

        before = _read_json(run, run.decided, {}).get("attempt")
        out.funnel = run_decide(cfg, run, dry_run=dry_run)   # up to date: the same attempt, nothing done
        return [], out.funnel["rows_in"] if _read_json(run, run.decided, {}).get("attempt") != before else 0
    if phase == "recaption":
        from curate.phases.recaption.phase import run_recaption

        return ([], 0) if dry_run else run_recaption(cfg, run)
    if phase == "write":
        from curate.phases.write.phase import run_write

        out.stats = run_write(cfg, run.shard_names())
        return [], out.stats["funnel"]["rows_in"]
    raise ValueError(f"unknown phase {phase!r}: expected one of {PHASES}")


def planned_rows(run: RunDir, shards: set[str], shard_rows: int) -> int:
    """Input rows of some shards, from the plan alone: every shard holds shard_rows rows but the last."""
    plan = run.storage.read_json(run.plan)
    names = plan["shards"]
    return len(shards) * shard_rows - (len(names) * shard_rows - plan["rows"] if names[-1] in shards else 0)


def _report(run: RunDir) -> None:
    """report.html only views files already written, so failing to draw it must not fail the run.

    It streams the whole manifest, so it runs as a Ray task: the driver stays at paths and counts.
    """
    import ray

    from curate.report import build_report

    try:
        ray.get(ray.remote(num_cpus=1, max_retries=1)(build_report).remote(run.root, storage=run.storage))
    except Exception:
        log.exception("report: could not write %s; retry with `curate report %s`", run.file("report.html"), run.root)


def _read_json(run: RunDir, uri: str, default):
    return run.storage.read_json(uri) if run.storage.exists(uri) else default
