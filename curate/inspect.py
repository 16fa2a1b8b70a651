"""Summaries of a manifest: the funnel by reason, quantiles of every score, style and bucket counts, sample rows.

A manifest is a parquet dataset: a run's `manifest/` folder (one file per input shard), any folder
of parquet files, or one file, local or a URL (s3://, or any fsspec scheme). It is streamed batch
by batch with only the columns needed (the where-expression's names included) and never held
whole: counts are exact, quantiles come from a bounded uniform sample (exact up to SAMPLE rows),
and sample rows are read back from the row groups that hold them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curate.phases.write.record import numeric_columns
from curate.run.storage import Storage, join
from filters.declare import Scorer
from filters.registry import SCORERS, shown
from manifests import ranks
from manifests.funnel import Funnel
from manifests.where import WhereError, compile_where
from manifests.where import columns as where_columns

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# The sample rows' identity, decision and output columns; the scores shown are the declarations' (`shown`).
SAMPLE_IDENTITY = ("key", "caption", "recaption", "keep", "reason", "width", "height", "bucket")
SAMPLE = 200_000      # values per column kept for quantiles: rank error about 1/sqrt(SAMPLE) beyond
BATCH_ROWS = 65_536

Position = tuple[int, int]   # (file index, row within the file)


def sample_columns(scorers: tuple[Scorer, ...] = SCORERS) -> tuple[str, ...]:
    """What `--show` prints of a row: its identity and decision, then every column a scorer marks shown."""
    return (*SAMPLE_IDENTITY, *shown(scorers))


SAMPLE_COLUMNS = sample_columns()


@dataclass
class Manifest:
    """The parquet files of a manifest, in name order, as one dataset."""

    label: str
    fs: pafs.FileSystem
    files: list[str]

    def __post_init__(self) -> None:
        self.dataset = ds.dataset(self.files, filesystem=self.fs, format="parquet")
        self._index = {path: i for i, path in enumerate(self.files)}

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def count_rows(self) -> int:
        return self.dataset.count_rows()

    def scan(self, names: list[str]) -> Iterator[tuple[int, int, pa.RecordBatch]]:
        """(file index, row offset in that file, batch) of the named columns that exist, in order."""
        cols = [c for c in dict.fromkeys(names) if c in self.schema.names]
        offsets: dict[int, int] = {}
        scanner = self.dataset.scanner(columns=cols, batch_size=BATCH_ROWS, use_threads=True)
        for tagged in scanner.scan_batches():
            i = self._index[tagged.fragment.path]
            offset = offsets.get(i, 0)
            offsets[i] = offset + tagged.record_batch.num_rows
            yield i, offset, tagged.record_batch

    def rows(self, positions: list[Position], names: list[str]) -> pa.Table:
        """The rows at the given positions, in that order, reading only the row groups that hold them."""
        names = [c for c in dict.fromkeys(names) if c in self.schema.names]
        parts, at = [], {}
        done = 0
        for i in sorted({i for i, _ in positions}):
            wanted = sorted({row for f, row in positions if f == i})
            parts.append(take_rows(pq.ParquetFile(self.fs.open_input_file(self.files[i])), np.array(wanted), names))
            at.update({(i, row): done + k for k, row in enumerate(wanted)})
            done += len(wanted)
        if not parts:
            return self.schema.empty_table().select(names)
        return pa.concat_tables(parts).take(pa.array([at[p] for p in positions], pa.int64()))


def _parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith(("_", ".")))


def open_manifest(target: str, storage: Storage | None = None) -> Manifest:
    """A run directory (its manifest/ folder), a folder of parquet files, or one parquet file."""
    fs, path = (storage or Storage()).resolve(target)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.File:
        return Manifest(target, fs, [path])
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such run directory or manifest: {target}")
    for label, folder in ((join(target, "manifest"), f"{path}/manifest"), (target, path)):
        files = _parquet_files(fs, folder)
        if files:
            return Manifest(label, fs, files)
    raise FileNotFoundError(f"{target} holds no manifest (no manifest/*.parquet): run `curate write` on it first")


def take_rows(pf: pq.ParquetFile, rows: np.ndarray, names: list[str]) -> pa.Table:
    """Rows of one file by position (in the given order), reading only the row groups that hold them."""
    names = [c for c in dict.fromkeys(names) if c in pf.schema_arrow.names]
    rows = np.asarray(rows, dtype=np.int64)
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    group = np.searchsorted(starts, rows, side="right") - 1
    wanted = np.unique(group)
    part = pf.read_row_groups(wanted.tolist(), columns=names)
    offset = np.concatenate([[0], np.cumsum([sizes[g] for g in wanted])])
    local = offset[np.searchsorted(wanted, group)] + rows - starts[group]
    return part.take(pa.array(local))


def value_counts(column: pa.Array | pa.ChunkedArray, into: dict) -> dict:
    """Add a column's value counts (nulls under None) to `into`."""
    for item in pc.value_counts(column).to_pylist():
        into[item["values"]] = into.get(item["values"], 0) + item["counts"]
    return into


