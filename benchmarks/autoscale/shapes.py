"""Load shapes: the session arrival rate (sessions per second) at each simulated second."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    seconds: int
    rate: Callable[[float], float]
    about: str


def daily(peak: float, hours: float = 2.0, low: float = 0.05) -> Shape:
    """A day compressed into `hours`: a sinusoid from `low` x peak at midnight to peak at noon."""
    seconds = round(hours * 3600)

    def rate(t: float) -> float:
        return peak * (low + (1 - low) * (1 - math.cos(2 * math.pi * t / seconds)) / 2)

    return Shape(
        "daily",
        seconds,
        rate,
        f"24 h in {hours:g} h, {low:.0%} -> 100% -> {low:.0%} of peak",
    )


def spike(peak: float, factor: float = 10.0, minutes: float = 10.0) -> Shape:
    """Peak / `factor` for 15 min, a step to peak for `minutes`, back to the base for 20 min."""
    start, end = 15 * 60, round(15 * 60 + minutes * 60)

    def rate(t: float) -> float:
        return peak if start <= t < end else peak / factor

    return Shape("spike", end + 20 * 60, rate, f"{factor:g}x step at 15 min for {minutes:g} min")


def decline(peak: float, minutes: float = 60.0, wake: float = 0.1) -> Shape:
    """Peak for 10 min, a linear fall to 0 over `minutes`, 30 min with no session, then
    `wake` x peak for 10 min: scale to zero, and the cold start of the first sessions after."""
    hold, fall, idle = 10 * 60, minutes * 60, 30 * 60

    def rate(t: float) -> float:
        if t < hold:
            return peak
        if t >= hold + fall + idle:
            return peak * wake
        return peak * max(0.0, 1 - (t - hold) / fall)

    return Shape(
        "decline",
        round(hold + fall + idle + (10 * 60 if wake > 0 else 0)),
        rate,
        f"peak 10 min, linear to 0 over {minutes:g} min, idle 30 min"
        + (f", {wake:.0%} of peak for 10 min" if wake > 0 else ""),
    )
