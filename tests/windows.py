"""Driving the real window in tests: open a run on one step, wait for the background work."""

from __future__ import annotations

from pathlib import Path

from ui import jobs
from ui.main_window import STEP_PAGES, MainWindow

JOB_TIMEOUT_MS = 180_000


def wait_for_jobs(qtbot, timeout_ms: int = JOB_TIMEOUT_MS) -> None:
    qtbot.waitUntil(lambda: not jobs.running(), timeout=timeout_ms)


def open_run_on(qtbot, run_dir: Path, page_class):
    """A new window showing `run_dir` on the step of `page_class`, its start-up checks done."""
    window = MainWindow(run_dir.parent)
    qtbot.addWidget(window)
    window.show()
    window.open_run(run_dir)
    window.go(STEP_PAGES.index(page_class))
    wait_for_jobs(qtbot)
    return window, window.page(page_class)