class Sampler:
    """A bounded uniform sample of a numeric column's finite values, and their exact count."""

    def __init__(self, rate: float, seed: int = 0):
        self.rate, self.count, self.parts = rate, 0, []
        self.rng = np.random.default_rng(seed)

    def add(self, column: pa.Array) -> None:
        v = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        v = v[np.isfinite(v)]
        self.count += len(v)
        self.parts.append(v if self.rate >= 1 else v[self.rng.random(len(v)) < self.rate])

    def values(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.empty(0)

    def quantiles(self) -> dict | None:
        """Count of finite values and p1..p99, None if none."""
        v = self.values()
        if not len(v):
            return None
        quantiles = zip(QUANTILES, np.quantile(v, QUANTILES))
        return {"count": self.count, **{f"p{round(q * 100)}": float(x) for q, x in quantiles}}


class Reservoir:
    """k positions drawn uniformly from a stream (smallest random priorities), deterministic per seed."""

    def __init__(self, k: int, rng: np.random.Generator):
        self.k, self.rng = k, rng
        self.prio = np.empty(0)
        self.pos = np.empty((0, 2), np.int64)

    def add(self, file: int, rows: np.ndarray) -> None:
        if not self.k or not len(rows):
            return
        prio = np.concatenate([self.prio, self.rng.random(len(rows))])
        pos = np.concatenate([self.pos, np.column_stack([np.full(len(rows), file), rows])])
        keep = np.argsort(prio, kind="stable")[:self.k]
        self.prio, self.pos = prio[keep], pos[keep]

    def positions(self) -> list[Position]:
        return sorted(map(tuple, self.pos.tolist()))


def filtered(manifest: Manifest, names: list[str], where: str | None) -> Iterator[tuple[int, np.ndarray, pa.Table]]:
    """(file index, row positions in the file, rows) of every batch, the where-expression applied."""
    expr = None
    if where:
        try:
            expr = compile_where(where, manifest.schema.names)
        except WhereError as exc:
            raise ValueError(f"--where {where!r}: {exc}") from None
        names = [*names, *where_columns(where)]
    for i, offset, batch in manifest.scan(names):
        rows = offset + np.arange(batch.num_rows)
        table = pa.Table.from_batches([batch])
        if expr is not None:
            table = table.append_column("_row", pa.array(rows))
            try:
                table = table.filter(expr)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
                raise ValueError(f"--where {where!r}: {exc}") from None
            rows = table.column("_row").to_numpy()
            table = table.drop_columns(["_row"])
        yield i, rows, table


def summarize(target: str, where: str | None = None, show: int = 0, seed: int = 0,
              storage: Storage | None = None, bucket: str | None = None,
              scorers: tuple[Scorer, ...] = SCORERS) -> dict:
    """Everything `curate inspect` prints, as plain data (also its --json output); `bucket` keeps the
    rows of one training resolution (e.g. "1152x896"), on top of `where`; the sample rows show the
    `shown` columns of `scorers`."""
    manifest = open_manifest(target, storage)
    if bucket is not None:
        if "bucket" not in manifest.schema.names:
            raise ValueError(f"--bucket {bucket!r}: {manifest.label} has no bucket column (written with "
                             f"write.buckets: null, or before buckets existed)")
        where = f"bucket == {bucket!r}" + (f" and ({where})" if where else "")
    numeric = numeric_columns(manifest.schema)
    rate = SAMPLE / max(manifest.count_rows(), 1)
    samplers = {c: Sampler(rate, seed) for c in numeric}
    reasons: dict = {}
    styles: dict = {}
    buckets: dict = {}
    picked = Reservoir(show, np.random.default_rng(seed))
    rows = 0
    statuses: dict = {}
    lengths = CaptionLengths(rate, seed) if "recaption" in manifest.schema.names else None
    for i, positions, table in filtered(manifest, ["reason", "status", "style", "bucket", *numeric,
                                                   *(CaptionLengths.COLUMNS if lengths else ())], where):
        rows += table.num_rows
        if lengths:
            lengths.add(table)
        if "reason" in table.column_names:
            value_counts(table.column("reason"), reasons)
        if "status" in table.column_names:
            value_counts(table.column("status"), statuses)
        if "style" in table.column_names:
            value_counts(table.column("style"), styles)
        if "bucket" in table.column_names:
            value_counts(table.column("bucket"), buckets)
        for c, sampler in samplers.items():
            sampler.add(table.column(c))
        picked.add(i, positions)
    out: dict = {"path": manifest.label, "rows": rows, "where": where}
    decided = join(target, "decisions", "_decided.json")
    if (storage or Storage()).exists(decided):   # a run directory: the thresholds decide resolved from ranks
        out["thresholds"] = (storage or Storage()).read_json(decided).get("thresholds") or {}
    clip = clip_source(manifest.schema)
    if clip:
        out["clip_score_from"] = clip
    if "reason" in manifest.schema.names:
        out["funnel"] = Funnel.of_counts(reasons).to_dict()
        out["not_requested"] = statuses.get("not_requested", 0)
    out["quantiles"] = {c: q for c, q in ((c, s.quantiles()) for c, s in samplers.items()) if q}
    if "style" in manifest.schema.names:
        out["styles"] = {s: n for s, n in sorted(styles.items(), key=lambda kv: -kv[1]) if s is not None}
    if "bucket" in manifest.schema.names:
        out["buckets"] = {b: n for b, n in sorted(buckets.items(), key=lambda kv: -kv[1]) if b is not None}
    if lengths:
        out["caption_lengths"] = lengths.summary()
    if show and rows:
        out["sample"] = manifest.rows(picked.positions(), list(sample_columns(scorers))).to_pylist()
    return out


class CaptionLengths:
    """Caption lengths before and after recaptioning, over the rows that have a recaption (the same rows
    on both sides), and why the other kept rows have none."""

    COLUMNS = ("keep", "caption_norm", "recaption", "recaption_error")

    def __init__(self, rate: float, seed: int = 0):
        self.before, self.after = Sampler(rate, seed), Sampler(rate, seed)
        self.errors: dict = {}
        self.kept = 0

    def add(self, table: pa.Table) -> None:
        kept = table.filter(pc.fill_null(table.column("keep"), False))
        self.kept += kept.num_rows
        has = kept.filter(pc.is_valid(kept.column("recaption")))
        self.before.add(pc.utf8_length(pc.fill_null(has.column("caption_norm"), "")))
        self.after.add(pc.utf8_length(has.column("recaption")))
        kinds = pc.list_element(pc.split_pattern(kept.column("recaption_error"), ":", max_splits=1), 0)   # before ':'
        value_counts(pc.drop_null(kinds), self.errors)

    def summary(self) -> dict:
        return {"kept": self.kept, "recaptioned": self.after.count, "original": self.before.quantiles(),
                "recaption": self.after.quantiles(),
                "without": dict(sorted(self.errors.items(), key=lambda kv: -kv[1]))}


def clip_source(schema: pa.Schema) -> dict | None:
    """Which CLIP backend and model produced clip_score, from the manifest's metadata (models.json)."""
    raw = (schema.metadata or {}).get(b"curate.models")
    return json.loads(raw).get("clip_score") if raw else None


def render(summary: dict, console) -> None:
    """Print a summary as rich tables sized to the terminal."""
    from rich.table import Table

    console.print(f"[bold]{summary['path']}[/bold]: {summary['rows']:,} rows"
                  + (f" where {summary['where']}" if summary.get("where") else ""), highlight=False)
    clip = summary.get("clip_score_from")
    if clip:
        console.print(f"clip_score from [bold]{clip['backend']}[/bold]: {clip['model']} (image side: {clip['image']}; "
                      f"weights {clip['weights']}); not comparable across backends", highlight=False)
    if "funnel" in summary:
        console.print(funnel_table(summary["funnel"], not_requested=summary.get("not_requested", 0)))
    for key, found in (summary.get("thresholds") or {}).items():
        console.print(f"{key} = {found['rank']} resolved to {ranks.describe(found)}", highlight=False)
    if summary["quantiles"]:
        q = Table(title="Quantiles")
        q.add_column("column", no_wrap=True, overflow="ellipsis")
        q.add_column("n", justify="right")
        for name in (f"p{round(x * 100)}" for x in QUANTILES):
            q.add_column(name, justify="right", min_width=5)
        for col, stats in summary["quantiles"].items():
            q.add_row(col, _short(stats["count"]), *[_short(stats[k]) for k in stats if k != "count"])
        console.print(q)
    if summary.get("styles"):
        total = max(sum(summary["styles"].values()), 1)
        s = Table(title="Styles")
        s.add_column("style")
        s.add_column("rows", justify="right")
        s.add_column("share", justify="right")
        for style, count in summary["styles"].items():
            s.add_row(style, f"{count:,}", f"{100 * count / total:.1f}%")
        console.print(s)
    if summary.get("buckets"):
        total = max(sum(summary["buckets"].values()), 1)
        b = Table(title="Buckets (kept rows)")
        b.add_column("bucket")
        b.add_column("rows", justify="right")
        b.add_column("share", justify="right")
        for bucket, count in summary["buckets"].items():
            b.add_row(bucket, f"{count:,}", f"{100 * count / total:.1f}%")
        console.print(b)
    lengths = summary.get("caption_lengths")
    if lengths:
        t = Table(title=f"Caption lengths in characters: {lengths['recaptioned']:,} of {lengths['kept']:,} kept rows "
                        f"have a recaption")
        t.add_column("caption", no_wrap=True)
        for name in (f"p{round(x * 100)}" for x in QUANTILES):
            t.add_column(name, justify="right", min_width=5)
        for side in ("original", "recaption"):
            if lengths[side]:
                t.add_row(side, *[_short(v) for k, v in lengths[side].items() if k != "count"])
        console.print(t)
        for kind, count in lengths["without"].items():
            console.print(f"  no recaption: {kind}: {count:,}", highlight=False)
    if summary.get("sample"):
        rows = summary["sample"]
        t = Table(title="Sample rows (one column each)")   # one row per field: a dozen shown scores still fit
        t.add_column("column", no_wrap=True)
        for _ in rows:
            t.add_column("", overflow="fold", max_width=40)
        for col in rows[0]:
            t.add_row(col, *[_cell(r[col]) for r in rows])
        console.print(t)


def _short(x: float) -> str:
    """At most ~5 characters, so nine quantile columns fit an 80-column terminal."""
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.3g}M"
    if ax >= 1e4:
        return f"{x / 1e3:.3g}k"
    if ax >= 100 or x == int(x):
        return f"{x:.0f}"
    if ax >= 1:
        return f"{x:.3g}"
    return f"{x:.3f}" if ax >= 0.01 else f"{x:.0e}"


