"""The one background job class of the app: a core step run on QThreadPool, reporting by Qt signals.

A core step is a plain function taking `progress(fraction, message)` and `cancelled()` keyword
arguments (workbench.jobs). `Job` calls it on a pool thread; its signals arrive in the GUI thread.
Cancel sets a flag the step reads through `cancelled()` and stops at its next check.
"""

from __future__ import annotations

import gc
import threading
import time
import traceback
from collections.abc import Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal

from workbench.errors import JobCancelled, WorkbenchError
from workbench.jobs import ProgressEvent

# Progress faster than this is dropped (the core may report per node or per token), except a
# report from a new stage, so every stage's start reaches the screen.
PROGRESS_INTERVAL_S = 0.05

# Jobs stay referenced until their last signal was delivered: a QRunnable is deleted by the
# pool when it returns, and its Python side (the signals object) must outlive pending signals.
_running: set[Job] = set()
# While jobs run, Python's automatic garbage collection is off and the GUI thread collects on a timer instead:
# a collection that starts in a worker thread may free Qt objects held in reference cycles (a closed window's
# widgets) outside the GUI thread, which crashes Qt (seen: a segfault while a job built a PyTorch model).
COLLECT_INTERVAL_MS = 500


class _GuiThreadCollector:
    """Python's generational collection, run by the GUI thread while jobs run (as gc itself would run it)."""

    def __init__(self):
        self.timer = QTimer()
        self.timer.setInterval(COLLECT_INTERVAL_MS)
        self.timer.timeout.connect(self.collect)
        self.restore = False

    def jobs_started(self) -> None:
        self.restore = gc.isenabled()
        gc.disable()
        self.timer.start()

    def jobs_ended(self) -> None:
        self.timer.stop()
        if self.restore:
            gc.enable()
        self.collect()

    @staticmethod
    def collect() -> None:
        counts, thresholds = gc.get_count(), gc.get_threshold()
        generation = next((g for g in (2, 1, 0) if counts[g] > thresholds[g]), None)
        if generation is not None:
            gc.collect(generation)


_collector: _GuiThreadCollector | None = None


def _job_started(job: Job) -> None:
    global _collector
    if not _running:
        _collector = _collector or _GuiThreadCollector()  # made in the GUI thread, where jobs start
        _collector.jobs_started()
    _running.add(job)


def _job_ended(job: Job) -> None:
    _running.discard(job)
    if not _running and _collector is not None:
        _collector.jobs_ended()


class JobSignals(QObject):
    progress = Signal(object)  # a ProgressEvent: fraction of the whole job, message, and the stage (or None)
    partial = Signal(object)  # a piece of the result while it is being made: the streaming callback's arguments
    finished = Signal(object)
    failed = Signal(str, str)  # message for the user, details (a traceback; empty for a WorkbenchError)
    cancelled = Signal()
    ended = Signal()  # after finished, failed or cancelled


class Job(QRunnable):
    """`step(*args, **kwargs, progress=..., cancelled=...)` in the background.

    `partial` names a keyword argument of `step` that takes a streaming callback (generation's
    `on_token`); each call's arguments arrive, as one tuple, through `signals.partial`.
    """

    def __init__(self, step: Callable, /, *args, partial: str | None = None, **kwargs):
        super().__init__()
        self.signals = JobSignals()
        self._step, self._args, self._kwargs = step, args, kwargs
        if partial:
            self._kwargs[partial] = lambda *values: self.signals.partial.emit(values)
        self._cancel = threading.Event()
        self._last_report = (0.0, None)
        self._progress = _ProgressSink(self._report)
        self.signals.ended.connect(lambda: _job_ended(self))

    def start(self) -> Job:
        _job_started(self)
        QThreadPool.globalInstance().start(self)
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def run(self) -> None:
        try:
            result = self._step(
                *self._args, **self._kwargs, progress=self._progress, cancelled=self._cancel.is_set
            )
        except JobCancelled:
            self.signals.cancelled.emit()
        except WorkbenchError as error:
            self.signals.failed.emit(str(error), "")
        except Exception as error:  # noqa: BLE001 (any bug must reach the user as a dialog, not kill the thread)
            self.signals.failed.emit(
                f"Something unexpected went wrong ({type(error).__name__}: {error}). Try again; if it "
                "happens again, please report it with the details below.",
                traceback.format_exc(),
            )
        else:
            self.signals.finished.emit(result)
        finally:
            self.signals.ended.emit()

    def _report(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        last_time, last_stage = self._last_report
        if event.stage != last_stage or now - last_time >= PROGRESS_INTERVAL_S or event.fraction >= 1.0:
            self._last_report = (now, event.stage)
            self.signals.progress.emit(event)


class _ProgressSink:
    """The `progress` a job's step gets: plain reports and staged events both become ProgressEvents."""

    def __init__(self, report):
        self.event = report

    def __call__(self, fraction: float, message: str) -> None:
        self.event(ProgressEvent(fraction, message))


def running() -> list[Job]:
    return list(_running)
