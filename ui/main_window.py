"""The main window: the journey's steps down the side, earlier runs below them, the current page."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QMessageBox,
    QPushButton,
    QScrollArea,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ui import jobs
from ui.pages import Page
from ui.pages.calibration import CalibrationPage
from ui.pages.compare import ComparePage
from ui.pages.export import ExportPage
from ui.pages.model import ModelPage
from ui.pages.quantize import QuantizePage
from ui.pages.report import ReportPage
from ui.pages.settings import SettingsPage
from ui.session import Session
from ui.widgets import PaddedWrapDelegate, show_error
from workbench.errors import WorkbenchError
from workbench.partial import clean_up_stopped
from workbench.run.folders import list_runs, load_run
from workbench.sources import conversion_folders
from workbench.settings import PRESETS

STEP_PAGES = (ModelPage, SettingsPage, CalibrationPage, QuantizePage, ComparePage, ReportPage, ExportPage)
NEEDS = {
    "model": ("model", "Choose a model first (step Model)."),
    "run": ("run_dir", "Quantize a model first, or open one of the earlier runs listed on the left."),
}


def run_title(run_dir: Path) -> str:
    """A run as the list shows it: its whole name, then how it was made and when."""
    try:
        record = load_run(run_dir)
    except WorkbenchError:
        return run_dir.name
    preset = PRESETS.get(record.preset or "")
    if record.tune is not None:
        kind = "Auto-tuned"
    elif preset is not None:
        kind = preset.title + ("" if record.kept(preset.settings) else " (changed)")
    else:
        kind = record.settings.method.upper()
    when = datetime.fromisoformat(record.created).astimezone().strftime("%d %b %Y, %H:%M")
    return f"{run_dir.name}\n{kind} · {when}"


class MainWindow(QMainWindow):
    def __init__(self, runs_dir: Path, model: str | None = None):
        super().__init__()
        self.setWindowTitle("INT4 Workbench")
        self.resize(1200, 860)
        self.session = Session(runs_dir)
        self.pages: list[Page] = [page_class(self.session) for page_class in STEP_PAGES]
        self._closing = False

        self.steps = QListWidget()
        self.steps.setObjectName("steps")
        for number, page in enumerate(self.pages, start=1):
            item = QListWidgetItem(f"{number}   {page.title}")
            item.setToolTip(page.purpose)
            self.steps.addItem(item)
        self.steps.setFixedHeight(self.steps.sizeHintForRow(0) * len(self.pages) + 8)
        self.runs = QListWidget()
        self.runs.setObjectName("runs")
        self.runs.setToolTip("Runs made earlier; double-click one to see its report again.")
        self.runs.setWordWrap(True)  # the whole name, with its preset and date below it
        self.runs.setItemDelegate(PaddedWrapDelegate(self.runs))
        self.runs.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.open_run_button = QPushButton("Open run")
        side = QVBoxLayout()
        side.setSpacing(10)
        side.addWidget(self.steps)
        runs_title = QLabel("Earlier runs")
        runs_title.setObjectName("sideTitle")
        side.addWidget(runs_title)
        side.addWidget(self.runs, 1)
        side.addWidget(self.open_run_button)
        sidebar = QFrame()
        sidebar.setObjectName("sidebar")
        sidebar.setLayout(side)
        sidebar.setFixedWidth(260)

        self.page_title = QLabel()
        self.page_title.setObjectName("pageTitle")
        self.page_purpose = QLabel()
        self.page_purpose.setObjectName("pagePurpose")
        self.page_purpose.setWordWrap(True)
        self.stack = QStackedWidget()
        for page in self.pages:
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setWidget(page)
            self.stack.addWidget(scroll)
        self.back_button = QPushButton("← Back")
        self.next_button = QPushButton()
        self.next_button.setObjectName("primary")
        self.hint = QLabel()
        self.hint.setObjectName("hint")
        self.hint.setWordWrap(True)
        self.hint.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        nav = QHBoxLayout()
        nav.addWidget(self.back_button)
        nav.addWidget(self.hint, 1)
        nav.addWidget(self.next_button)
        main = QVBoxLayout()
        main.setContentsMargins(28, 20, 28, 16)
        main.setSpacing(12)
        main.addWidget(self.page_title)
        main.addWidget(self.page_purpose)
        main.addWidget(self.stack, 1)
        main.addLayout(nav)

        central = QWidget()
        layout = QHBoxLayout(central)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(sidebar)
        layout.addLayout(main, 1)
        self.setCentralWidget(central)
        # What runs stopped by a kill or a crash left behind; the app is where a user would otherwise never see it.
        cleaned = clean_up_stopped([Path(runs_dir), *conversion_folders()])
        self.statusBar().showMessage(" ".join(filter(None, [f"Runs are saved in {runs_dir}.", cleaned])))

        self.steps.currentRowChanged.connect(self._show_step)
        self.back_button.clicked.connect(lambda: self.go(self.current - 1))
        self.next_button.clicked.connect(lambda: self.go(self.current + 1))
        self.runs.itemActivated.connect(lambda item: self.open_run(Path(item.data(Qt.ItemDataRole.UserRole))))
        self.open_run_button.clicked.connect(self._open_selected_run)
        self.runs.currentItemChanged.connect(lambda item, _: self.open_run_button.setEnabled(item is not None))
        for page in self.pages:
            page.changed.connect(self._update_steps)
            page.status.connect(self.statusBar().showMessage)
        self.session.model_changed.connect(self._update_steps)
        self.session.run_changed.connect(self._run_opened)
        self.session.runs_dir_changed.connect(self.refresh_runs)

        self.refresh_runs()
        self.steps.setCurrentRow(0)
        self._update_steps()
        if model:
            QTimer.singleShot(0, lambda: self.page(ModelPage).load(model))

    @property
    def current(self) -> int:
        return self.steps.currentRow()

    def page(self, page_class: type[Page]) -> Page:
        return self.pages[STEP_PAGES.index(page_class)]

    def go(self, index: int) -> None:
        if 0 <= index < len(self.pages) and self.unavailable(index) is None:
            self.steps.setCurrentRow(index)

    def unavailable(self, index: int) -> str | None:
        """Why step `index` cannot be opened now, in words; None when it can."""
        page = self.pages[index]
        if page.needs:
            attribute, reason = NEEDS[page.needs]
            if getattr(self.session, attribute) is None:
                return reason
        return None

    def _show_step(self, index: int) -> None:
        page = self.pages[index]
        self.stack.setCurrentIndex(index)
        self.page_title.setText(f"{index + 1}. {page.title}")
        self.page_purpose.setText(page.purpose)
        page.entered()
        self._update_steps()

    def _update_steps(self) -> None:
        for index in range(len(self.pages)):
            item = self.steps.item(index)
            reason = self.unavailable(index)
            flags = Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsEnabled
            item.setFlags(flags if reason is None else Qt.ItemFlag.NoItemFlags)
            item.setToolTip(reason or self.pages[index].purpose)
        index = self.current
        blocker = self.pages[index].blocker()
        back_reason = self.unavailable(index - 1) if index > 0 else "This is the first step."
        self.back_button.setEnabled(back_reason is None)
        self.back_button.setToolTip(back_reason or "")
        if index + 1 < len(self.pages):
            self.next_button.setText(f"Next: {self.pages[index + 1].title} →")
            reason = blocker or self.unavailable(index + 1)
            self.next_button.setEnabled(reason is None)
            self.next_button.setVisible(True)
        else:
            reason = blocker
            self.next_button.setVisible(False)
        self.hint.setText(reason or "")

    def refresh_runs(self) -> None:
        self.runs.clear()
        for run_dir in list_runs(self.session.runs_dir):
            item = QListWidgetItem(run_title(run_dir))
            item.setData(Qt.ItemDataRole.UserRole, str(run_dir))
            item.setToolTip(str(run_dir))
            self.runs.addItem(item)
        if not self.runs.count():
            placeholder = QListWidgetItem("None yet in this folder")
            placeholder.setFlags(Qt.ItemFlag.NoItemFlags)
            placeholder.setToolTip(str(self.session.runs_dir))
            self.runs.addItem(placeholder)
        self.open_run_button.setEnabled(False)

    def open_run(self, run_dir: Path) -> None:
        try:
            record = load_run(run_dir)
        except WorkbenchError as error:
            show_error(self, "This run cannot be opened", str(error))
            return
        self.session.set_run(run_dir, record)
        self.go(STEP_PAGES.index(ReportPage))

    def _open_selected_run(self) -> None:
        item = self.runs.currentItem()
        if item is not None:
            self.open_run(Path(item.data(Qt.ItemDataRole.UserRole)))

    def _run_opened(self) -> None:
        self.statusBar().showMessage(f"Run: {self.session.run_dir}")
        listed = [self.runs.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.runs.count())]
        if str(self.session.run_dir) not in listed:
            self.refresh_runs()
            listed = [self.runs.item(i).data(Qt.ItemDataRole.UserRole) for i in range(self.runs.count())]
        if str(self.session.run_dir) in listed:  # the open run is the highlighted one
            self.runs.setCurrentRow(listed.index(str(self.session.run_dir)))
        self._update_steps()

    def closeEvent(self, event: QCloseEvent) -> None:
        running = jobs.running()
        if not running:
            event.accept()
            return
        event.ignore()
        if self._closing:
            return
        answer = QMessageBox.question(
            self,
            "Stop and close?",
            "Work is still running. Stop it and close the workbench? Unfinished work is discarded; "
            "finished runs are kept.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        if answer != QMessageBox.StandardButton.Yes:
            return
        self._closing = True
        self.statusBar().showMessage("Stopping the running work, then closing…")
        self.setEnabled(False)
        for job in running:
            job.signals.ended.connect(self._close_when_idle)
            job.cancel()

    def _close_when_idle(self) -> None:
        if not jobs.running():  # the job's own `ended` handler, connected first, has removed it
            self.close()
