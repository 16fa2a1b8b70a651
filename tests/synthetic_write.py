"""A decided run built straight through Storage and RunDir, with real tiny JPEGs, for write's tests.

It leaves exactly what download, score and decide would: input_shards/ (with list and struct
extra columns), raw/ (parquet, and a tar in shuffled "download" order), scores/, decisions/,
every marker, the plan, models.json and decisions/_decided.json. Shards may be given as failed
at download (no raw files) or at score (no scores); their rows are `shard_failed`.
"""
from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.config import Config, validate
from curate.rundir import RunDir, row_keys
from curate.storage import Storage
from curate.tario import TarWriter
from manifests.schema import build, conform

EXTRA = ["tags", "meta"]
MODELS = {"enabled": ["aesthetic"], "weights": "random"}
REASONS = [None, None, None, "too_small", "duplicate", "low_aesthetic"]
STYLES = ["photo", "cartoon", None]
# Stored sizes by row (the JPEGs stay 8x8: buckets read the size columns), skewed so one bucket is
# rare; rows 7 and 20 have no size (it is unbucketed). Nearest SDXL buckets: 1024x1024, 1216x832,
# 832x1216, 1344x768, 640x1536.
SIZES = [(8, 8), (8, 8), (8, 8), (12, 8), (12, 8), (8, 12), (16, 8), (8, 8), (12, 8), (8, 12), (8, 8), (6, 14)]


def image(key: str) -> bytes:
    """A tiny real JPEG, made unique by the key appended after its end marker (decoders ignore it)."""
    buf = io.BytesIO()
    seed = sum(key.encode())
    Image.new("RGB", (8, 8), (seed % 256, 7 * seed % 256, 40)).save(buf, "JPEG", quality=50)
    return buf.getvalue() + key.encode()


def config(run: RunDir, samples_per_shard: int, **write) -> Config:
    return validate({"run_dir": run.root, "input": {"paths": ["unused.parquet"], "extra_cols": EXTRA},
                     "write": {"samples_per_shard": samples_per_shard, **write}})


def _input(index: int, n: int) -> pa.Table:
    shard = f"{index:05d}"
    row_id = (index << 32) | np.arange(n, dtype=np.int64)
    keys = row_keys(row_id).to_pylist()
    return pa.table({
        "key": keys, "row_id": row_id, "shard": [shard] * n,
        "url": [f"http://127.0.0.1/{k}.jpg" for k in keys], "caption": [f"第{k}张：一只猫" for k in keys],
        "tags": pa.array([[f"t{i % 3}"] * (i % 3) for i in range(n)], pa.list_(pa.string())),
        "meta": pa.array([{"src": f"s{i % 2}", "rank": i} for i in range(n)],
                         pa.struct([("src", pa.string()), ("rank", pa.int32())])),
    })


