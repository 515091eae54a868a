"""The funnel chart as plain geometry, drawn by the template as inline SVG: no JavaScript, no
chart library, nothing for the Content-Security-Policy to allow."""

from __future__ import annotations

from dataclasses import dataclass

from ...insight.kpis import StepKpis

#: The stages of a step's funnel, in order: each is a StepKpis field.
STAGES = ("sent", "delivered", "opened", "clicked", "converted")
WIDTH = 640
LABEL_WIDTH = 110
BAR_SPACE = 440  # the rest holds the figure after the longest bar
BAR_HEIGHT = 18
GAP = 6
HEADING = 26


@dataclass(frozen=True)
class Bar:
    stage: str
    value: int
    y: int
    width: int


@dataclass(frozen=True)
class StepChart:
    step: int
    y: int  # of the heading's baseline
    bars: list[Bar]


@dataclass(frozen=True)
class Funnel:
    width: int
    height: int
    label_width: int
    bar_height: int
    steps: list[StepChart]


def funnel(steps: list[StepKpis]) -> Funnel:
    """One group of bars per step, every bar on the same scale (the largest figure fills the space)."""
    largest = max([1, *(getattr(s, stage) for s in steps for stage in STAGES)])
    charts, y = [], 0
    for s in steps:
        heading_y = y + HEADING - 8
        y += HEADING
        bars = []
        for stage in STAGES:
            value = int(getattr(s, stage))
            bars.append(Bar(stage, value, y, round(BAR_SPACE * value / largest)))
            y += BAR_HEIGHT + GAP
        charts.append(StepChart(s.step, heading_y, bars))
    return Funnel(WIDTH, max(y, HEADING), LABEL_WIDTH, BAR_HEIGHT, charts)
