"""The sample record: which manifest columns a shard's `{key}.json` carries, and how they are encoded.

Both the writer (curate/phases/write/phase.py) and the dataset card (curate/phases/write/card.py) read these rules,
so the
card's column table is the JSON the shards hold.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from manifests.schema import PLAN

# Manifest-only columns: every sample is kept, and the plan's columns are provenance, not data.
SAMPLE_EXCLUDE = {"keep", "reason", "dup_of", "out_shard", *PLAN}


def hex_in_json(kind: pa.DataType) -> bool:
    """64-bit hashes (pHash and its views) go into the JSON as 16 hex digits: as numbers they exceed
    the int64 that JSON readers (Hugging Face datasets, pandas, DuckDB) infer, and lose bits as doubles."""
    return pa.types.is_uint64(kind) or (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) \
        and pa.types.is_uint64(kind.value_type)


def sample_json(table: pa.Table) -> list[bytes]:
    """Each row's sample .json: every column but SAMPLE_EXCLUDE, keys sorted, 64-bit hashes as 16 hex
    digits, NaN and infinities as null."""
    names = sorted(c for c in table.column_names if c not in SAMPLE_EXCLUDE)
    values = []
    for name in names:
        col = table.column(name)
        if pa.types.is_uint64(col.type):
            values.append([None if v is None else f"{v:016x}" for v in col.to_pylist()])
            continue
        if hex_in_json(col.type):
            values.append([None if vs is None else [f"{v:016x}" for v in vs] for vs in col.to_pylist()])
            continue
        if pa.types.is_floating(col.type):
            col = pc.if_else(pc.is_finite(col), col, pa.scalar(None, col.type))
        values.append(col.to_pylist())
    return [json.dumps(dict(zip(names, row)), ensure_ascii=False, sort_keys=True, allow_nan=False,
                       default=str).encode("utf-8") for row in zip(*values)]