def reasons_of(index: int, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng([seed, index])
    return [REASONS[i] for i in rng.integers(0, len(REASONS), n)]


def decided_run(root: str, rows: list[int], failed_download: set[int] = frozenset(),
                failed_score: set[int] = frozenset(), storage: Storage | None = None, seed: int = 0) -> RunDir:
    """Shard i has rows[i] rows; every 9th row failed to download; the rest get seeded reasons."""
    run = RunDir(root, storage or Storage())
    shards = [f"{i:05d}" for i in range(len(rows))]
    rng = np.random.default_rng(seed)
    for i, (shard, n) in enumerate(zip(shards, rows)):
        table = _input(i, n)
        run.storage.write_parquet(table, run.input_shard(shard))
        if i in failed_download:
            continue
        ok = np.arange(n) % 9 != 4
        keys = table.column("key").to_pylist()
        download = build({
            "status": np.where(ok, "success", "failed_to_download").tolist(),
            "error": [None if o else "HTTP 404" for o in ok],
            "width": [None if j % 13 == 7 else SIZES[j % len(SIZES)][0] for j in range(n)],
            "height": [None if j % 13 == 7 else SIZES[j % len(SIZES)][1] for j in range(n)],
            "original_width": [80 * SIZES[j % len(SIZES)][0] for j in range(n)],
            "original_height": [80 * SIZES[j % len(SIZES)][1] for j in range(n)],
            "sha256": [f"{j:064x}" if o else None for j, o in enumerate(ok)]})
        raw = table
        for name in download.column_names:
            raw = raw.append_column(name, download.column(name))
        run.storage.write_parquet(conform(raw, EXTRA), run.raw_table(shard))
        with run.storage.open_output(run.raw_tar(shard)) as f:   # download order: not key order
            tar = TarWriter(f)
            for j in rng.permutation(np.flatnonzero(ok)):
                tar.add(f"{keys[j]}.jpg", image(keys[j]))
            tar.close()
        run.mark("download", shard, {"rows": n, "success": int(ok.sum()),
                                     "tar_bytes": run.storage.size(run.raw_tar(shard))})
        if i in failed_score:
            continue
        aesthetic = rng.uniform(3, 7, n).astype(np.float32)
        aesthetic[::5] = np.nan
        run.storage.write_parquet(build({
            "key": keys, "shard": [shard] * n, "score_error": [None] * n,
            "caption_norm": [f"第{k}张：一只猫" for k in keys], "n_chars": [16] * n, "aesthetic": aesthetic,
            "phash": rng.integers(0, 2**63, n, dtype=np.uint64) * 2 + 1,
            "style": [STYLES[j % 3] for j in range(n)]}), run.scores(shard))
        run.mark("score", shard, {"rows": n})
    run.storage.write_json(run.plan, {"shards": shards, "rows": sum(rows), "sources": [], "input": {}})
    run.storage.write_json(run.file("models.json"), MODELS)
    failed = set(failed_download) | set(failed_score)
    decide(run, {s: ["shard_failed"] * n if i in failed else reasons_of(i, n, seed)
                 for i, (s, n) in enumerate(zip(shards, rows))}, seed)
    return run


def decide(run: RunDir, reasons: dict[str, list], seed: int = 0) -> str:
    """Write every shard's decisions and decide marker under a new attempt, then _decided.json;
    download failures always win. Returns the attempt."""
    attempt = uuid.uuid4().hex[:12]
    run.storage.delete(run.decided)
    total = {"rows_in": 0, "dropped": {}, "kept": 0}
    for shard, why in reasons.items():
        n = len(why)
        if run.storage.exists(run.raw_table(shard)):
            status = run.storage.read_parquet(run.raw_table(shard), columns=["status"]).column("status").to_pylist()
            why = [r if s == "success" or r == "shard_failed" else "download_failed" for r, s in zip(why, status)]
        keys = row_keys((int(shard) << 32) | np.arange(n, dtype=np.int64))
        kept_keys = [k for k, r in zip(keys.to_pylist(), why) if r is None]
        dup_of = [kept_keys[0] if r == "duplicate" and kept_keys else None for r in why]
        run.storage.write_parquet(build({"key": keys, "keep": [r is None for r in why], "reason": why,
                                         "dup_of": dup_of}), run.decisions(shard))
        counts: dict[str, int] = {}
        for r in why:
            if r is not None:
                counts[r] = counts.get(r, 0) + 1
        kept = sum(r is None for r in why)
        run.mark("decide", shard, {"attempt": attempt, "rows": n, "kept": kept, "reasons": counts})
        total["rows_in"] += n
        total["kept"] += kept
        for r, c in counts.items():
            total["dropped"][r] = total["dropped"].get(r, 0) + c
    run.storage.write_json(run.decided, {"fingerprint": f"test-{seed}", "attempt": attempt, "funnel": total,
                                         "styles": {"before": {"photo": 1}, "after": {"photo": 1}}})
    return attempt
