"""Which rows the image grids show, and their 128 px thumbnails read from raw/{shard}.tar.

A fixed number of rows per grid keeps the report a few MB whatever the run size; each raw tar
is opened at most once and its scan stops as soon as every wanted image was found.
"""
from __future__ import annotations

import base64
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from manifests.schema import REASONS

THUMB = 128
PER_GRID = 12
KEPT_SAMPLE = 24
DUP_GROUPS = 6
DUP_MEMBERS = 3
BLOCK = 512
NO_IMAGE = {"shard_failed", "download_failed"}  # these rows were never stored in raw/


@dataclass
class Grid:
    title: str
    note: str
    rows: list[int]  # positions in the manifest
    marks: dict[int, str] = field(default_factory=dict)  # position -> badge, e.g. the kept member of a group
    group_starts: set[int] = field(default_factory=set)  # positions that open a duplicate group


def _mask(expr) -> np.ndarray:
    return pc.fill_null(expr, False).to_numpy(zero_copy_only=False)


def _codes(table: pa.Table, column: str) -> tuple[np.ndarray, list]:
    """Dictionary codes (NaN for null) and their values: one pass instead of a comparison per value."""
    arr = table.select([column]).unify_dictionaries().column(0).combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    return arr.indices.to_numpy(zero_copy_only=False), arr.dictionary.to_pylist()


def _sample(where: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    found = np.flatnonzero(where)
    return sorted(rng.choice(found, size=min(k, len(found)), replace=False).tolist()) if len(found) else []


def pick(table: pa.Table, seed: int = 0) -> list[Grid]:
    """Kept sample, one grid per reason with images, aesthetic extremes, duplicate groups."""
    rng = np.random.default_rng(seed)
    keep = _mask(table.column("keep"))
    codes, names = _codes(table, "reason")
    grids = [Grid("Random sample of kept images", f"{min(KEPT_SAMPLE, int(keep.sum()))} of {int(keep.sum()):,}",
                  _sample(keep, KEPT_SAMPLE, rng))]
    for name in REASONS:
        hit = codes == names.index(name) if name in names else np.zeros(len(codes), bool)
        if not hit.any():
            continue
        if name in NO_IMAGE:
            grids.append(Grid(f"Dropped: {name}", f"{int(hit.sum()):,} rows; {REASONS[name]}; no image was stored", []))
        else:
            grids.append(Grid(f"Dropped: {name}", f"{min(PER_GRID, int(hit.sum()))} of {int(hit.sum()):,}; "
                              f"{REASONS[name]}", _sample(hit, PER_GRID, rng)))
    if "aesthetic" in table.column_names and keep.any():
        score = table.column("aesthetic").to_numpy().astype(np.float64, copy=False)
        ok = np.flatnonzero(keep & np.isfinite(score))
        order = ok[np.argsort(score[ok], kind="stable")]
        grids.append(Grid("Lowest aesthetic among kept", "", order[:PER_GRID].tolist()))
        grids.append(Grid("Highest aesthetic among kept", "", order[::-1][:PER_GRID].tolist()))
    dups = duplicate_groups(table, rng)
    if dups.rows:
        grids.append(dups)
    return grids


def duplicate_groups(table: pa.Table, rng: np.random.Generator) -> Grid:
    """A few groups: the member dedup kept (marked), then up to DUP_MEMBERS rows that name it in dup_of."""
    grid = Grid("Duplicate groups", "", [])
    dup_of = table.column("dup_of")
    if dup_of.null_count == len(dup_of):
        return grid
    targets = pc.unique(dup_of.filter(pc.is_valid(dup_of)))
    chosen = targets.take(pa.array(rng.choice(len(targets), size=min(DUP_GROUPS, len(targets)), replace=False)))
    hit = np.flatnonzero(_mask(pc.is_in(table.column("key"), value_set=chosen)))
    kept_at = dict(zip(table.column("key").take(pa.array(hit)).to_pylist(), hit.tolist()))
    members = defaultdict(list)
    rows = np.flatnonzero(_mask(pc.is_in(dup_of, value_set=chosen)))
    for pos, target in zip(rows.tolist(), dup_of.take(pa.array(rows)).to_pylist()):
        if len(members[target]) < DUP_MEMBERS:
            members[target].append(pos)
    total = len(targets)
    grid.note = f"{len(kept_at)} of {total:,} groups; each starts with the member dedup kept (marked)"
    for key in chosen.to_pylist():
        if key not in kept_at:
            continue
        grid.group_starts.add(kept_at[key])
        grid.marks[kept_at[key]] = "kept member"
        grid.rows += [kept_at[key], *members[key]]
    return grid


def thumbnails(root: Path, where: dict[int, tuple[str, str]]) -> dict[int, str]:
    """Position -> data URI of a JPEG thumbnail; `where` maps positions to (shard, key).

    Rows whose image is missing (tar absent or member gone) are simply left out.
    """
    by_shard: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for pos, (shard, key) in where.items():
        by_shard[shard][f"{key}.jpg"].append(pos)
    out: dict[int, str] = {}
    for shard, wanted in by_shard.items():
        path = root / "raw" / f"{shard}.tar"
        if path.exists():
            for name, data in tar_members(path, set(wanted)):
                uri = _thumb(data)
                for pos in wanted[name]:
                    out[pos] = uri
    return out


def tar_members(path: Path, names: set[str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the wanted regular members, stopping once all are found.

    Reads each 512-byte header and seeks past the data: the stdlib's tarfile parses every header
    field in Python and costs ~0.3 ms a member, too slow for raw shards of 10k images.
    """
    left = set(names)
    long_name = None
    with open(path, "rb") as f:
        while left:
            head = f.read(BLOCK)
            if len(head) < BLOCK or head == bytes(BLOCK):
                return
            size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            kind = head[156:157]
            data_blocks = -(-size // BLOCK) * BLOCK
            if kind in (b"L", b"x"):  # GNU long name or pax header: the next member's real name
                meta = f.read(data_blocks)[:size]
                long_name = _meta_name(meta, kind) or long_name
                continue
            name = long_name or _header_name(head)
            long_name = None
            if kind in (b"0", b"\0") and name in left:
                yield name, f.read(data_blocks)[:size]
                left.discard(name)
            else:
                f.seek(data_blocks, 1)


def _header_name(head: bytes) -> str:
    name = head[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if head[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _meta_name(meta: bytes, kind: bytes) -> str | None:
    if kind == b"L":
        return meta.split(b"\0", 1)[0].decode("utf-8", "replace")
    for record in meta.decode("utf-8", "replace").splitlines():
        length_and_key, _, value = record.partition("=")
        if length_and_key.split(" ", 1)[-1] == "path":
            return value
    return None


def _thumb(data: bytes) -> str:
    """A small JPEG data URI; undecodable bytes give an empty string (shown as 'no image')."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (THUMB * 2, THUMB * 2))
            img = img.convert("RGB")
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=70)
    except (OSError, ValueError, Image.DecompressionBombError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
