"""Regenerate the README's pictures: one PNG per step, made with the demo model.

    python -m ui.screenshots docs/screenshots [--reuse-run RUN_DIR]

It drives the real window offscreen through the whole journey: opens the demo model, previews a
calibration file, quantizes with the default preset (GPTQ with self-written example text: from
several minutes to half an hour on two busy cores), compares, and measures quality on the bundled
essays and speed. `--reuse-run` takes Compare, Report and Export from an existing run of the demo
model instead of waiting for a new one (the Quantize picture then comes from a run that is
cancelled right after it).

Qt is imported inside the functions: QT_QPA_PLATFORM must be set before it loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ESSAYS = ROOT / "benchmarks" / "data" / "sqlite_essays.txt"
WINDOW_SIZE = (1200, 860)
FOLLOW_UP = "And why are sunsets red?"
FOLLOW_UP_TOKENS = 96  # enough for the demo's answers to end by themselves: a picture of a cut answer misleads
STEP_FILES = ("1-model", "2-settings", "3-calibration", "4-quantize", "5-compare", "6-report", "7-export")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    from PySide6.QtWidgets import QApplication

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        QApplication.processEvents()
        time.sleep(0.05)


def settle(seconds: float = 0.4) -> None:
    """Let layouts, repaints and queued signals finish before a picture is taken."""
    from PySide6.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def idle() -> bool:
    from ui import jobs

    return not jobs.running()


def take(window, folder: Path, step: int, whole_page: bool = False) -> Path:
    """A picture of the window on `step`; `whole_page` makes the window tall enough not to scroll."""
    window.go(step)
    settle()
    if whole_page:
        scroll = window.stack.currentWidget()
        page, width = scroll.widget(), scroll.viewport().width()
        needed = page.heightForWidth(width) if page.hasHeightForWidth() else page.sizeHint().height()
        window.resize(WINDOW_SIZE[0], window.height() + max(needed - scroll.viewport().height(), 0))
        settle()
    path = folder / f"{STEP_FILES[step]}.png"
    window.grab().save(str(path))
    window.resize(*WINDOW_SIZE)
    print(f"wrote {path}", file=sys.stderr)
    return path


def ask(compare, prompt: str) -> None:
    if compare.ask(prompt) is None:
        raise RuntimeError(f"Compare did not start: {compare.problem.text()}")


def make_screenshots(folder: Path, runs_dir: Path, reuse_run: Path | None) -> None:
    from ui.app import create_app
    from ui.main_window import MainWindow
    from ui.pages.calibration import CalibrationPage
    from ui.pages.compare import DEFAULT_PROMPT, ComparePage
    from ui.pages.quantize import QuantizePage
    from ui.pages.report import ReportPage
    from ui.pages.settings import SettingsPage

    create_app(sys.argv[:1])
    window = MainWindow(runs_dir, model="demo")
    window.resize(*WINDOW_SIZE)
    window.show()
    wait_until(lambda: window.session.model is not None and idle(), 300, "the demo model")
    take(window, folder, 0)

    window.page(SettingsPage).advanced.set_open(True)
    take(window, folder, 1, whole_page=True)  # the Advanced choices whole, not cut at the window's edge

    calibration = window.page(CalibrationPage)
    calibration.use_file(ESSAYS)
    wait_until(idle, 120, "the calibration preview")
    take(window, folder, 2)
    calibration.use_self_written()  # the presets' default: the model writes its own example text

    quantize = window.page(QuantizePage)
    window.go(3)
    job = quantize.start()
    if job is None:
        raise RuntimeError(f"quantizing could not start: {quantize.start_button.toolTip()}")
    quantize.log_section.set_open(True)
    wait_until(lambda: "calibration" in quantize.rows, 600, "the calibration stage")
    wait_until(lambda: quantize.rows["calibration"].detail.text() != "starting", 600, "calibration progress")
    settle(2.0)
    take(window, folder, 3, whole_page=True)
    if reuse_run:
        quantize.cancel()
        wait_until(idle, 120, "the cancelled run to stop")
        window.open_run(reuse_run)
    else:
        wait_until(idle, 3600, "quantizing")
        if window.session.run_dir is None:
            raise RuntimeError(f"quantizing failed: {quantize.result.text()}")

    compare = window.page(ComparePage)
    window.go(4)
    compare.show_conversation(None)  # a reused run opens at its latest conversation; the picture starts a new one
    ask(compare, DEFAULT_PROMPT)
    wait_until(idle, 600, "both answers")
    compare.max_tokens.setValue(FOLLOW_UP_TOKENS)
    ask(compare, FOLLOW_UP)  # a conversation: each model reads its own first answer
    wait_until(idle, 600, "both answers to the follow-up")
    take(window, folder, 4, whole_page=True)

    report = window.page(ReportPage)
    window.go(5)
    if not any(q.text == ESSAYS.name for q in window.session.record.quality):
        report.measure(ESSAYS)
        wait_until(idle, 1200, "the quality measurement")
    report.measure_speed()
    wait_until(idle, 1200, "the speed measurement")
    take(window, folder, 5, whole_page=True)
    take(window, folder, 6)
    window.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.screenshots", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the PNGs (e.g. docs/screenshots)")
    parser.add_argument("--reuse-run", type=Path, help="a finished run of the demo model to show after Quantize")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # no window flashes by; works without a screen
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.reuse_run:
        # Its folder is the runs folder (the list shows it); the run started there is cancelled.
        make_screenshots(args.folder, args.reuse_run.resolve().parent, args.reuse_run.resolve())
        return 0
    runs_dir = Path(tempfile.mkdtemp(prefix="int4-screenshots-"))
    try:
        make_screenshots(args.folder, runs_dir, None)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
