"""Reading a run's per-shard tables and joining them into one manifest view.

Every phase writes one parquet file per input shard, sorted by key; a row's full record is
the join of raw (download), scores and decisions on `key`.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import ALL


def _read(path: Path, columns: list[str] | None) -> pa.Table | None:
    if not path.exists():
        return None
    have = pq.ParquetFile(path).schema_arrow.names
    return pq.read_table(path, columns=[c for c in dict.fromkeys(columns) if c in have] if columns else None)


def shard_table(root: Path, shard: str, columns: list[str] | None = None,
                stages: tuple[str, ...] = ("raw", "scores", "decisions")) -> pa.Table:
    """One shard's rows with the requested columns from every stage that has been written.

    Stages not yet written simply contribute no columns; missing columns are absent, not null.
    """
    # A shard whose download failed has no raw file: its input rows still stand for it.
    base = _read(root / "raw" / f"{shard}.parquet", columns and ["key", *columns]) \
        or _read(root / "input_shards" / f"{shard}.parquet", columns and ["key", *columns])
    if base is None:
        raise FileNotFoundError(f"{root / 'input_shards' / (shard + '.parquet')} is missing: run `curate download`")
    for stage in stages[1:]:
        part = _read(root / stage / f"{shard}.parquet", columns and ["key", *columns])
        if part is None:
            continue
        part = part.drop_columns([c for c in part.column_names if c in base.column_names and c != "key"])
        if part.num_rows != base.num_rows:
            raise ValueError(f"{stage}/{shard}.parquet has {part.num_rows} rows, raw has {base.num_rows}")
        base = base.join(part, "key", join_type="left outer").sort_by("key")
    return base


def run_table(root: Path, shards: list[str], columns: list[str] | None = None,
              stages: tuple[str, ...] = ("raw", "scores", "decisions")) -> pa.Table:
    """All shards' rows, concatenated in shard order (columns absent in a shard become null)."""
    tables = [shard_table(root, s, columns, stages) for s in shards]
    return pa.concat_tables(tables, promote_options="permissive")


def numeric_columns(table: pa.Table) -> list[str]:
    """Declared numeric columns present in the table (pHash excluded: it is an id, not a score)."""
    return [c for c in table.column_names
            if c in ALL and c != "phash" and (pa.types.is_integer(ALL[c].type) or pa.types.is_floating(ALL[c].type))]
