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
