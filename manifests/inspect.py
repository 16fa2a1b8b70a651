"""Summaries of a manifest: the funnel by reason, quantiles of every score, style counts, sample rows.

Reads only the columns it needs (the where-expression's names included), the low-cardinality ones
dictionary-encoded, and sample rows from only the row groups that hold them, so it stays fast on
manifests of tens of millions of rows.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.io import numeric_columns
from manifests.schema import REASONS
from manifests.where import WhereError, columns as where_columns, compile_where

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
CATEGORICAL = ["shard", "status", "reason", "style", "out_shard"]
SAMPLE_COLUMNS = ("key", "caption", "keep", "reason", "width", "height", "aesthetic", "clip_score", "style")


def manifest_path(target: str) -> str:
    """A run directory means its manifest.parquet; anything else is a parquet path or URL."""
    if "://" not in target and Path(target).is_dir():
        path = Path(target) / "manifest.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run `curate write` on that run first")
        return str(path)
    if "://" not in target and not Path(target).exists():
        raise FileNotFoundError(f"no such run directory or manifest: {target}")
    return target


def open_manifest(target: str) -> pq.ParquetFile:
    """The manifest of a run directory, parquet path or fsspec URL, categorical columns as dictionaries."""
    path = manifest_path(target)
    filesystem = None
    if "://" in path:
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(path)
    plain = pq.ParquetFile(path, filesystem=filesystem)
    categorical = [c for c in CATEGORICAL if c in plain.schema_arrow.names]
    return pq.ParquetFile(path, filesystem=filesystem, metadata=plain.metadata, read_dictionary=categorical)


def read_columns(pf: pq.ParquetFile, names: list[str]) -> pa.Table:
    """Only the named columns that exist, each read once (row groups in parallel)."""
    have = set(pf.schema_arrow.names)
    return pf.read(columns=[c for c in dict.fromkeys(names) if c in have])


def take_rows(pf: pq.ParquetFile, rows: np.ndarray, names: list[str]) -> pa.Table:
    """Rows by position (in the given order), reading only the row groups that hold them."""
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


def funnel_of(reason: pa.ChunkedArray | pa.Array) -> dict:
    """Rows in, dropped per reason in REASONS order (unknown names after, sorted), kept (null reason)."""
    counts = {}
    for item in pc.value_counts(reason).to_pylist():
        counts[item["values"]] = item["counts"]
    order = [r for r in REASONS if r in counts] + sorted(r for r in counts if r is not None and r not in REASONS)
    return {"rows_in": len(reason), "dropped": {r: counts[r] for r in order}, "kept": counts.get(None, 0)}


def quantiles(column: pa.ChunkedArray) -> dict | None:
    """Count of finite values and exact p1..p99 (Arrow's selection, no float64 copy), None if none."""
    finite = column.filter(pc.is_finite(column))
    if not len(finite):
        return None
    qs = pc.quantile(finite, q=list(QUANTILES)).to_pylist()
    return {"count": len(finite), **{f"p{round(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)}}


def summarize(target: str, where: str | None = None, show: int = 0, seed: int = 0) -> dict:
    """Everything `curate inspect` prints, as plain data (also its --json output)."""
    pf = open_manifest(target)
    names = pf.schema_arrow.names
    numeric = numeric_columns(pf.schema_arrow.empty_table())
    needed = ["reason", "style", *numeric]
    if where:
        try:
            expr = compile_where(where, names)
        except WhereError as exc:
            raise ValueError(f"--where {where!r}: {exc}") from None
        needed += where_columns(where)
    table = read_columns(pf, needed)
    rows = np.arange(table.num_rows)
    if where:
        table = table.append_column("_row", pa.array(rows))
        try:
            table = table.filter(expr)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ValueError(f"--where {where!r}: {exc}") from None
        rows = table.column("_row").to_numpy()
    out: dict = {"path": manifest_path(target), "rows": table.num_rows, "where": where}
    if "reason" in table.column_names:
        out["funnel"] = funnel_of(table.column("reason"))
    with ThreadPoolExecutor() as pool:  # Arrow releases the GIL: one column per core
        found = pool.map(quantiles, [table.column(c) for c in numeric if c in table.column_names])
    out["quantiles"] = {c: q for c, q in zip([c for c in numeric if c in table.column_names], found) if q}
    if "style" in table.column_names:
        styles = pc.value_counts(table.column("style")).to_pylist()
        out["styles"] = {s["values"]: s["counts"] for s in sorted(styles, key=lambda s: -s["counts"])
                         if s["values"] is not None}
    if show and len(rows):
        picked = np.sort(np.random.default_rng(seed).choice(rows, size=min(show, len(rows)), replace=False))
        out["sample"] = take_rows(pf, picked, list(SAMPLE_COLUMNS)).to_pylist()
    return out


def render(summary: dict, console) -> None:
    """Print a summary as rich tables sized to the terminal."""
    from rich.table import Table

    console.print(f"[bold]{summary['path']}[/bold]: {summary['rows']:,} rows"
                  + (f" where {summary['where']}" if summary.get("where") else ""), highlight=False)
    if "funnel" in summary:
        console.print(funnel_table(summary["funnel"]))
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
    if summary.get("sample"):
        rows = summary["sample"]
        t = Table(title="Sample rows")
        for col in rows[0]:
            t.add_column(col, overflow="fold", max_width=40 if col == "caption" else None)
        for r in rows:
            t.add_row(*[_cell(v) for v in r.values()])
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


def funnel_table(funnel: dict, title: str = "Funnel"):
    """Rows in, dropped per reason in rule order, kept: counts, shares of the input and a bar."""
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
    return t
