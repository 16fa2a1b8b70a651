"""Phase 4, write: kept samples into WebDataset shards, plus the manifest and the stats.

Kept rows, in key order, fill shards of exactly `write.samples_per_shard` samples (only the
last may be short). A shard whose planned content is unchanged is left alone, so re-running
after a new decide rewrites only the shards that differ. Each shard is one Ray task.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import Config
from curate.rundir import RunDir, atomic_path, write_json
from curate.runtime import Progress, log
from manifests.io import run_table
from manifests.schema import ALL, conform

SAMPLE_EXCLUDE = {"keep", "reason", "dup_of", "out_shard", "caption_norm"}


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    return info, io.BytesIO(data)


def write_shard(run_dir: str, name: str, samples: list[dict]) -> str:
    """Write one WebDataset shard: {key}.jpg, {key}.json, {key}.txt per sample, in key order."""
    run = RunDir(Path(run_dir))
    by_raw: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_raw[s["shard"]].add(s["key"])
    images: dict[str, bytes] = {}
    for raw_shard, keys in by_raw.items():
        with tarfile.open(run.raw / f"{raw_shard}.tar") as tar:
            for member in tar:
                key = member.name.rsplit(".", 1)[0]
                if key in keys:
                    images[key] = tar.extractfile(member).read()
    with atomic_path(run.shards / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            if s["key"] not in images:
                raise FileNotFoundError(f"{s['key']}: image missing from raw/{s['shard']}.tar")
            tar.addfile(*_member(f"{s['key']}.jpg", images[s["key"]]))
            tar.addfile(*_member(f"{s['key']}.json", s["json"].encode()))
            tar.addfile(*_member(f"{s['key']}.txt", s["txt"].encode()))
    return name


def _sample_json(row: dict) -> str:
    record = {k: v for k, v in row.items() if k not in SAMPLE_EXCLUDE}
    if record.get("phash") is not None:
        record["phash"] = f"{record['phash']:016x}"
    return json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False, default=str)


def _clean(value):
    return None if isinstance(value, float) and not np.isfinite(value) else value


def plan_shards(kept: pa.Table, cfg: Config) -> list[tuple[str, list[dict], str]]:
    """(shard name, samples, content digest) for every output shard, in order."""
    size = cfg.write.samples_per_shard
    rows = kept.to_pylist()
    plan = []
    for n, start in enumerate(range(0, len(rows), size)):
        samples = []
        digest = hashlib.sha256()
        for row in rows[start:start + size]:
            row = {k: _clean(v) for k, v in row.items()}
            sample = {"key": row["key"], "shard": row["shard"], "txt": row.get("caption_norm") or "",
                      "json": _sample_json(row)}
            digest.update(f"{sample['key']}\0{sample['txt']}\0{sample['json']}\0".encode())
            samples.append(sample)
        plan.append((f"{cfg.write.prefix}-{n:06d}.tar", samples, digest.hexdigest()))
    return plan


def run_write(cfg: Config, shards: list[str], failures: list[dict]) -> dict:
    """Write changed shards, the manifest and stats.json; return the stats."""
    import ray

    run = RunDir(Path(cfg.run_dir))
    table = run_table(run.root, shards)
    kept = table.filter(pc.fill_null(table.column("keep"), False)).sort_by("key")
    plan = plan_shards(kept, cfg)
    index_path = run.shards / "_index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    todo = [(name, samples) for name, samples, digest in plan
            if index.get(name) != digest or not (run.shards / name).exists()]
    if todo:
        progress = Progress("write", sum(len(s) for _, s in todo))
        remote = ray.remote(num_cpus=0.5)(write_shard)
        pending = {remote.remote(cfg.run_dir, name, samples): len(samples) for name, samples in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ray.get(ready[0])
            progress.add(pending.pop(ready[0]))
        progress.finish()
    else:
        log.info("write: all %d shards are up to date, nothing to do", len(plan))
    names = {name for name, _, _ in plan}
    for stale in run.shards.glob(f"{cfg.write.prefix}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    for partial in run.shards.glob(f".{cfg.write.prefix}-*.tar.*.tmp"):  # a killed run's unfinished shards
        partial.unlink()
    write_json({name: digest for name, _, digest in plan}, index_path)
    out_shard = {s["key"]: name for name, samples, _ in plan for s in samples}
    manifest = table.append_column("out_shard", pa.array([out_shard.get(k) for k in table.column("key").to_pylist()],
                                                        type=pa.string()))
    models = json.loads((run.root / "models.json").read_text()) if (run.root / "models.json").exists() else {}
    manifest = conform(manifest, cfg.input.extra_cols)
    manifest = manifest.replace_schema_metadata({"curate.models": json.dumps(models, ensure_ascii=False)})
    with atomic_path(run.manifest) as tmp:
        pq.write_table(manifest, tmp, compression="zstd")
    stats = _stats(manifest, plan, failures)
    stats["models"] = models
    decided = run.decisions / "_decided.json"   # style counts before and after rebalance
    stats["styles"] = json.loads(decided.read_text()).get("styles") if decided.exists() else None
    write_json(stats, run.stats)
    return stats


def _stats(manifest: pa.Table, plan: list, failures: list[dict]) -> dict:
    from curate.decide import funnel

    status = manifest.group_by("status").aggregate([("key", "count")]).to_pylist()
    return {
        "funnel": funnel(manifest.select(["key", "reason"])),
        "download_status": {r["status"]: r["key_count"] for r in status},
        "shards": {"count": len(plan), "samples": sum(len(s) for _, s, _ in plan),
                   "names": [name for name, _, _ in plan]},
        "failures": failures,
        "columns": {c: ALL[c].doc for c in manifest.column_names if c in ALL},
    }
