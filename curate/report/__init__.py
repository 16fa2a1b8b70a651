"""RUN_DIR/report.html: the funnel, score histograms with thresholds, style balance and image grids.

Written after every run and by `curate report RUN_DIR`; one self-contained file that opens offline.
The run directory may be local or on object storage: everything goes through the storage module.
"""
from __future__ import annotations

import logging
import time

from curate.inspect import Position, filtered, open_manifest
from curate.report import data, page
from curate.report.samples import PASS1, PASS2, Picker, thumbnails
from curate.run.rundir import RunDir
from curate.run.storage import Storage
from filters.declare import Scorer
from filters.registry import SCORERS

log = logging.getLogger("curate")  # curate.run.runtime's logger, without importing torch through it


def card_columns(scorers: tuple[Scorer, ...] = SCORERS) -> list[str]:
    """What a sampled row's card reads: its identity, caption and reason, and the declarations' shown scores."""
    return ["key", "shard", "caption", "caption_norm", "reason", *page.card_scores(scorers)]


CARD_COLUMNS = card_columns()


def build_report(root: str, seed: int = 0, storage: Storage | None = None) -> str:
    """Write RUN_DIR/report.html from the run's files and return its URI."""
    started = time.time()
    run = RunDir(str(root), storage or Storage())
    manifest = open_manifest(run.root, run.storage)
    info = data.load_run(run.root, run.storage)
    tally, picker = data.Tally(manifest.count_rows(), seed), Picker(seed)
    for file, rows, table in filtered(manifest, [*data.LIGHT, *PASS1], None):
        tally.add(table)
        picker.add(file, rows, table)
    hists = data.axes(tally, info)
    for file, rows, table in filtered(manifest, [*data.pass2_columns(hists), *PASS2], None):
        data.fill(hists, table)
        picker.add_groups(file, rows, table)
    grids = picker.grids(tally.reasons)
    positions = sorted({p for g in grids for p in g.rows})
    rows = _rows(manifest, positions)
    thumbs = thumbnails(run, {p: (rows[p]["shard"], rows[p]["key"]) for p in positions})
    nsfw_max = data.threshold(info, "filters.nsfw_max")
    sections = []
    for grid in grids:
        cards = [page.card(rows[p], thumbs.get(p, ""), grid.marks.get(p), p in grid.group_starts,
                           _blurred(rows[p], nsfw_max)) for p in grid.rows]
        sections.append(page.grid_section(grid, cards))
    html = page.page(info, tally.funnel(), hists, tally.style_balance(), "".join(sections))
    uri = run.file("report.html")
    run.storage.write_text(uri, html)
    log.info("report: %s (%.1f MB, %d thumbnails) in %.1f s", uri, len(html) / 1e6, len(thumbs),
             time.time() - started)
    return uri


def _rows(manifest, positions: list[Position]) -> dict[Position, dict]:
    """Caption and scores of the sampled rows only, read from the row groups that hold them."""
    if not positions:
        return {}
    return dict(zip(positions, manifest.rows(positions, CARD_COLUMNS).to_pylist()))


def _blurred(row: dict, nsfw_max: float | None) -> bool:
    """NSFW-rejected rows, and any row whose NSFW score reaches the threshold, are hidden behind a click."""
    score = row.get("nsfw")
    return row.get("reason") == "nsfw" or (nsfw_max is not None and score is not None and score >= nsfw_max)
