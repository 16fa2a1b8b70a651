"""The report's HTML: one file, inline CSS, SVG and thumbnails, a few lines of script, no network."""
from __future__ import annotations

import platform
import re
from html import escape
from importlib import metadata

from curate.report import svg
from curate.report.data import Histogram, Run, described, why_off
from curate.report.samples import Grid
from curate.run.failures import describe
from curate.run.storage import name as base_name
from filters.declare import Scorer
from filters.registry import SCORERS
from manifests.rules import RULES
from manifests.schema import ERROR_KINDS, REASONS

VERSIONED = ("curate-zh", "ray", "torch", "open-clip-torch", "timm", "pyarrow", "pillow", "img2dataset")


def card_scores(scorers: tuple[Scorer, ...] = SCORERS) -> tuple[str, ...]:
    """The declarations' `shown` columns, the model scorers' first (the three under a thumbnail)."""
    return tuple(c.name for s in sorted(scorers, key=lambda s: not s.optional) for c in s.columns if c.shown)


CARD_SCORES = card_scores()

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:0 20px 40px;color:#222}
h1{font-size:22px;margin:18px 0 6px} h2{margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:4px}
.alert{padding:10px 14px;margin:8px 0;border-radius:6px;font-weight:600}
.alert.danger{background:#c0392b;color:#fff;font-size:17px} .alert.warn{background:#fdebd0;border:1px solid #e67e22}
table{border-collapse:collapse;margin:8px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:14px} .chart-card{border:1px solid #ddd;border-radius:6px;padding:8px}
.chart-card h3{font-size:14px;margin:0} .chart-card p{margin:2px 0;font-size:12px;color:#555;max-width:380px}
svg.chart text{font-size:11px;fill:#333}
.grid{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;width:136px;font-size:11px;position:relative}
figure .frame{width:128px;height:128px;display:flex;align-items:center;justify-content:center;background:#f3f3f3;
overflow:hidden;border:2px solid transparent} figure img{max-width:128px;max-height:128px}
figure.group-start{margin-left:18px} figure.marked .frame{border-color:#2e9e5b}
.badge{position:absolute;top:2px;left:2px;background:#2e9e5b;color:#fff;padding:0 4px;border-radius:3px}
figcaption{overflow:hidden;display:-webkit-box;-webkit-line-clamp:3;-webkit-box-orient:vertical}
.scores{color:#666} .missing{color:#999}
figure.nsfw img{filter:blur(18px)} figure.nsfw .frame{cursor:pointer}
figure.nsfw .frame::after{content:"NSFW: click to show";position:absolute;top:52px;left:6px;right:14px;
text-align:center;background:#000a;color:#fff;padding:2px} figure.nsfw.revealed img{filter:none}
figure.nsfw.revealed .frame::after{display:none}
pre{background:#f6f6f6;padding:10px;overflow:auto;max-height:480px}
"""
SCRIPT = """document.addEventListener('click', function (e) {
  var fig = e.target.closest('figure.nsfw'); if (fig) fig.classList.toggle('revealed');
});"""


def page(run: Run, funnel: dict, hists: list[Histogram], styles: dict | None, grids_html: str) -> str:
    title = f"Curation report: {base_name(run.root)}"
    parts = [f"<h1>{escape(title)}</h1><p>{escape(str(run.root))}</p>", alerts(run), run_section(run),
             "<h2>Funnel</h2>", funnel_section(funnel), spared_section(run.stats.get("before_download")),
             rules_section(run), download_section(run.stats.get("download")),
             "<h2>Score distributions</h2>", histogram_section(hists, run.models.get("clip_score"), run),
             styles_section(styles), buckets_section(run.stats.get("buckets"), run.config),
             recaption_section(run.stats.get("recaption")), "<h2>Images</h2>", grids_html]
    return (f'<!DOCTYPE html><html lang="zh"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style></head><body>{''.join(parts)}<script>{SCRIPT}</script></body></html>")


def alerts(run: Run) -> str:
    """Random weights, skipped scorers and failed shards, at the top in colour: impossible to miss."""
    out = []
    if run.models.get("warning"):
        out.append(f'<div class="alert danger" id="random-weights">{escape(run.models["warning"])}</div>')
    for scorer, why in run.models.get("skipped", {}).items():
        out.append(f'<div class="alert warn">scorer skipped: {escape(scorer)}: {escape(str(why))}</div>')
    if run.models and not run.models.get("enabled"):
        names = [s.name for s in SCORERS if s.optional]
        out.append(f'<div class="alert warn">no model scorer ran: {", ".join(names[:-1])} and {names[-1]} are '
                   f'absent, and their rules did not apply</div>')
    for f in run.stats.get("failures", []):
        out.append(f'<div class="alert danger">failed: {escape(describe(f))}</div>')
    return "".join(out)


def funnel_section(funnel: dict) -> str:
    labels = ["rows in", *funnel["dropped"], "kept"]
    counts = [funnel["rows_in"], *funnel["dropped"].values(), funnel["kept"]]
    chart = svg.hbars(labels, counts, funnel["rows_in"], "Funnel: rows dropped per reason", highlight="kept")
    total = max(funnel["rows_in"], 1)
    rows = "".join(f'<tr><td>{escape(label)}</td><td class="num">{count:,}</td>'
                   f'<td class="num">{100 * count / total:.2f}%</td><td>{escape(REASONS.get(label, ""))}</td></tr>'
                   for label, count in zip(labels, counts))
    return (f'<div id="funnel">{chart}<table class="funnel"><tr><th>step</th><th class="num">rows</th>'
            f'<th class="num">share of input</th><th>rule</th></tr>{rows}</table></div>')


def rules_section(run: Run) -> str:
    """Every rule of the table in the order decide applies it, as it reads with this run's settings, and
    whether it applied (decide's rules_off, a null threshold)."""
    rows, off = [], 0
    for rule in RULES:
        why = why_off(rule, run.config, run.rules_off)
        off += why is not None
        state = f'<td class="off">off: {escape(why)}</td>' if why else "<td>on</td>"
        rows.append(f"<tr><td>{escape(rule.reason)}</td><td>{escape(described(rule, run.config))}</td>"
                    f"<td>{escape(rule.doc)}</td>{state}</tr>")
    return (f'<details id="rules"><summary>Rules ({off} off)</summary><table><tr><th>reason</th><th>rule</th>'
            f'<th>meaning</th><th>applied</th></tr>{"".join(rows)}</table></details>')


def spared_section(spared: dict | None) -> str:
    """Rows the rules before download dropped: never requested, no raw bytes spent on them."""
    if not spared or not spared["rows"]:
        return ""
    from curate.phases.write.card import spared_bytes

    reasons = ", ".join(f"{escape(r)} {n:,}" for r, n in spared["reasons"].items())
    return (f'<p id="before-download">{spared["rows"]:,} rows were never downloaded: rules that need no image '
            f'dropped them before download ({reasons}), sparing about {escape(spared_bytes(spared))} of raw '
            f'images.</p>')


def download_section(download: dict | None) -> str:
    """Error kinds, the shards' wait on paused hosts and retry delays, and the top hosts by rows."""
    if not download:
        return ""
    kinds = "".join(f'<tr><td>{escape(k)}</td><td class="num">{n:,}</td><td>{escape(ERROR_KINDS.get(k, ""))}</td></tr>'
                    for k, n in download["error_kinds"].items())
    hosts = []
    for host, h in download["top_hosts"].items():
        rate = "-" if h.get("success_rate") is None else f"{100 * h['success_rate']:.1f}%"
        main = ", ".join(f"{k} {n:,}" for k, n in list(h["kinds"].items())[:3]) or "-"
        hosts.append(f'<tr><td>{escape(host)}</td><td class="num">{h["rows"]:,}</td><td class="num">{rate}</td>'
                     f'<td class="num">{h["requests"]:,}</td><td class="num">{h["retries"]:,}</td>'
                     f'<td class="num">{h["pauses"]:,}</td><td class="num">{h["peak_connections"]}</td>'
                     f'<td class="num">{h["kinds"].get("robots_disallowed", 0):,}</td>'
                     f"<td>{escape(main)}</td></tr>")
    wait = download["wait_s"]
    return (f'<h2>Download</h2><div id="download"><p>{download["requests"]:,} requests, {download["retries"]:,} '
            f'retries; shards waited {wait["total"]:,.1f} s in all on paused hosts and retry delays '
            f'(longest shard {wait["max_shard"]:,.1f} s).</p>'
            f'<div class="charts"><div><h3>Error kinds</h3><table id="error-kinds"><tr><th>error_kind</th>'
            f'<th class="num">rows</th><th>meaning</th></tr>{kinds}</table></div>'
            f'<div><h3>Top hosts by rows</h3><table id="hosts"><tr><th>host</th><th class="num">rows</th>'
            f'<th class="num">success</th><th class="num">requests</th><th class="num">retries</th>'
            f'<th class="num">pauses</th><th class="num">peak connections</th>'
            f'<th class="num">refused by robots.txt</th><th>main error kinds</th></tr>'
            f'{"".join(hosts)}</table></div></div></div>')


def histogram_section(hists: list[Histogram], clip: dict | None = None, run: Run | None = None) -> str:
    """One card per score, each threshold line as the rules table describes it; clip_score's names the backend
    and model that produced it (models.json)."""
    config, off = (run.config, run.rules_off) if run else ({}, {})
    if not hists:
        return "<p>No scored rows.</p>"
    cards = []
    for h in hists:
        lines = [f"<p>{escape(h.doc)}. {h.n:,} scored rows"
                 + (f"; {h.outside:,} beyond the axis are counted in the end bins" if h.outside else "") + ".</p>"]
        for rule, _, share in h.thresholds:
            lines.append(f'<p class="threshold-note"><b>{escape(rule.reason)}: {escape(described(rule, config))}'
                         f'</b> drops <b>{100 * share:.1f}%</b> of scored rows</p>')
        applied = {rule for rule, _ in h.rules}
        for rule in h.metric.rules:
            if rule not in applied:
                why = why_off(rule, config, off) or f"{rule.threshold} is not in config.yaml"
                lines.append(f'<p class="rule-off">{escape(rule.reason)}: {escape(rule.describe())}: '
                             f'off ({escape(why)})</p>')
        if h.metric.column == "clip_score" and clip:
            lines.append(f'<p class="clip-source">produced by <b>{escape(clip["backend"])}</b>: '
                         f'{escape(clip["model"])}; '
                         f'image side: {escape(clip["image"])}; {escape(clip["score"])}</p>')
        sides = [(value, "below" if rule.drops == "below" else "above") for rule, value, _ in h.thresholds]
        chart = svg.histogram(h.counts, h.edges, h.metric.title, sides)
        cards.append(f'<div class="chart-card" data-column="{escape(h.metric.column)}">'
                     f"<h3>{escape(h.metric.title)}</h3>{chart}{''.join(lines)}</div>")
    return f'<div class="charts" id="histograms">{"".join(cards)}</div>'


def styles_section(styles: dict | None) -> str:
    if not styles:
        return ""
    chart = svg.paired_bars(styles["labels"], styles["before"], styles["after"], "Styles before and after rebalance")
    return (f'<h2>Styles</h2><p>Before rebalance: rows kept or dropped as <i>rebalanced</i>; after: kept rows.</p>'
            f'<div id="styles">{chart}</div>')


def buckets_section(buckets: dict | None, config: dict) -> str:
    """Kept rows per aspect-ratio bucket (stats.json), and whether the shards are grouped by bucket."""
    if buckets is None:
        return ""
    total = sum(buckets.values())
    labels = list(buckets)
    chart = svg.hbars(labels, [buckets[b] for b in labels], total, "Kept rows per bucket")
    grouped = bool((config.get("write") or {}).get("group_by_bucket"))
    rows = "".join(f'<tr><td>{escape(b)}</td><td class="num">{n:,}</td><td class="num">{100 * n / max(total, 1):.1f}%'
                   f"</td></tr>" for b, n in buckets.items())
    return (f"<h2>Buckets</h2><p>Training resolution nearest each kept image's aspect ratio (write.buckets); "
            f"{'each shard holds one bucket' if grouped else 'shards mix buckets'}. The images are stored as "
            f'downloaded: the trainer resizes to the bucket.</p><div id="buckets">{chart}<table><tr><th>bucket</th>'
            f'<th class="num">kept rows</th><th class="num">share</th></tr>{rows}</table></div>')


CODE = re.compile(r"`([^`]*)`")   # the card's markdown code spans, as HTML


def recaption_section(info: dict | None) -> str:
    """Who wrote the recaptions and with which prompt (the card's words), and sample pairs side by side."""
    if not info:
        return ""
    from curate.phases.write.card import recaption_lines

    random = any(p.get("weights") == "random" for p in info["producers"])
    alert = '<div class="alert danger">recaptions from RANDOM weights: they are meaningless</div>' if random else ""
    text = "".join("<p>" + CODE.sub(r"<code>\1</code>", escape(line)) + "</p>" for line in recaption_lines(info))
    pairs = "".join(f'<tr><td>{escape(e["key"])}</td><td>{escape(e.get("caption_norm") or "")}</td>'
                    f'<td>{escape(e["recaption"])}</td></tr>' for e in info["examples"])
    return (f'<h2>Recaptions</h2><div id="recaptions">{alert}{text}<table><tr><th>key</th><th>original '
            f'(caption_norm)</th><th>recaption</th></tr>{pairs}</table></div>')


def grid_section(grid: Grid, cards: list[str]) -> str:
    note = f" <small>({escape(grid.note)})</small>" if grid.note else ""
    return f'<h3>{escape(grid.title)}{note}</h3><div class="grid">{"".join(cards)}</div>'


def card(row: dict, thumb: str, mark: str | None, group_start: bool, blurred: bool) -> str:
    """One thumbnail with its caption and scores beneath, and every score on hover."""
    caption = row.get("caption_norm") or row.get("caption") or ""
    scores = [f"{k} {_short(row[k])}" for k in CARD_SCORES if row.get(k) is not None]
    hover = "\n".join([caption, f"key {row['key']}", f"reason {row.get('reason') or 'kept'}", *scores])
    classes = " ".join(c for c, on in (("nsfw", blurred), ("marked", mark), ("group-start", group_start)) if on)
    image = f'<img src="{thumb}" alt="{escape(row["key"])}">' if thumb else '<span class="missing">no image</span>'
    badge = f'<span class="badge">{escape(mark)}</span>' if mark else ""
    return (f'<figure class="{classes}" title="{escape(hover)}">{badge}<div class="frame">{image}</div>'
            f'<figcaption>{escape(caption[:80])}</figcaption><div class="scores">{escape(" · ".join(scores[:3]))}'
            f"</div></figure>")


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_section(run: Run) -> str:
    """Timings with the rows each phase worked on, model settings, versions and the full config (collapsed)."""
    timing_rows = "".join(_timing_row(phase, t) for phase, t in run.timings.items())
    models = "".join(f"<tr><td>{escape(k)}</td><td>{escape(_plain(v))}</td></tr>" for k, v in run.models.items())
    versions = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in _versions().items())
    return (f'<h2>Run</h2><div class="charts"><div><h3>Timings per phase</h3><p>each phase\'s last run that did '
            f'work (a re-run with nothing to do keeps it)</p><table id="timings"><tr><th>phase</th>'
            f'<th class="num">seconds</th><th class="num">rows</th><th class="num">rows/s</th></tr>{timing_rows}'
            f"</table></div><div><h3>Models</h3><table id=\"models\">{models}</table></div>"
            f"<div><h3>Versions (of the environment that wrote this report)</h3><table>{versions}</table></div></div>"
            f"<details><summary>config.yaml</summary><pre>{escape(run.config_text)}</pre></details>")


def _timing_row(phase: str, timing) -> str:
    """timings.json's entry for a phase: {seconds, rows}; a bare number (older runs) is seconds alone."""
    seconds, rows = (timing.get("seconds"), timing.get("rows")) if isinstance(timing, dict) else (timing, None)
    rate = f"{rows / seconds:,.0f}" if rows and seconds else "-"
    return (f'<tr><td>{escape(phase)}</td><td class="num">{seconds:,.1f}</td>'
            f'<td class="num">{f"{rows:,}" if rows else "-"}</td><td class="num">{rate}</td></tr>')


def _plain(value) -> str:
    """models.json's values as text a person reads, at any depth, never a Python repr."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        sep = " | " if any(isinstance(v, (dict, list)) for v in value) else ", "
        return sep.join(_plain(v) for v in value) or "none"
    return "-" if value is None else str(value)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
