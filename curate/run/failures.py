"""failures.json: what is still wrong with a run, shard by shard, with the latest error known.

Every phase reports its failures here, and the run exits non-zero while the list is not empty.
A shard's failure in a phase stands until the shard has the done markers of that phase and of
every phase before it: a shard whose raw tar broke at write time lost its download marker, so its
write failure stands (however often write succeeds on its `shard_failed` rows) until the shard
is downloaded, scored, decided and written again. A failure of a whole phase (a global step such
as decide's duplicate search; `shard` is null) stands until that phase next completes.
"""
from __future__ import annotations

from typing import Any

from curate.run.rundir import PHASES, RunDir

FILE = "failures.json"


def failure(phase: str, shard: str | None, error: str) -> dict:
    return {"phase": phase, "shard": shard, "error": error}


def read(run: RunDir) -> list[dict]:
    uri = run.file(FILE)
    return run.storage.read_json(uri) if run.storage.exists(uri) else []


def skipped(cfg: Any) -> tuple[str, ...]:
    """The optional phases this config does not run (recaption, unless recaption.enabled): no shard needs
    their markers."""
    return () if cfg.recaption.enabled else ("recaption",)


def record(run: RunDir, new: list[dict], finished: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> list[dict]:
    """Merge `new` failures into failures.json, drop those that no longer stand, write it, return it.

    `finished`: phases that have just completed, so their whole-phase failures are over; `skip`: phases the
    run does not use (`skipped`), whose missing markers stand in no shard's way."""
    known = {(f["phase"], f["shard"]): f for f in read(run) if not (f["shard"] is None and f["phase"] in finished)}
    known.update({(f["phase"], f["shard"]): f for f in new})
    shards = set(run.shard_names()) if run.storage.exists(run.plan) else set()
    lacking: dict[str, set[str]] = {}
    missing: set[str] = set()
    for phase in PHASES:   # a shard lacking a phase's marker lacks every later phase's result too
        if phase not in skip:
            missing |= shards - run.done(phase)
        lacking[phase] = set(missing)
    still = [f for (phase, shard), f in sorted(known.items(), key=_order)
             if shard is None or shard in lacking.get(phase, set())]
    run.storage.write_json(run.file(FILE), still)
    return still


def _order(item: tuple[tuple[str, str | None], dict]) -> tuple:
    (phase, shard), _ = item
    return (PHASES.index(phase) if phase in PHASES else len(PHASES), shard or "")


def describe(f: dict) -> str:
    """One failure as a line for people: the phase, the shard (or the whole phase), the error."""
    where = f"shard {f['shard']}" if f["shard"] is not None else "(the whole phase)"
    return f"{f['phase']} {where}: {f['error']}"
