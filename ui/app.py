"""Start the desktop workbench: `python -m ui.app [--model demo] [--runs-dir DIR] [--version]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from workbench import __version__

APP_NAME = "INT4 Workbench"


def default_runs_dir() -> Path:
    """Where runs are saved: a visible folder in the user's home; INT4_WORKBENCH_RUNS overrides it."""
    override = os.environ.get("INT4_WORKBENCH_RUNS")
    return Path(override) if override else Path.home() / f"{APP_NAME} runs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="int4-workbench-app", description=f"The {APP_NAME} desktop app.")
    parser.add_argument("--version", action="version", version=f"int4-workbench {__version__}")
    parser.add_argument("--model", help="open this model at start: 'demo', a model folder, a .gguf file or a hub id")
    parser.add_argument("--runs-dir", type=Path, default=default_runs_dir(),
                        help="folder for run folders (default: %(default)s)")
    return parser


def create_app(argv: list[str]):
    from PySide6.QtWidgets import QApplication

    from ui.theme import apply_theme

    app = QApplication.instance() or QApplication(argv)
    app.setApplicationName(APP_NAME)
    app.setApplicationVersion(__version__)
    apply_theme(app)
    return app


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --version exits here, before any Qt or display is needed
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(sys.argv[:1])
    from ui.main_window import MainWindow

    window = MainWindow(args.runs_dir, model=args.model)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
