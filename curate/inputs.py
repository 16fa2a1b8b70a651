"""Read user URL manifests (parquet, csv, tsv, jsonl) and cut them into input shards.

Shards are the unit of work and of resume for every later phase. Each row gets a stable
key, `{shard}_{row:06d}`, that survives every phase and names the sample in the shards.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from curate.config import ConfigError, InputConfig
from curate.rundir import RunDir, row_keys
from curate.storage import Storage
from manifests.schema import ALL

MAX_SHARD_ROWS = 1_000_000  # keys carry the row index in six digits
_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def expand(paths: list[str], storage: Storage) -> list[str]:
    """Files named by the config (local or URLs), globs in the file name expanded and sorted."""
    files: list[str] = []
    for pattern in paths:
        matches = storage.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise ConfigError(f"input.paths: no file matches {pattern!r}")
        for m in matches:
            if not storage.exists(m):
                raise ConfigError(f"input.paths: input file not found: {m}")
            files.append(m)
    return files


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    try:
        return _FORMATS["." + path.rsplit(".", 1)[-1].lower()]
    except KeyError:
        raise ConfigError(f"{path}: cannot tell the format from the extension; set input.format") from None


def _batches(path: str, fmt: str, columns: list[str], storage: Storage) -> Iterator[pa.RecordBatch]:
    """Stream a file's batches with every wanted column read as text where the format allows."""
    if fmt == "parquet":
        pf = storage.parquet(path)
        _check_columns(path, pf.schema_arrow.names, columns)
        yield from pf.iter_batches(columns=columns, batch_size=65_536)
        return
    if fmt in ("csv", "tsv"):
        reader = pacsv.open_csv(
            storage.open_input(path),
            read_options=pacsv.ReadOptions(block_size=16 << 20),
            parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, strings_can_be_null=True),
        )
        _check_columns(path, reader.schema.names, columns)
        for batch in reader:
            yield batch.select(columns)
        return
    table = pajson.read_json(storage.open_input(path))
    _check_columns(path, table.column_names, columns)
    yield from table.select(columns).to_batches(max_chunksize=65_536)


def _check_columns(path: str, have: list[str], want: list[str]) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing}; it has {have}")


def _as_strings(batch: pa.RecordBatch, cfg: InputConfig) -> dict[str, pa.Array]:
    def text(name: str) -> pa.Array:
        col = batch.column(name)
        return col if pa.types.is_string(col.type) else col.cast(pa.string())

    cols = {"url": text(cfg.url_col), "caption": text(cfg.caption_col)}
    for extra in cfg.extra_cols:
        cols[extra] = batch.column(extra)
    return cols


def signature(cfg: InputConfig) -> dict:
    """What an existing plan was cut from: changing any of it needs a new run directory."""
    return {"paths": list(cfg.paths), "shard_rows": cfg.shard_rows, "url_col": cfg.url_col,
            "caption_col": cfg.caption_col, "extra_cols": list(cfg.extra_cols)}


def check_plan(cfg: InputConfig, run: RunDir) -> None:
    """Refuse a config whose input differs from the one the run's shards were cut from."""
    recorded = run.storage.read_json(run.plan).get("input", {})
    changed = {k: (recorded.get(k), v) for k, v in signature(cfg).items() if recorded.get(k) != v}
    if changed:
        lines = "\n".join(f"  - input.{k}: planned with {old!r}, now {new!r}" for k, (old, new) in changed.items())
        raise ConfigError(f"{run.root} was planned from a different input:\n{lines}\n"
                          f"start a new run (another run_dir), or restore the original input settings")


def plan(cfg: InputConfig, run: RunDir) -> list[str]:
    """Write input_shards/{shard}.parquet for every shard, then the plan (the marker); return shard names.

    Idempotent: an existing plan is the record of a finished split and is reused, provided the
    input settings are the ones it was cut from.
    """
    storage = run.storage
    if storage.exists(run.plan):
        check_plan(cfg, run)
        return run.shard_names()
    if cfg.shard_rows > MAX_SHARD_ROWS:
        raise ConfigError(f"input.shard_rows: at most {MAX_SHARD_ROWS}, got {cfg.shard_rows}")
    clash = [c for c in cfg.extra_cols if c in ALL]
    if clash:
        raise ConfigError(f"input.extra_cols: {clash} collide with manifest columns; rename them")
    files = expand(cfg.paths, storage)
    wanted = [cfg.url_col, cfg.caption_col, *cfg.extra_cols]
    shards: list[str] = []
    pending: list[pa.Table] = []
    n_pending = 0

    def flush(rows: int) -> None:
        nonlocal pending, n_pending
        table = pa.concat_tables(pending).combine_chunks()
        head, rest = table.slice(0, rows), table.slice(rows)
        index = len(shards)
        name = f"{index:05d}"
        row_id = (index << 32) | np.arange(head.num_rows, dtype=np.int64)
        head = head.add_column(0, "shard", pa.array([name] * head.num_rows))
        head = head.add_column(0, "row_id", pa.array(row_id))
        storage.write_parquet(head.add_column(0, "key", row_keys(row_id)), run.input_shard(name))
        shards.append(name)
        pending, n_pending = ([rest] if rest.num_rows else []), rest.num_rows

    total = 0
    for path in files:
        for batch in _batches(path, _format(path, cfg.format), wanted, storage):
            pending.append(pa.table(_as_strings(batch, cfg)))
            n_pending += batch.num_rows
            total += batch.num_rows
            while n_pending >= cfg.shard_rows:
                flush(cfg.shard_rows)
    if n_pending:
        flush(n_pending)
    if not shards:
        raise ConfigError(f"input.paths: the input files hold no rows: {files}")
    storage.write_json(run.plan, {"shards": shards, "rows": total, "sources": files, "input": signature(cfg)})
    return shards
