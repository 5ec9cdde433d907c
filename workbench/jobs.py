"""The progress/cancel protocol shared by the CLI, the GUI and the tests.

A long step is a plain function `step(inputs..., *, progress, cancelled) -> Result` where
`progress(fraction, message)` reports and `cancelled()` asks whether to stop. Steps call
`check(cancelled)` between units of work (a layer, a batch, a token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from workbench.errors import JobCancelled

Progress = Callable[[float, str], None]
Cancelled = Callable[[], bool]


def no_progress(fraction: float, message: str) -> None:
    """Progress sink for callers that do not display anything."""


def never_cancelled() -> bool:
    return False


def check(cancelled: Cancelled) -> None:
    if cancelled():
        raise JobCancelled()


def sub_progress(progress: Progress, start: float, end: float, prefix: str = "") -> Progress:
    """Map a sub-step's 0..1 onto [start, end] of the parent's progress."""

    def report(fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        progress(start + (end - start) * fraction, f"{prefix}{message}")

    return report


@dataclass
class Stages:
    """Named, weighted stages of one job; each gets its own 0..1 progress and a timing.

    The CLI and the GUI show the stage name; run.json records `timings`.
    """

    progress: Progress
    weights: Sequence[tuple[str, float]]
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = sum(w for _, w in self.weights) or 1.0
        self._ranges: dict[str, tuple[float, float]] = {}
        start = 0.0
        for name, weight in self.weights:
            end = start + weight / total
            self._ranges[name] = (start, end)
            start = end

    def run(self, name: str, step: Callable[[Progress], object]) -> object:
        """Run `step(progress)` as stage `name`, timing it."""
        start, end = self._ranges[name]
        stage_progress = sub_progress(self.progress, start, end, prefix=f"{name}: ")
        began = time.perf_counter()
        stage_progress(0.0, "starting")
        result = step(stage_progress)
        self.timings[name] = round(time.perf_counter() - began, 3)
        stage_progress(1.0, "done")
        return result
