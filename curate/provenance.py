"""What produced the scores on disk: per-scorer fingerprints, the plan of what to re-score, models.json.

Each score marker records, beside its row count, the identity of the download it scored (`input`)
and one fingerprint per scorer whose columns are in the shard's scores file: a digest of the
config values the scorer declares (filters/declare.py), the digests of its weight files and word
lists. Comparing those with the fingerprints of the current config tells, per shard, exactly
which scorers must run again (their settings, weights or input changed, or they were just
enabled) and which columns must go (a scorer no longer enabled). The descriptions behind each
fingerprint are kept in `scores/_producers/{fingerprint}.json`, so models.json, the report and
the card can say what produced the files, and which shards differ, without trusting the config.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curate.config import Config
from curate.rundir import RunDir
from filters.declare import Scorer, digest
from filters.registry import BY_NAME, active

MIXED_SHARDS_LISTED = 20   # shards named per differing fingerprint in models.json; the rest are counted


@dataclass(frozen=True)
class Producer:
    """One scorer under one configuration: its fingerprint and what it is made of."""

    scorer: str
    fingerprint: str
    describe: dict[str, Any]


def _weight(name: str, cfg: Config) -> dict[str, str | None]:
    """A weight file as models.json and the card list it: file, the digest it is known by, how that is
    known. Shipped files carry their pin; random weights replace a downloaded file ('random')."""
    from filters.models import weights

    if name in weights.SHIPPED:
        s = weights.SHIPPED[name]
        return {"file": f"{s.package}/{s.filename}", "sha256": s.sha256, "pin": "pinned"}
    w = weights.REGISTRY[name]
    if cfg.models.weights == "random":
        return {"file": w.filename, "sha256": None, "pin": "random weights: the file is not loaded"}
    known, pin = weights.expected_sha256(w, cfg.models)
    return {"file": w.filename, "sha256": known, "pin": pin}


def _file_digest(path: str) -> str:
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else "missing"


def producer(scorer: Scorer, cfg: Config) -> Producer:
    described = {"scorer": scorer.name, "stage": scorer.stage, "settings": scorer.settings(cfg),
                 "weights": {n: _weight(n, cfg) for n in scorer.weights(cfg)},
                 "files": {p: _file_digest(p) for p in scorer.files(cfg)}, "tower": scorer.tower(cfg)}
    if scorer.name == "clip_score":
        from filters.models.weights import clip_source

        described["clip_score"] = clip_source(cfg.models)
    return Producer(scorer.name, digest(described), described)


def producers(cfg: Config) -> dict[str, Producer]:
    """The producer of every scorer the config runs, by scorer name."""
    return {s.name: producer(s, cfg) for s in active(cfg)}


def record_producers(run: RunDir, wanted: dict[str, Producer]) -> None:
    for p in wanted.values():
        uri = run.uri("scores", "_producers", f"{p.fingerprint}.json")
        if not run.storage.exists(uri):
            run.storage.write_json(uri, p.describe)


@dataclass(frozen=True)
class Work:
    """What one shard needs: the scorers to run (all of them: a full re-score) and the scorers whose
    columns go. `partial`: the shard's scores file stays and gains or loses columns."""

    run: frozenset[str]
    drop: frozenset[str]
    partial: bool
    input: str

    def marker(self, rows: int, wanted: dict[str, Producer]) -> dict:
        """The score marker of a shard done with this work under `wanted`."""
        return {"rows": rows, "input": self.input, "scorers": {n: p.fingerprint for n, p in wanted.items()}}


def input_identity(run: RunDir) -> dict[str, str]:
    """shard -> identity of its download marker (size and time): a re-download changes it. One listing."""
    return {name[:-len(".json")]: f"{size}:{mtime}" for name, size, mtime in
            run.storage.stat_list(run.uri("_done", "download")) if name.endswith(".json")}


