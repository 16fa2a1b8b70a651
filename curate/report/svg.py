"""Inline SVG charts written by hand: the report opens offline and needs no plotting library."""
from __future__ import annotations

from html import escape

import numpy as np

DROP_FILL = "#f4c7c3"
BAR_FILL = "#4a78c2"
KEPT_FILL = "#2e9e5b"
LINE = "#c0392b"


def _fmt(x: float) -> str:
    """Short tick label: whole numbers from 1000 up, 3 significant digits below, exponents when tiny."""
    ax = abs(x)
    if ax >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}" if ax >= 0.01 or x == 0 else f"{x:.1e}"


def _svg(width: int, height: int, title: str, body: list[str], cls: str) -> str:
    return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{escape(title)}</title>{"".join(body)}</svg>')


def hbars(labels: list[str], values: list[int], total: int, title: str, highlight: str | None = None) -> str:
    """Horizontal bars with count and share of `total`: the funnel chart."""
    row, left, width = 20, 170, 640
    bar_w = width - left - 150
    peak = max(values, default=0) or 1
    body = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = 6 + i * row
        w = max(bar_w * value / peak, 1 if value else 0)
        fill = KEPT_FILL if label == highlight else BAR_FILL
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{escape(label)}</text>'
                    f'<rect class="bar" x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{fill}">'
                    f'<title>{escape(label)}: {value:,}</title></rect>'
                    f'<text x="{left + w + 6:.1f}" y="{y + 13}">{value:,} ({100 * value / max(total, 1):.1f}%)</text>')
    return _svg(width, 12 + row * len(labels), title, body, "chart funnel-chart")


def histogram(counts: np.ndarray, edges: np.ndarray, title: str,
              thresholds: list[tuple[float, str]]) -> str:
    """Bars over bins, the region each threshold drops shaded and its line drawn and labelled.

    `thresholds` holds (value, side) with side "below" or "above": the side that is dropped.
    """
    width, height, pad_l, pad_r, pad_t, pad_b = 380, 170, 44, 24, 18, 28
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    peak = int(counts.max()) if len(counts) and counts.max() > 0 else 1

    def x_of(v: float) -> float:
        return pad_l + plot_w * (min(max(v, lo), hi) - lo) / span

    body = []
    for value, side in thresholds:
        x = x_of(value)
        x0, x1 = (pad_l, x) if side == "below" else (x, pad_l + plot_w)
        body.append(f'<rect x="{x0:.1f}" y="{pad_t}" width="{max(x1 - x0, 0):.1f}" height="{plot_h}" '
                    f'fill="{DROP_FILL}" opacity="0.6"/>')
    bin_w = plot_w / max(len(counts), 1)
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        body.append(f'<rect class="bar" x="{pad_l + i * bin_w:.1f}" y="{pad_t + plot_h - h:.1f}" '
                    f'width="{max(bin_w - 1, 0.5):.1f}" height="{h:.1f}" fill="{BAR_FILL}">'
                    f'<title>{_fmt(edges[i])} to {_fmt(edges[i + 1])}: {int(c):,}</title></rect>')
    base = pad_t + plot_h
    body.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + plot_w}" y2="{base}" stroke="#555"/>')
    for t in np.linspace(lo, hi, 5):
        x = x_of(float(t))
        body.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" stroke="#555"/>'
                    f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{_fmt(float(t))}</text>')
    body.append(f'<text x="{pad_l - 4}" y="{pad_t + 8}" text-anchor="end">{peak:,}</text>'
                f'<text x="{pad_l - 4}" y="{base}" text-anchor="end">0</text>')
    for value, _side in thresholds:
        x = x_of(value)
        body.append(f'<line class="threshold" x1="{x:.1f}" y1="{pad_t - 4}" x2="{x:.1f}" y2="{base}" '
                    f'stroke="{LINE}" stroke-width="2"/>'
                    f'<text x="{x:.1f}" y="{pad_t - 6}" text-anchor="middle" fill="{LINE}">{_fmt(value)}</text>')
    return _svg(width, height, title, body, "chart histogram")


def paired_bars(labels: list[str], before: list[int], after: list[int], title: str) -> str:
    """Two bars per label (before and after), each as a share of its own total: style balance."""
    row, left, width = 30, 110, 640
    bar_w = width - left - 170
    totals = (max(sum(before), 1), max(sum(after), 1))
    body = [f'<rect x="{left}" y="2" width="10" height="10" fill="{BAR_FILL}"/>'
            f'<text x="{left + 14}" y="11">before rebalance</text>'
            f'<rect x="{left + 140}" y="2" width="10" height="10" fill="{KEPT_FILL}"/>'
            f'<text x="{left + 154}" y="11">after (kept)</text>']
    for i, label in enumerate(labels):
        y = 20 + i * row
        body.append(f'<text x="{left - 6}" y="{y + 16}" text-anchor="end">{escape(label)}</text>')
        for j, (series, fill) in enumerate(((before, BAR_FILL), (after, KEPT_FILL))):
            share = series[i] / totals[j]
            w = bar_w * share
            yy = y + 2 + j * 12
            body.append(f'<rect class="bar" x="{left}" y="{yy}" width="{w:.1f}" height="11" fill="{fill}"/>'
                        f'<text x="{left + w + 6:.1f}" y="{yy + 10}">{series[i]:,} ({100 * share:.1f}%)</text>')
    return _svg(width, 26 + row * len(labels), title, body, "chart styles-chart")
