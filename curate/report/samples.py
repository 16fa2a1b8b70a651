"""Which rows the image grids show, and their 128 px thumbnails read from raw/{shard}.tar.

Rows are drawn while the manifest streams by (never held whole): a fixed number per grid keeps
the report a few MB whatever the run size. Each raw tar is read at most once, and its scan stops
as soon as every wanted image was found.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.rebalance import key_hashes
from curate.rundir import RunDir
from curate.storage import is_local
from curate.tario import TruncatedTar, members
from manifests.inspect import Position, Reservoir
from manifests.schema import REASONS

THUMB = 128
PER_GRID = 12
KEPT_SAMPLE = 24
DUP_GROUPS = 6
DUP_MEMBERS = 3
DISTINCT_SKETCH = 1024   # smallest target hashes kept: exact group counts up to this, an estimate beyond
NO_IMAGE = {"shard_failed", "download_failed"}  # these rows were never stored in raw/
PASS1 = ["keep", "reason", "aesthetic", "dup_of"]
PASS2 = ["key", "dup_of", "reason"]


@dataclass
class Grid:
    title: str
    note: str
    rows: list[Position]
    marks: dict[Position, str] = field(default_factory=dict)  # position -> badge, e.g. the kept member of a group
    group_starts: set[Position] = field(default_factory=set)  # positions that open a duplicate group


def _mask(expr) -> np.ndarray:
    return pc.fill_null(expr, False).to_numpy(zero_copy_only=False)


class Extremes:
    """The k lowest (or highest) scores seen, with their positions; ties go to the earlier row."""

    def __init__(self, k: int, highest: bool):
        self.k, self.sign = k, -1.0 if highest else 1.0
        self.score = np.empty(0)
        self.pos = np.empty((0, 2), np.int64)

    def add(self, file: int, rows: np.ndarray, score: np.ndarray) -> None:
        score = np.concatenate([self.score, self.sign * score])
        pos = np.concatenate([self.pos, np.column_stack([np.full(len(rows), file), rows])])
        keep = np.lexsort((pos[:, 1], pos[:, 0], score))[:self.k]
        self.score, self.pos = score[keep], pos[keep]

    def positions(self) -> list[Position]:
        return [tuple(p) for p in self.pos.tolist()]


class Picker:
    """Pass 1 draws the grids' rows; pass 2 finds the members of the chosen duplicate groups."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kept = Reservoir(KEPT_SAMPLE, rng)
        self.dropped = {r: Reservoir(PER_GRID, rng) for r in REASONS if r not in NO_IMAGE}
        self.low, self.high = Extremes(PER_GRID, False), Extremes(PER_GRID, True)
        self.salt = np.uint64(rng.integers(0, 2**63))
        self.target_hash = np.empty(0, np.uint64)   # the smallest distinct hashes of dup_of values
        self.targets = np.empty(0, object)
        self.kept_at: dict[str, Position] = {}
        self.rep_reason: dict[str, str | None] = {}   # a representative's own reason (rebalance may drop it)
        self.members: dict[str, list[Position]] = {}

    def add(self, file: int, rows: np.ndarray, table: pa.Table) -> None:
        keep = _mask(table.column("keep"))
        self.kept.add(file, rows[keep])
        reason = table.column("reason")
        for name in pc.unique(reason.filter(pc.is_valid(reason))).to_pylist():
            if name in self.dropped:
                self.dropped[name].add(file, rows[_mask(pc.equal(reason, name))])
        if "aesthetic" in table.column_names:
            score = table.column("aesthetic").to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            ok = keep & np.isfinite(score)
            self.low.add(file, rows[ok], score[ok])
            self.high.add(file, rows[ok], score[ok])
        if "dup_of" in table.column_names:
            self._sketch(table.column("dup_of"))

    def _sketch(self, dup_of) -> None:
        """Keep the DISTINCT_SKETCH smallest (salted) hashes of dup_of values, with the values."""
        dup_of = dup_of.filter(pc.is_valid(dup_of))
        if not len(dup_of):
            return
        h = key_hashes(dup_of) ^ self.salt
        if len(self.target_hash) >= DISTINCT_SKETCH:
            small = h < self.target_hash[-1]
            dup_of, h = dup_of.filter(pa.array(small)), h[small]
        h = np.concatenate([self.target_hash, h])
        values = np.concatenate([self.targets, np.array(dup_of.to_pylist(), object)])
        h, first = np.unique(h, return_index=True)
        self.target_hash, self.targets = h[:DISTINCT_SKETCH], values[first][:DISTINCT_SKETCH]

    def chosen(self) -> list[str]:
        return self.targets[:DUP_GROUPS].tolist()

    def add_groups(self, file: int, rows: np.ndarray, table: pa.Table) -> None:
        """Pass 2: the representative each chosen group names, and its first DUP_MEMBERS members."""
        chosen = pa.array(self.chosen(), pa.string())
        if not len(chosen):
            return
        key, dup_of = table.column("key"), table.column("dup_of")
        hit = np.flatnonzero(_mask(pc.is_in(key, value_set=chosen)))
        reasons = table.column("reason").take(pa.array(hit)).to_pylist()
        for k, i, why in zip(key.take(pa.array(hit)).to_pylist(), hit.tolist(), reasons):
            self.kept_at[k] = (file, int(rows[i]))
            self.rep_reason[k] = why
        hit = np.flatnonzero(_mask(pc.is_in(dup_of, value_set=chosen)))
        for target, i in zip(dup_of.take(pa.array(hit)).to_pylist(), hit.tolist()):
            found = self.members.setdefault(target, [])
            if len(found) < DUP_MEMBERS:
                found.append((file, int(rows[i])))

    def groups(self) -> int | str:
        """Distinct duplicate groups: exact below the sketch size, else the k-minimum-values estimate."""
        if len(self.target_hash) < DISTINCT_SKETCH:
            return len(self.target_hash)
        return int((DISTINCT_SKETCH - 1) / (float(self.target_hash[-1]) / 2.0**64))

    def grids(self, reasons: dict) -> list[Grid]:
        """Kept sample, one grid per reason with images, aesthetic extremes, duplicate groups."""
        kept = reasons.get(None, 0)
        grids = [Grid("Random sample of kept images", f"{min(KEPT_SAMPLE, kept)} of {kept:,}", self.kept.positions())]
        for name in REASONS:
            count = reasons.get(name, 0)
            if not count:
                continue
            if name in NO_IMAGE:
                grids.append(Grid(f"Dropped: {name}", f"{count:,} rows; {REASONS[name]}; no image was stored", []))
            else:
                grids.append(Grid(f"Dropped: {name}", f"{min(PER_GRID, count)} of {count:,}; {REASONS[name]}",
                                  self.dropped[name].positions()))
        if len(self.low.pos):
            grids.append(Grid("Lowest aesthetic among kept", "", self.low.positions()))
            grids.append(Grid("Highest aesthetic among kept", "", self.high.positions()))
        dups = self._duplicate_grid()
        if dups.rows:
            grids.append(dups)
        return grids

    def _duplicate_grid(self) -> Grid:
        """A few groups: the representative dedup kept (marked; the style rebalance may drop it
        afterwards, and the mark says so), then up to DUP_MEMBERS rows that name it in dup_of."""
        grid = Grid("Duplicate groups", "", [])
        shown = [k for k in self.chosen() if k in self.kept_at]
        total = self.groups()
        grid.note = (f"{len(shown)} of {'about ' if len(self.target_hash) >= DISTINCT_SKETCH else ''}{total:,} groups; "
                     f"each starts with its representative (marked), the row dedup kept and every member "
                     f"is within the distance of")
        for key in shown:
            start = self.kept_at[key]
            grid.group_starts.add(start)
            why = self.rep_reason.get(key)
            grid.marks[start] = "representative" + (f", then dropped: {why}" if why else "")
            grid.rows += [start, *self.members.get(key, [])]
        return grid


def thumbnails(run: RunDir, where: dict[Position, tuple[str, str]]) -> dict[Position, str]:
    """Position -> data URI of a JPEG thumbnail; `where` maps positions to (shard, key).

    Rows whose image is missing (tar absent, cut off, or member gone) are simply left out.
    """
    by_shard: dict[str, dict[str, list[Position]]] = {}
    for pos, (shard, key) in where.items():
        by_shard.setdefault(shard, {}).setdefault(f"{key}.jpg", []).append(pos)
    out: dict[Position, str] = {}
    storage = run.storage
    for shard, wanted in sorted(by_shard.items()):
        uri = run.raw_tar(shard)
        if not storage.exists(uri):
            continue
        # a local tar is seeked through; an object is streamed (a range request per member would be slower)
        with (storage.open_random(uri) if is_local(uri) else storage.open_input(uri)) as f:
            try:
                for name, data in members(f, set(wanted)):
                    uri_ = _thumb(data)
                    for pos in wanted[name]:
                        out[pos] = uri_
            except TruncatedTar:
                continue
    return out


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