def _cell(value) -> str:
    """A table cell: floats to 3 digits, long text cut (the JSON output keeps it whole)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 80 else text[:79] + "…"


def funnel_table(funnel: dict, title: str = "Funnel", not_requested: int = 0):
    """Rows in, dropped per reason in rule order, kept: counts, shares of the input and a bar; beneath, the
    rows never requested (a rule before download dropped them)."""
    from rich.table import Table

    total = max(funnel["rows_in"], 1)
    t = Table(title=title)
    t.add_column("step", no_wrap=True)
    t.add_column("rows", justify="right")
    t.add_column("share", justify="right")
    t.add_column("", no_wrap=True, max_width=20)

    def bar(count: int) -> str:
        return "█" * round(20 * count / total)

    t.add_row("rows in", f"{funnel['rows_in']:,}", "100.0%", f"[dim]{bar(funnel['rows_in'])}[/dim]")
    for reason, count in funnel["dropped"].items():
        t.add_row(f"  dropped: {reason}", f"{count:,}", f"{100 * count / total:.1f}%", f"[red]{bar(count)}[/red]")
    t.add_row("[bold]kept[/bold]", f"[bold]{funnel['kept']:,}[/bold]", f"{100 * funnel['kept'] / total:.1f}%",
              f"[green]{bar(funnel['kept'])}[/green]")
    if not_requested:
        n = not_requested
        t.caption = f"never downloaded (dropped before download): {n:,} rows, {100 * n / total:.1f}%"
    return t
