"""Small inline SVG line charts for the admin (training curves, version comparisons).

Plain SVG text, no plotting library and no JavaScript: it renders in the admin under any CSP.
Every label is escaped."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / n
    return [lo + i * step for i in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str = "",
    xlabel: str = "",
    width: int = 520,
    height: int = 220,
) -> str:
    """An SVG chart of one or more (x, y) series sharing the axes. Non-finite points are skipped."""
    clean = {
        name: [(float(x), float(y)) for x, y in pts if math.isfinite(float(x)) and math.isfinite(float(y))]
        for name, pts in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    if not clean:
        return f'<svg width="{width}" height="40"><text x="4" y="20" font-size="12">no data for {escape(title)}</text></svg>'
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 48, 12, 22, 30
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
        f'<text x="{left}" y="14" font-size="12" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
    ]
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{py(t) + 3:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        parts.append(f'<text x="{px(t):.1f}" y="{top + ph + 12}" text-anchor="middle">{_fmt(t)}</text>')
    if xlabel:
        parts.append(
            f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{escape(xlabel)}</text>'
        )
    for i, (name, pts) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{px(pts[0][0]):.1f}" cy="{py(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        parts.append(
            f'<text x="{left + pw - 4}" y="{top + 12 + 12 * i}" text-anchor="end" fill="{color}">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def curves_chart(curves: Sequence[Mapping[str, Any]], key: str, *, title: str) -> str:
    """One chart of ``key`` over training steps, from a version's logged curves."""
    pts = [
        (float(c["step"]), float(c[key]))
        for c in curves
        if c.get(key) is not None and c.get("step") is not None
    ]
    return line_chart({key: pts}, title=title, xlabel="step")
