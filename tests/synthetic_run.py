"""A scored run directory built straight from a joined raw+scores table, for decide's tests.

It writes exactly what download and score would (raw/ and scores/ per shard, their markers,
the plan), so the real decide phase runs on it, with Ray, through the storage module.
"""
from __future__ import annotations

import io
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.rundir import RunDir
from curate.storage import Storage

RAW = ["key", "shard", "url", "caption", "status", "error", "width", "height",
       "original_width", "original_height", "sha256"]


def write_scored_run(root: str, table: pa.Table, failed: set[str] = frozenset(),
                     embeddings: dict[str, np.ndarray] | None = None) -> RunDir:
    """Write raw/, scores/ and markers for every shard of `table` (scores only outside `failed`)."""
    run = RunDir(root, Storage())
    shards = sorted(set(table.column("shard").to_pylist()))
    n = table.num_rows
    if "url" not in table.column_names:
        table = table.append_column("url", pa.array([f"http://127.0.0.1/{i}.jpg" for i in range(n)]))
    if "caption" not in table.column_names:
        table = table.append_column("caption", table.column("caption_norm"))
    if "error" not in table.column_names:
        table = table.append_column("error", pa.nulls(n, pa.string()))
    for shard in shards:
        part = table.filter(pc.equal(table.column("shard"), shard)).sort_by("key")
        run.storage.write_parquet(part.select(RAW), run.raw_table(shard))
        run.storage.write_bytes(run.raw_tar(shard), b"")
        run.mark("download", shard, {"rows": part.num_rows, "success": part.num_rows, "tar_bytes": 0})
        if shard in failed:
            continue
        scores = part.select(["key", "shard", *[c for c in part.column_names if c not in RAW]])
        run.storage.write_parquet(scores, run.scores(shard))
        if embeddings and shard in embeddings:
            buf = io.BytesIO()
            np.save(buf, embeddings[shard].astype(np.float16))
            run.storage.write_bytes(run.embeddings(shard), buf.getvalue())
        run.mark("score", shard, {"rows": part.num_rows})
    run.storage.write_json(run.plan, {"shards": shards, "rows": n, "sources": [], "input": {}})
    return run


def enable_scored(cfg: Config, table: pa.Table):
    """cfg.models with every model scorer whose columns the table holds enabled, as the score phase
    that wrote such a table would have had it."""
    from filters.models.catalog import MODEL_SCORERS

    have = [s.name for s in MODEL_SCORERS if set(s.column_names) <= set(table.column_names)]
    return cfg.models.model_copy(update={"enabled": list(dict.fromkeys([*cfg.models.enabled, *have]))})


def decide_table(table: pa.Table, cfg: Config, failed_shards: set[str] = frozenset(),
                 embeddings: dict[str, np.ndarray] | None = None) -> tuple[pa.Table, dict]:
    """Run the real decide phase on `table`; return every shard's decisions (in key order) and the styles."""
    decisions, decided = decide_report(table, cfg, failed_shards, embeddings)
    return decisions, decided["styles"]


def decide_report(table: pa.Table, cfg: Config, failed_shards: set[str] = frozenset(),
                  embeddings: dict[str, np.ndarray] | None = None) -> tuple[pa.Table, dict]:
    """The real decide phase on `table`: every shard's decisions (in key order) and _decided.json."""
    from curate.decide import run_decide

    with tempfile.TemporaryDirectory(prefix="decide-") as root:
        run = write_scored_run(root, table, set(failed_shards), embeddings)
        cfg = cfg.model_copy(update={"run_dir": root, "models": enable_scored(cfg, table)})
        run_decide(cfg, run)
        decisions = pa.concat_tables([run.storage.read_parquet(run.decisions(s)) for s in run.shard_names()])
        assert not run.storage.exists(run.uri("_scratch", "decide")) or not run.storage.list(
            run.uri("_scratch", "decide")), "decide left its shuffle files behind"
        return decisions, run.storage.read_json(run.decided)
