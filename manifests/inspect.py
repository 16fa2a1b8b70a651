"""Summaries of a manifest: the funnel by reason, quantiles of every score, sample rows.

Reads only the columns it needs, so it stays fast on manifests of tens of millions of rows.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from manifests.io import numeric_columns, read_manifest
from manifests.schema import REASONS

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


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


def _where(table: pa.Table, expr: str) -> pa.Table:
    """Filter with a pandas query expression, e.g. "aesthetic < 5 and style == 'cartoon'"."""
    frame = table.to_pandas()
    try:
        return pa.Table.from_pandas(frame.query(expr, engine="python"), preserve_index=False)
    except Exception as exc:
        raise ValueError(f"--where {expr!r}: {exc}") from None


def summarize(target: str, where: str | None = None, show: int = 0, seed: int = 0) -> dict:
    """Everything `curate inspect` prints, as plain data (also its --json output)."""
    path = manifest_path(target)
    table = read_manifest(path)
    if where:
        table = _where(table, where)
    n = table.num_rows
    out: dict = {"path": path, "rows": n, "where": where}
    if "reason" in table.column_names:
        counts = table.group_by("reason").aggregate([("key", "count")]).to_pylist()
        by_reason = {r["reason"]: r["key_count"] for r in counts}
        order = [r for r in REASONS if r in by_reason] + sorted(
            r for r in by_reason if r is not None and r not in REASONS)
        out["funnel"] = {"rows_in": n, "dropped": {r: by_reason[r] for r in order},
                         "kept": by_reason.get(None, 0)}
    out["quantiles"] = {}
    for col in numeric_columns(table):
        values = table.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            out["quantiles"][col] = {"count": int(len(values)),
                                     **{f"p{round(q * 100)}": float(np.quantile(values, q)) for q in QUANTILES}}
    if "style" in table.column_names:
        styles = table.group_by("style").aggregate([("key", "count")]).to_pylist()
        out["styles"] = {r["style"]: r["key_count"] for r in styles if r["style"] is not None}
    if show and n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=min(show, n), replace=False))
        cols = [c for c in ("key", "caption", "keep", "reason", "width", "height", "aesthetic", "clip_score",
                            "style") if c in table.column_names]
        out["sample"] = table.take(pa.array(idx)).select(cols).to_pylist()
    return out


def render(summary: dict, console) -> None:
    """Print a summary as rich tables sized to the terminal."""
    from rich.table import Table

    console.print(f"[bold]{summary['path']}[/bold]: {summary['rows']:,} rows"
                  + (f" where {summary['where']}" if summary.get("where") else ""))
    if "funnel" in summary:
        console.print(funnel_table(summary["funnel"]))
    if summary["quantiles"]:
        q = Table(title="Quantiles", show_lines=False)
        q.add_column("column")
        q.add_column("n", justify="right")
        for name in (f"p{round(x * 100)}" for x in QUANTILES):
            q.add_column(name, justify="right")
        for col, stats in summary["quantiles"].items():
            q.add_row(col, f"{stats['count']:,}", *[f"{stats[k]:.3g}" for k in stats if k != "count"])
        console.print(q)
    if summary.get("styles"):
        s = Table(title="Styles")
        s.add_column("style")
        s.add_column("rows", justify="right")
        for style, count in sorted(summary["styles"].items(), key=lambda kv: -kv[1]):
            s.add_row(style, f"{count:,}")
        console.print(s)
    if summary.get("sample"):
        rows = summary["sample"]
        t = Table(title="Sample rows")
        for col in rows[0]:
            t.add_column(col, overflow="fold", max_width=40 if col == "caption" else None)
        for r in rows:
            t.add_row(*["" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)) for v in r.values()])
        console.print(t)


def funnel_table(funnel: dict, title: str = "Funnel"):
    """Rows in, dropped per reason in rule order, kept: counts and shares of the input."""
    from rich.table import Table

    total = max(funnel["rows_in"], 1)
    t = Table(title=title)
    t.add_column("step")
    t.add_column("rows", justify="right")
    t.add_column("share", justify="right")
    t.add_row("rows in", f"{funnel['rows_in']:,}", "100.0%")
    for reason, count in funnel["dropped"].items():
        t.add_row(f"  dropped: {reason}", f"{count:,}", f"{100 * count / total:.1f}%")
    t.add_row("[bold]kept[/bold]", f"[bold]{funnel['kept']:,}[/bold]", f"{100 * funnel['kept'] / total:.1f}%")
    return t

