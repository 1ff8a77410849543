"""Charts of an RL job's per-step metrics: one small SVG line chart per number the trainer logged,
over its iterations or steps (reward first). The admin shows them inline; the API serves them as
one standalone SVG document (``GET .../rl-jobs/<id>/metrics.svg``)."""

from __future__ import annotations

import math
from html import escape
from typing import Any

from rewards import plots

X_KEYS = ("iteration", "step", "epoch")
# Plotted first when a trainer logs them (then every other number it logs).
FIRST = (
    "reward_mean",
    "reward",
    "reward_parts/total",
    "reward_std",
    "kl",
    "approx_kl",
    "clip_fraction",
    "zero_spread_groups",
    "loss",
)
WIDTH, HEIGHT = 360, 170


def metric_charts(metrics: list[dict[str, Any]]) -> list[str]:
    """One SVG chart (an inline ``<svg>`` element) per logged number, in display order."""
    if not metrics:
        return []
    x_key = next((k for k in X_KEYS if k in metrics[0]), None)
    keys: list[str] = []
    for row in metrics:
        for k, v in row.items():
            if k not in X_KEYS and k not in keys and isinstance(v, int | float) and not isinstance(v, bool):
                keys.append(k)
    keys.sort(key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))
    charts = []
    for key in keys:
        pts = []
        for i, row in enumerate(metrics):
            v = row.get(key)
            x = row.get(x_key, i + 1) if x_key else i + 1
            if isinstance(v, int | float) and isinstance(x, int | float) and math.isfinite(float(v)):
                pts.append((float(x), float(v)))
        charts.append(
            plots.line_chart({key: pts}, title=key, xlabel=x_key or "step", width=WIDTH, height=HEIGHT)
        )
    return charts


def metrics_svg(metrics: list[dict[str, Any]], *, title: str, columns: int = 3) -> str:
    """A standalone SVG document: the charts of ``metrics_charts`` in a grid under ``title``."""
    charts = metric_charts(metrics)
    rows = max(1, math.ceil(len(charts) / columns))
    width, height = columns * (WIDTH + 8), 28 + rows * (HEIGHT + 8)
    cells = [
        f'<g transform="translate({(i % columns) * (WIDTH + 8)},{28 + (i // columns) * (HEIGHT + 8)})">{c}</g>'
        for i, c in enumerate(charts)
    ]
    if not charts:
        cells.append('<text x="4" y="48" font-size="12">no steps yet</text>')
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}"><text x="4" y="18" font-size="14" font-family="sans-serif">'
        f"{escape(title)}</text>{''.join(cells)}</svg>"
    )


def guard_chart(rounds: list[dict[str, Any]], *, width: int = 640, height: int = 240) -> str:
    """Per evaluated round: the human win rate of the new version (dot) with its 95% interval (bar)
    next to the reward model's predicted win rate (hollow diamond), over a 50% line. A round whose
    dot sits well under its diamond fooled the reward model."""
    done = [r for r in rounds if r.get("human_win_rate") is not None]
    if not done:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40">'
            '<text x="4" y="24" font-size="13" font-family="sans-serif">no round evaluated yet</text></svg>'
        )
    left, right, top, bottom = 48, 16, 24, 30
    pw, ph = width - left - right, height - top - bottom
    step = pw / (len(done) + 1)

    def y(v: float) -> float:
        return top + (1.0 - v) * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        '<text x="4" y="14" font-size="13">win rate of each round\'s version against the incumbent</text>',
    ]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        colour = "#999" if v == 0.5 else "#e3e3e3"
        parts.append(
            f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - right}" y2="{y(v):.1f}" stroke="{colour}"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" fill="#555">{v:.0%}</text>'
        )
    for k, r in enumerate(done):
        x = left + step * (k + 1)
        colour = "#b3261e" if r.get("state") == "flagged" else "#1f3d66"
        low, high = r.get("human_ci_low"), r.get("human_ci_high")
        if low is not None and high is not None:
            parts.append(
                f'<line x1="{x:.1f}" y1="{y(high):.1f}" x2="{x:.1f}" y2="{y(low):.1f}" stroke="{colour}" '
                'stroke-width="4" stroke-linecap="round" opacity="0.5"/>'
            )
        parts.append(f'<circle cx="{x:.1f}" cy="{y(r["human_win_rate"]):.1f}" r="5" fill="{colour}"/>')
        if r.get("predicted_win_rate") is not None:
            py = y(r["predicted_win_rate"])
            parts.append(
                f'<path d="M {x + 12:.1f} {py - 6:.1f} L {x + 18:.1f} {py:.1f} L {x + 12:.1f} {py + 6:.1f} '
                f'L {x + 6:.1f} {py:.1f} Z" fill="none" stroke="#c77c02" stroke-width="2"/>'
            )
        parts.append(
            f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle">round {escape(str(r["number"]))}</text>'
        )
    parts.append(
        f'<text x="{width - right}" y="14" text-anchor="end" fill="#555">dot: people (95% bar) · '
        "diamond: reward model</text></svg>"
    )
    return "".join(parts)
