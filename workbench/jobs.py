"""The progress/cancel protocol shared by the CLI, the GUI and the tests.

A long step is a plain function `step(inputs..., *, progress, cancelled) -> Result` where
`progress(fraction, message)` reports and `cancelled()` asks whether to stop. Steps call
`check(cancelled)` between units of work (a layer, a batch, a token).

A job made of named stages (`Stages`) reports ProgressEvents: the stage travels as a field. A
front end that shows stages passes a sink with an `event(ProgressEvent)` method; any other sink
gets "stage: message" as its text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from workbench.errors import JobCancelled

Progress = Callable[[float, str], None]
Cancelled = Callable[[], bool]


def no_progress(fraction: float, message: str) -> None:
    """Progress sink for callers that do not display anything."""


def never_cancelled() -> bool:
    return False


@dataclass(frozen=True)
class Stage:
    """A named part of a long job: its title in plain words and the term (of a glossary) that explains it."""

    name: str
    title: str
    term: str | None = None


@dataclass(frozen=True)
class ProgressEvent:
    fraction: float  # of the whole job
    message: str  # what is being done now
    stage: Stage | None = None

    @property
    def text(self) -> str:
        """The event as one line of text, "stage: message"."""
        return f"{self.stage.name}: {self.message}" if self.stage else self.message


class EventSink(Protocol):
    """A Progress that also takes whole events (the GUI's jobs do)."""

    def __call__(self, fraction: float, message: str) -> None: ...

    def event(self, event: ProgressEvent) -> None: ...


def report_event(progress: Progress | EventSink, event: ProgressEvent) -> None:
    """Give `event` to a sink that takes events; a plain Progress gets it as text."""
    take = getattr(progress, "event", None)
    if take is not None:
        take(event)
    else:
        progress(event.fraction, event.text)


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

    Each stage's progress reaches `progress` as a ProgressEvent carrying its Stage (a bare name
    is its own title); run.json records `timings`.
    """

    progress: Progress | EventSink
    weights: Sequence[tuple[Stage | str, float]]
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        total = sum(w for _, w in self.weights) or 1.0
        self._ranges: dict[str, tuple[Stage, float, float]] = {}
        start = 0.0
        for stage, weight in self.weights:
            stage = stage if isinstance(stage, Stage) else Stage(stage, stage)
            end = start + weight / total
            self._ranges[stage.name] = (stage, start, end)
            start = end

    def run(self, name: str, step: Callable[[Progress], object]) -> object:
        """Run `step(progress)` as stage `name`, timing it."""
        stage, start, end = self._ranges[name]

        def stage_progress(fraction: float, message: str) -> None:
            fraction = min(max(fraction, 0.0), 1.0)
            report_event(self.progress, ProgressEvent(start + (end - start) * fraction, message, stage))

        began = time.perf_counter()
        stage_progress(0.0, "starting")
        result = step(stage_progress)
        self.timings[name] = round(time.perf_counter() - began, 3)
        stage_progress(1.0, "done")
        return result
