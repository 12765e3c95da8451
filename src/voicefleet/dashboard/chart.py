"""Line charts as inline SVG, drawn on the server: a few polylines over time, no script.

Small on purpose (the autoscaling page's needs: counts and load over minutes); colours come from
the stylesheet by series class, as the page's CSP allows no inline style.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from voicefleet.dashboard.html import Html, el

WIDTH, HEIGHT = 640.0, 180.0
LEFT, RIGHT, TOP, BOTTOM = 36.0, 8.0, 8.0, 22.0  # room for the axes' labels


@dataclass(frozen=True)
class Series:
    name: str  # also its CSS class: .s-<name>
    points: Sequence[tuple[float, float]]  # (time, value)
    step: bool = False  # a count that holds until it changes: drawn as steps


def _nice(top: float) -> float:
    """A round ceiling for the y axis: 1, 2, 5, 10, 20, 50..."""
    if top <= 1:
        return 1.0
    scale = 1.0
    while True:
        for m in (1, 2, 5):
            if m * scale >= top:
                return m * scale
        scale *= 10


def polyline(
    points: Sequence[tuple[float, float]], x0: float, x1: float, ymax: float, step: bool
) -> str:
    """The points attribute of a polyline of (t, v) in [x0, x1] x [0, ymax]."""
    span_x = (x1 - x0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(t: float, v: float) -> str:
        x = LEFT + (t - x0) / span_x * plot_w
        y = TOP + plot_h - min(max(v, 0.0), ymax) / ymax * plot_h
        return f"{x:.1f},{y:.1f}"

    out: list[str] = []
    previous: float | None = None
    for t, v in points:
        if step and previous is not None:
            out.append(xy(t, previous))
        out.append(xy(t, v))
        previous = v
    return " ".join(out)


def line_chart(
    series: Sequence[Series], x0: float, x1: float, label: str, unit: str = "", ymax: float = 0
) -> Html:
    top = _nice(max([ymax, *(v for s in series for _, v in s.points)]))
    plot_h = HEIGHT - TOP - BOTTOM
    grid: list[Html] = []
    for frac in (0.0, 0.5, 1.0):
        y = TOP + plot_h - frac * plot_h
        grid.append(
            el("line", x1=LEFT, x2=WIDTH - RIGHT, y1=f"{y:.1f}", y2=f"{y:.1f}", class_="grid")
        )
        grid.append(
            el("text", f"{top * frac:g}{unit}", x=LEFT - 4, y=f"{y + 4:.1f}", class_="ylab")
        )
    minutes = (x1 - x0) / 60
    grid.append(el("text", f"-{minutes:g} min", x=LEFT, y=HEIGHT - 6, class_="xlab"))
    grid.append(el("text", "now", x=WIDTH - RIGHT, y=HEIGHT - 6, class_="xlab end"))
    lines = [
        el(
            "polyline",
            el("title", s.name),
            points=polyline(s.points, x0, x1, top, s.step),
            class_=f"line s-{s.name}",
        )
        for s in series
        if s.points
    ]
    legend = el(
        "ul",
        *(el("li", el("span", class_=f"key s-{s.name}"), s.name) for s in series),
        class_="legend",
    )
    svg = el(
        "svg",
        el("title", label),
        *grid,
        *lines,
        viewBox=f"0 0 {WIDTH:g} {HEIGHT:g}",
        role="img",
        aria_label=label,
        class_="chart",
    )
    return el("figure", svg, el("figcaption", label, legend), class_="chart-box")