def plan(run: RunDir, cfg: Config, shards: list[str], wanted: dict[str, Producer]) -> dict[str, Work]:
    """The work of every shard that is not up to date with `wanted` (shards up to date are absent)."""
    inputs = input_identity(run)
    scored = sorted(run.done("score") & set(shards))
    markers = dict(zip(scored, run.markers("score", scored)))
    everything = frozenset(wanted)
    out: dict[str, Work] = {}
    for shard in shards:
        marker, identity = markers.get(shard), inputs[shard]
        if marker is None or marker.get("input") != identity or "scorers" not in marker:
            out[shard] = Work(everything, frozenset(), False, identity)
            continue
        have: dict[str, str] = marker["scorers"]
        stale = frozenset(n for n, p in wanted.items() if have.get(n) != p.fingerprint)
        gone = frozenset(set(have) - everything)
        if {"image", "caption"} & stale:
            out[shard] = Work(everything, frozenset(), False, identity)   # the CPU stage re-runs, so does the rest
        elif "embedding" in stale:   # its tower is chosen from every enabled view scorer: run them together
            views = frozenset(n for n in wanted if BY_NAME[n].stage == "model")
            out[shard] = Work(stale | views, gone, True, identity)
        elif stale or gone:
            out[shard] = Work(stale, gone, True, identity)
    return out


def summarise(run: RunDir, skipped: dict[str, str] | None = None) -> dict:
    """models.json: what produced the scores on disk, read from the score markers, never from the config.

    A scorer present on only some shards, or under more than one fingerprint, is listed under
    `mixed` with the shards of each fingerprint."""
    shards = sorted(run.done("score"))
    per: dict[str, Counter] = defaultdict(Counter)
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for shard, marker in zip(shards, run.markers("score", shards)):
        for name, fp in (marker.get("scorers") or {}).items():
            per[name][fp] += 1
            if len(where[name, fp]) < MIXED_SHARDS_LISTED:
                where[name, fp].append(shard)
    described = {}
    for fps in per.values():
        for fp in fps:
            uri = run.uri("scores", "_producers", f"{fp}.json")
            described[fp] = run.storage.read_json(uri) if run.storage.exists(uri) else {}
    models = [n for n in per if BY_NAME[n].optional]
    scorers = {n: {"fingerprint": fps.most_common(1)[0][0] if len(fps) == 1 else "mixed",
                   "shards": sum(fps.values()),
                   "settings": described[fps.most_common(1)[0][0]].get("settings", {}),
                   "weights": described[fps.most_common(1)[0][0]].get("weights", {})} for n, fps in per.items()}
    mixed = {n: [{"fingerprint": fp, "shards": k, "examples": where[n, fp]} for fp, k in fps.most_common()]
             for n, fps in per.items() if len(fps) > 1 or sum(fps.values()) < len(shards)}
    modes = {n: {described[fp].get("settings", {}).get("models.weights") for fp in per[n]} - {None} for n in models}
    random = sorted(n for n, m in modes.items() if "random" in m)
    all_random = bool(random) and all(m == {"random"} for m in modes.values() if m)
    info: dict[str, Any] = {
        "enabled": [n for n in BY_NAME if n in models],
        "weights": ("unknown" if any(not described[fp] for fps in per.values() for fp in fps) else
                    "random" if all_random else "mixed" if random else "pretrained"),
        "skipped": dict(skipped or {}),
        "shards_scored": len(shards),
        "scorers": scorers,
        "files": [{"name": w, "scorer": n, **f} for n in models for w, f in scorers[n]["weights"].items()],
    }
    if mixed:
        info["mixed"] = mixed
    if random:
        info["warning"] = f"models ran with RANDOM weights: {', '.join(random)} scores are meaningless"
    if "clip_score" in per:
        info["clip_score"] = described[scorers["clip_score"]["fingerprint"] if scorers["clip_score"]["fingerprint"]
                                       != "mixed" else per["clip_score"].most_common(1)[0][0]].get("clip_score")
    return info
