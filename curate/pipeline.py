"""The four phases in order, each skipping work whose outputs already exist.

A shard that fails (after Ray's retries) is recorded in failures.json and in the manifest
(`shard_failed`), the other shards carry on, and the run ends non-zero; running again
retries only the shards without outputs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from curate import config as config_mod
from curate.config import Config, ConfigError
from curate.download import download_shard
from curate.rundir import RunDir, write_json, write_text
from curate.runtime import Progress, init_ray, log

PHASES = ("download", "score", "decide", "write")


@dataclass
class Outcome:
    stats: dict = field(default_factory=dict)
    funnel: dict | None = None
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def prepare(cfg: Config, record: bool = True) -> RunDir:
    """Create the run directory and (unless a dry run) record the resolved config that drives it."""
    run = RunDir(Path(cfg.run_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    if record:
        write_text(config_mod.dump(cfg), run.config)
    return run


def run_download(cfg: Config, run: RunDir) -> list[dict]:
    import ray

    from curate.inputs import plan

    shards = plan(cfg.input, run)
    todo = [s for s in shards if not (run.raw / f"{s}.parquet").exists()]
    if not todo:
        log.info("download: all %d shards already downloaded, nothing to do", len(shards))
        return []
    remote = ray.remote(num_cpus=cfg.download.num_cpus, max_retries=2, retry_exceptions=True)(download_shard)
    pending = {remote.remote(cfg, s): s for s in todo}
    progress = Progress("download", len(todo) * cfg.input.shard_rows)
    failures = []
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
            progress.add(result["rows"])
        except Exception as exc:
            failures.append({"phase": "download", "shard": shard, "error": _short(exc)})
            log.error("download: shard %s failed: %s", shard, _short(exc))
    progress.total = progress.done
    progress.finish()
    return failures


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]


def failed_shards(run: RunDir, shards: list[str]) -> set[str]:
    """Shards without scores are failed: derived from the files, never stored separately."""
    return {s for s in shards if not (run.scores / f"{s}.parquet").exists()}


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
    if cfg.models.weights == "random" and cfg.models.enabled:
        info["warning"] = "models ran with RANDOM weights: every model score is meaningless"
        log.warning(info["warning"])
    return info


def run_phases(cfg: Config, phases: tuple[str, ...] = PHASES, dry_run: bool = False,
               skip_missing_models: bool = False) -> Outcome:
    """Run the given phases in order on one config; Ray starts only if a phase needs it."""
    from curate.decide import run_decide
    from curate.score import run_score
    from curate.write import run_write

    models = check_models(cfg, skip_missing_models) if "score" in phases else None
    run = prepare(cfg, record=not dry_run)
    if models is not None:
        write_json(models, run.root / "models.json")
    if set(phases) & {"download", "score", "write"}:
        init_ray(cfg.ray)
    out = Outcome()
    timings = _read_timings(run)
    for phase in phases:
        started = time.time()
        if phase == "download":
            out.failures += run_download(cfg, run)
        elif phase == "score":
            out.failures += run_score(cfg, [s for s in run.shard_names() if (run.raw / f"{s}.parquet").exists()])
        elif phase == "decide":
            shards = run.shard_names()
            out.funnel = run_decide(cfg, shards, failed_shards(run, shards), dry_run=dry_run)
        elif phase == "write":
            out.stats = run_write(cfg, run.shard_names(), _record_failures(run, out.failures))
        timings[phase] = round(time.time() - started, 3)
    if not dry_run:
        _record_failures(run, out.failures)
        if out.stats:
            out.stats["timings"] = timings
            write_json(out.stats, run.stats)
        write_json(timings, run.root / "timings.json")
        if out.stats:
            _report(run)
    return out


def _report(run: RunDir) -> None:
    """report.html only views files already written, so failing to draw it must not fail the run."""
    from curate.report import build_report

    try:
        build_report(run.root)
    except Exception:
        log.exception("report: could not write %s; retry with `curate report %s`", run.root / "report.html", run.root)


def _read_timings(run: RunDir) -> dict:
    path = run.root / "timings.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _record_failures(run: RunDir, new: list[dict]) -> list[dict]:
    """failures.json lists the shards still without outputs, with the latest error known."""
    path = run.root / "failures.json"
    known = {(f["phase"], f["shard"]): f for f in (json.loads(path.read_text()) if path.exists() else [])}
    known.update({(f["phase"], f["shard"]): f for f in new})
    shards = run.shard_names() if run.plan.exists() else []
    missing = {"download": {s for s in shards if not (run.raw / f"{s}.parquet").exists()},
               "score": failed_shards(run, shards)}
    still = [f for (phase, shard), f in sorted(known.items()) if shard in missing.get(phase, set())]
    write_json(still, path)
    return still
