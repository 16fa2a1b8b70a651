"""RUN_DIR/report.html: the funnel, score histograms with thresholds, style balance and image grids.

Written after every run and by `curate report RUN_DIR`; one self-contained file that opens offline.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from curate.report import data, page
from curate.report.samples import pick, thumbnails
from curate.rundir import write_text
from manifests.inspect import take_rows

log = logging.getLogger("curate")  # curate.runtime's logger, without importing torch through it
CARD_COLUMNS = ["key", "shard", "caption", "caption_norm", "reason", *page.CARD_SCORES]


def build_report(root: str | Path, seed: int = 0) -> Path:
    """Write RUN_DIR/report.html from the run's files and return its path."""
    started = time.time()
    root = Path(root)
    run = data.load_run(root)
    pf, table = data.read_light(root)
    funnel = data.funnel(table)
    grids = pick(table, seed)
    positions = sorted({p for g in grids for p in g.rows})
    rows = _rows(pf, positions)
    thumbs = thumbnails(root, {p: (rows[p]["shard"], rows[p]["key"]) for p in positions})
    nsfw_max = data.setting(run.config, "filters.nsfw_max")
    sections = []
    for grid in grids:
        cards = [page.card(rows[p], thumbs.get(p, ""), grid.marks.get(p), p in grid.group_starts,
                           _blurred(rows[p], nsfw_max)) for p in grid.rows]
        sections.append(page.grid_section(grid, cards))
    html = page.page(run, funnel, data.histograms(table, run.config), data.style_balance(table), "".join(sections))
    path = root / "report.html"
    write_text(html, path)
    log.info("report: %s (%.1f MB, %d thumbnails) in %.1f s", path, len(html) / 1e6, len(thumbs),
             time.time() - started)
    return path


def _rows(pf, positions: list[int]) -> dict[int, dict]:
    """Caption and scores of the sampled rows only, read from the row groups that hold them."""
    if not positions:
        return {}
    table = take_rows(pf, np.array(positions), CARD_COLUMNS)
    return dict(zip(positions, table.to_pylist()))


def _blurred(row: dict, nsfw_max: float | None) -> bool:
    """NSFW-rejected rows, and any row whose NSFW score reaches the threshold, are hidden behind a click."""
    score = row.get("nsfw")
    return row.get("reason") == "nsfw" or (nsfw_max is not None and score is not None and score >= nsfw_max)

