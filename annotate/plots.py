"""Small SVG charts for annotate's pages (annotate imports no other app, so it draws its own)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any


def interval_chart(rows: Sequence[dict[str, Any]], *, title: str, width: int = 640) -> str:
    """One line per row, best first: its rating as a dot and its 95% interval as a bar, on a shared
    axis (``rating``, ``ci_low``, ``ci_high``, ``label`` per row)."""
    if not rows:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text x="4" y="24" font-size="13">no judged pairs between versions yet</text></svg>'
    lo = min(min(r["ci_low"], r["rating"]) for r in rows)
    hi = max(max(r["ci_high"], r["rating"]) for r in rows)
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    left, right, top, line = 230, 20, 34, 26
    height = top + line * len(rows) + 30
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<text x="4" y="18" font-size="14">{escape(title)}</text>',
    ]
    for k in range(5):  # a light axis: five ticks
        v = lo + (hi - lo) * k / 4
        parts.append(
            f'<line x1="{x(v):.1f}" y1="{top - 6}" x2="{x(v):.1f}" y2="{height - 24}" stroke="#ddd"/>'
            f'<text x="{x(v):.1f}" y="{height - 8}" text-anchor="middle" fill="#555">{v:.0f}</text>'
        )
    for n, r in enumerate(rows):
        y = top + line * n + line / 2
        parts.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(str(r["label"]))[:60]}</text>'
            f'<line x1="{x(r["ci_low"]):.1f}" y1="{y:.1f}" x2="{x(r["ci_high"]):.1f}" y2="{y:.1f}" '
            f'stroke="#4a7ab7" stroke-width="4" stroke-linecap="round"/>'
            f'<circle cx="{x(r["rating"]):.1f}" cy="{y:.1f}" r="5" fill="#1f3d66"/>'
        )
    parts.append("</svg>")
    return "".join(parts)
