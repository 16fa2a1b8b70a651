"""The four phases in order, each skipping the shards whose done marker exists.

A shard that fails (after Ray's retries), whatever the exception, is recorded in
failures.json and in the manifest (`shard_failed`), the other shards carry on, and the run
ends non-zero; running again retries only the shards without markers. The run holds a
lease on its directory while it works, so a second run on it is refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from curate import config as config_mod
from curate.config import Config, ConfigError
from curate.download import download_shard
from curate.inputs import check_input, check_plan
from curate.rundir import Lease, RunDir
from curate.runtime import Progress, Window, init_ray, log
from curate.storage import Storage

PHASES = ("download", "score", "decide", "write")


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


def run_download(cfg: Config, run: RunDir) -> list[dict]:
    import ray

    from curate.inputs import cut
    from curate.screen import run_screen

    if run.storage.exists(run.plan):   # run_phases has checked it against this config
        shards = run.shard_names()
    else:  # the input streams through a worker, not the driver; the plan is written once screened
        info = ray.get(ray.remote(num_cpus=0.5)(cut).remote(cfg.input, run))
        info["before_download"] = run_screen(cfg, run, info["shards"], info["rows"])
        run.storage.write_json(run.plan, info)
        shards = info["shards"]
    done = run.done("download")
    todo = [s for s in shards if s not in done]
    if not todo:
        log.info("download: all %d shards already downloaded, nothing to do", len(shards))
        return []
    remote = ray.remote(num_cpus=cfg.download.num_cpus, max_retries=2, retry_exceptions=True)(download_shard)
    cfg_ref = ray.put(cfg)
    window = Window()
    progress = Progress("download", len(todo) * cfg.input.shard_rows)
    failures = []

    def collect(results: dict) -> None:
        for shard, result in results.items():
            if isinstance(result, dict):
                progress.add(result["rows"])
            else:
                failures.append({"phase": "download", "shard": shard, "error": result})
                log.error("download: shard %s failed: %s", shard, result)

    for shard in todo:
        collect(window.submit(remote.remote(cfg_ref, shard), shard))
    collect(window.drain())
    progress.total = progress.done
    progress.finish()
    return failures


def check_models(cfg: Config, skip_missing: bool) -> dict:
    """Before Ray starts: stop on missing weights, or (demo) drop the scorers that lack them.

    What ran, what was skipped and whether the weights were random is recorded in models.json,
    which stats.json and the report repeat.
    """
    info: dict = {"enabled": list(cfg.models.enabled), "skipped": {}, "weights": cfg.models.weights}
    if cfg.models.enabled:
        from filters.models import skipped_when_offline

        skipped = skipped_when_offline(cfg.models)
        if skipped and not skip_missing:
            lines = "\n".join(f"  - {why}" for why in dict.fromkeys(skipped.values()))
            raise ConfigError(f"models: weights for {sorted(skipped)} are missing:\n{lines}")
        cfg.models.enabled = [s for s in cfg.models.enabled if s not in skipped]
        info.update(enabled=list(cfg.models.enabled), skipped=skipped)
        for scorer, why in skipped.items():
            log.warning("score: skipping %s: %s", scorer, why)
    from filters.models.weights import clip_needed, clip_source, weight_files

    info["files"] = weight_files(cfg.models)
    if clip_needed(cfg.models):   # scores of different CLIP backends are not comparable: say which one ran
        info["clip_score"] = clip_source(cfg.models)
    if cfg.models.weights == "random" and cfg.models.enabled:
        info["warning"] = "models ran with RANDOM weights: every model score is meaningless"
        log.warning(info["warning"])
    return info


def run_phases(cfg: Config, phases: tuple[str, ...] = PHASES, dry_run: bool = False,
               skip_missing_models: bool = False) -> Outcome:
    """Run the given phases in order on one config, holding the run directory's lease."""
    models = check_models(cfg, skip_missing_models) if "score" in phases else None
    run = open_run(cfg)
    if "download" in phases and not run.storage.exists(run.plan):   # a missing column, before Ray starts
        check_input(cfg.input, run.storage)
    init_ray(cfg.ray)
    if dry_run:
        return _phases(cfg, run, phases, models, dry_run)
    with Lease(run):
        if run.storage.exists(run.plan):   # refuse a changed input before config.yaml records it
            from curate.screen import check_screen

            check_plan(cfg.input, run)
            check_screen(cfg, run)
        run.storage.write_text(run.config, config_mod.dump(cfg))
        return _phases(cfg, run, phases, models, dry_run)


def _phases(cfg: Config, run: RunDir, phases: tuple[str, ...], models: dict | None, dry_run: bool) -> Outcome:
    if models is not None:
        run.storage.write_json(run.file("models.json"), models)
    out = Outcome()
    timings = _read_json(run, "timings.json", {})
    for phase in phases:
        started = time.time()
        if phase == "download":
            out.failures += run_download(cfg, run)
        elif phase == "score":
            from curate.score import run_score

            downloaded = run.done("download")
            out.failures += run_score(cfg, run, [s for s in run.shard_names() if s in downloaded])
        elif phase == "decide":
            from curate.decide import run_decide

            out.funnel = run_decide(cfg, run, dry_run=dry_run)
        elif phase == "write":
            from curate.write import run_write

            out.stats = run_write(cfg, run.shard_names(), _record_failures(run, out.failures))
        timings[phase] = round(time.time() - started, 3)
    if not dry_run:
        _record_failures(run, out.failures)
        if out.stats:
            out.stats["timings"] = timings
            run.storage.write_json(run.stats, out.stats)
        run.storage.write_json(run.file("timings.json"), timings)
        if out.stats:
            _report(run)
    return out


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


def _read_json(run: RunDir, name: str, default):
    uri = run.file(name)
    return run.storage.read_json(uri) if run.storage.exists(uri) else default


def _record_failures(run: RunDir, new: list[dict]) -> list[dict]:
    """failures.json lists the shards still without markers, with the latest error known."""
    known = {(f["phase"], f["shard"]): f for f in _read_json(run, "failures.json", [])}
    known.update({(f["phase"], f["shard"]): f for f in new})
    shards = set(run.shard_names()) if run.storage.exists(run.plan) else set()
    missing = {phase: shards - run.done(phase) for phase in ("download", "score")}
    still = [f for (phase, shard), f in sorted(known.items()) if shard in missing.get(phase, set())]
    run.storage.write_json(run.file("failures.json"), still)
    return still
