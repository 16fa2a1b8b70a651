"""One input shard's full record: its per-phase files put side by side, through the storage module.

Every phase writes one parquet file per input shard with the same rows in the same (key) order,
so a row's record is the phases' columns placed next to each other, checked by key: no hash
join, which keeps input columns of any Arrow type (lists, structs) intact.
"""
from __future__ import annotations

import pyarrow as pa

from curate.run.rundir import RunDir
from manifests.schema import ALL, DECISION, DOWNLOAD, OUTPUT, RECAPTION


def shard_table(run: RunDir, shard: str, downloaded: bool, scored: bool,
                schema: pa.Schema | None = None, recaptioned: bool = False) -> pa.Table:
    """Input (or raw) rows, scores, decisions and recaptions of one shard.

    `downloaded`/`scored`/`recaptioned` say whether that phase's result is there and current (the
    caller lists markers once);
    a missing phase contributes no columns, or null columns where `schema` names them, and the
    result then has exactly `schema`'s columns, in its order.
    """
    storage = run.storage
    base_uri = run.raw_table(shard) if downloaded else run.input_shard(shard)
    base = storage.read_parquet(base_uri)
    parts = [(run.scores(shard), None)] if scored else []
    parts.append((run.decisions(shard), ["key", *DECISION]))
    if recaptioned:
        parts.append((run.recaption(shard), ["key", *RECAPTION]))
    for uri, columns in parts:
        part = storage.read_parquet(uri, columns=columns)
        if not part.column("key").equals(base.column("key")):
            raise ValueError(f"{uri} does not hold the rows of {base_uri} in the same order")
        for name in part.column_names:
            if name not in base.column_names:
                base = base.append_column(name, part.column(name))
    if schema is None:
        return base
    unknown = [c for c in base.column_names if c not in schema.names]
    if unknown:
        raise ValueError(f"{shard}: columns {unknown} are not in the run's manifest schema")
    return pa.table([base.column(f.name) if f.name in base.column_names else pa.nulls(base.num_rows, f.type)
                     for f in schema], schema=schema)


def manifest_schema(run: RunDir, shards: list[str], downloaded: set[str], scored: set[str],
                    extra: list[str], recaption: bool = False) -> pa.Schema:
    """The manifest's columns, the same in every manifest/{shard}.parquet: input and download columns,
    the score columns (from one scored shard's footer), decisions, the recaption columns when the run
    recaptions, the output columns (out_shard, bucket)."""
    storage = run.storage
    first = next((s for s in shards if s in downloaded), None)
    base = storage.parquet(run.raw_table(first) if first else run.input_shard(shards[0])).schema_arrow
    names = list(base.names) + [c for c in DOWNLOAD if c not in base.names]
    first_scored = next((s for s in shards if s in scored), None)
    if first_scored:
        names += [c for c in storage.parquet(run.scores(first_scored)).schema_arrow.names if c not in names]
    names += [*DECISION, *(RECAPTION if recaption else ()), *OUTPUT]
    fields = []
    for name in names:
        if name in ALL:
            fields.append(pa.field(name, ALL[name].type))
        elif name in extra:
            fields.append(base.field(name))
        else:
            raise KeyError(f"column {name!r} is not declared in manifests/schema.py")
    return pa.schema(fields)


def numeric_columns(schema: pa.Schema) -> list[str]:
    """Declared numeric columns present in the schema (pHash excluded: it is an id, not a score)."""
    return [c for c in schema.names
            if c in ALL and c != "phash" and (pa.types.is_integer(ALL[c].type) or pa.types.is_floating(ALL[c].type))]
