"""Line charts over time, drawn in the browser by uPlot (static/uPlot.iife.min.js, vendored by
scripts/dashboard-assets).

The server sends each chart as JSON in a `data-chart` attribute (the page's CSP allows no
inline script) and `dashboard.js` draws it on a canvas; the caption says the newest values in
words, for a reader without the canvas. Colours come from the stylesheet (`--c0`..`--c3`,
`--bad` for a threshold)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from voicefleet.dashboard.html import Html, el, join


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]  # (time, value)
    step: bool = False  # a count that holds until it changes: drawn as steps
    colour: str = "c0"  # a colour of the stylesheet: c0..c3, bad
    dash: bool = False  # a threshold, or what a line aims at
    unit: str = ""  # "%": values are shares (0.25), shown as 25%


def line_chart(series: Sequence[Series], x0: float, x1: float, label: str, ymax: float = 0) -> Html:
    """Every series on one time axis from `x0` to `x1` (a series has no value where it has
    no point: uPlot joins over the gap); the y axis from 0 to at least `ymax`."""
    xs = sorted({x0, x1, *(t for s in series for t, _ in s.points)})
    at = {t: n for n, t in enumerate(xs)}
    data: list[list[float | None]] = [[round(t, 3) for t in xs]]
    for s in series:
        ys: list[float | None] = [None] * len(xs)
        for t, v in s.points:
            ys[at[t]] = round(v, 4)
        data.append(ys)
    spec = {
        "label": label,
        "ymax": ymax,
        "series": [
            {"label": s.name, "step": s.step, "colour": s.colour, "dash": s.dash, "unit": s.unit}
            for s in series
        ],
        "data": data,
    }
    newest = [
        f"{s.name} {_value(s.points[-1][1], s.unit)}" for s in series if s.points and not s.dash
    ]
    return el(
        "figure",
        el(
            "div",
            class_="plot",
            data_chart=json.dumps(spec, separators=(",", ":")),
            role="img",
            aria_label=label,
        ),
        el(
            "figcaption",
            label,
            el("small", " · now ", join(newest, ", ")) if newest else "",
        ),
        class_="chart-box",
    )


def _value(v: float, unit: str) -> str:
    return f"{100 * v:.1f}%" if unit == "%" else f"{v:g}{unit}"
