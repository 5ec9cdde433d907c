"""Small pieces shared by the pages: number formats, messages, the fit verdict, charts, job panels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QElapsedTimer, QSize, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ui.glossary import tip
from ui.theme import RUN_ITEM_PADDING_X
from ui.jobs import Job
from workbench.jobs import ProgressEvent
from workbench.durations import human_duration  # noqa: F401 (the pages take it from here)
from workbench.run.memory import FITS, NO_FIT, TIGHT, fit_verdict
from workbench.units import format_size

if TYPE_CHECKING:
    from ui.pages import Page

FIT_COLOURS = {FITS: "#2e7d32", TIGHT: "#b26a00", NO_FIT: "#c62828"}


def human_count(value: int) -> str:
    if value >= 1e9:
        return f"{value / 1e9:,.1f} billion"
    if value >= 1e6:
        return f"{value / 1e6:,.1f} million"
    return f"{value:,}"


def with_tip(widget: QWidget, term: str) -> QWidget:
    """Give `widget` the plain-words explanation of `term` as its tooltip."""
    widget.setToolTip(tip(term))
    if isinstance(widget, QLabel):  # a plain label gives no other hint that it explains itself
        widget.setCursor(Qt.CursorShape.WhatsThisCursor)
    return widget


def term_label(text: str, term: str) -> QLabel:
    return with_tip(QLabel(text), term)


def show_error(parent: QWidget, title: str, message: str, details: str = "") -> QMessageBox:
    """A window-modal message; a traceback, if any, only behind its "Show Details..." button."""
    box = QMessageBox(QMessageBox.Icon.Warning, title, message, QMessageBox.StandardButton.Ok, parent)
    box.setObjectName("errorDialog")
    if details:
        box.setDetailedText(details)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.open()
    return box


def open_path(path: Path) -> bool:
    """Show `path` with the desktop's program for it; False where none could be started."""
    return QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))


class PaddedWrapDelegate(QStyledItemDelegate):
    """Wraps an item's lines at the width they are painted in: without it Qt wraps them at the whole
    row's width, and the style sheet's padding then leaves too little room, so the end is cut to "…"."""

    def sizeHint(self, option: QStyleOptionViewItem, index) -> QSize:  # noqa: N802 (Qt's name)
        narrowed = QStyleOptionViewItem(option)
        if option.rect.isValid():
            narrowed.rect = option.rect.adjusted(0, 0, -2 * RUN_ITEM_PADDING_X, 0)
        return super().sizeHint(narrowed, index)


class InlineMessage(QLabel):
    """A message next to the field it is about: a problem (and what to do) or a plain note."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("inline")
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.hide()

    def problem(self, text: str) -> None:
        self._show(text, "problem")

    def note(self, text: str) -> None:
        self._show(text, "note")

    def clear(self) -> None:
        self.setText("")
        self.hide()

    def _show(self, text: str, kind: str) -> None:
        self.setProperty("kind", kind)
        self.style().unpolish(self)
        self.style().polish(self)
        self.setText(text)
        self.updateGeometry()
        self.show()


class FitLabel(QLabel):
    """'● fits comfortably: needs about 1.9 GiB of the 21.7 GiB free' in the verdict's colour."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWordWrap(True)
        self.verdict = ""

    def set_fit(self, needed: int, available: int) -> None:
        self.verdict = fit_verdict(needed, available)
        self.setText(
            f'<span style="color:{FIT_COLOURS[self.verdict]}; font-weight:600">● {self.verdict}</span>'
            f" &nbsp;needs about {format_size(needed)} of the {format_size(available)} free"
        )


class ChartView(QLabel):
    """A picture (the core's memory chart) scaled to the available width, never stretched."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._pixmap = QPixmap()
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(320)

    def load(self, path: Path) -> None:
        self._pixmap = QPixmap(str(path))  # a fresh read: the file is rewritten when figures change
        self._rescale()

    def hasHeightForWidth(self) -> bool:
        return not self._pixmap.isNull()

    def heightForWidth(self, width: int) -> int:
        width = min(width, self._pixmap.width())
        return round(width * self._pixmap.height() / max(self._pixmap.width(), 1))

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self._rescale()

    def _rescale(self) -> None:
        if self._pixmap.isNull():
            self.clear()
            return
        width = min(self.width(), self._pixmap.width())
        self.setPixmap(
            self._pixmap.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation)
        )
        self.updateGeometry()


class Collapsible(QWidget):
    """A header button that shows or hides a body (Advanced settings, the log)."""

    toggled = Signal(bool)

    def __init__(self, title: str, body: QWidget, parent: QWidget | None = None):
        super().__init__(parent)
        self.button = QToolButton(text=title, checkable=True)
        self.button.setObjectName("collapsible")
        self.button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.button.setArrowType(Qt.ArrowType.RightArrow)
        self.body = body
        body.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.button, alignment=Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(body)
        self.button.toggled.connect(self.set_open)

    def set_open(self, open_: bool) -> None:
        self.button.setChecked(open_)
        self.button.setArrowType(Qt.ArrowType.DownArrow if open_ else Qt.ArrowType.RightArrow)
        self.body.setVisible(open_)
        self.toggled.emit(open_)


class JobPanel(QWidget):
    """Progress bar, latest message, elapsed time and a Cancel button for one running job."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.message = QLabel()
        self.message.setObjectName("jobMessage")
        self.message.setWordWrap(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop this step; nothing half-done is kept.")
        row = QHBoxLayout()
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.message)
        self._job: Job | None = None
        self._clock = QElapsedTimer()
        self.cancel_button.clicked.connect(self.cancel)
        self.hide()

    def follow(self, job: Job, message: str) -> None:
        self._job = job
        self._clock.start()
        self.bar.setRange(0, 0)  # busy until the step reports its first fraction
        self.message.setText(message)
        self.cancel_button.setEnabled(True)
        # A job replaced by a newer one may still report; only the followed job counts.
        job.signals.progress.connect(lambda event: self._progress(job, event))
        job.signals.ended.connect(lambda: self._ended(job))
        self.show()

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.cancel_button.setEnabled(False)
            self.message.setText("Stopping…")

    def _progress(self, job: Job, event: ProgressEvent) -> None:
        if job is not self._job or job.cancel_requested:
            return
        self.bar.setRange(0, 1000)
        self.bar.setValue(round(event.fraction * 1000))
        doing = f"{event.stage.title}: {event.message}" if event.stage else event.message
        self.message.setText(f"{doing} · {human_duration(self._clock.elapsed() / 1000)}")

    def _ended(self, job: Job) -> None:
        if job is self._job:
            self._job = None
            self.hide()


class PageJob:
    """A page's one background job at a time, and its whole lifecycle.

    A page says what to run and what to do with the result (`start(job, message, done=...)`); this
    follows the job in the page's JobPanel, ignores whatever a replaced job still reports, shows a
    failure (`problem`, then a dialog: always with `explain_always`, else only for an unexpected
    error's details), and when the job ends forgets it, calls `ended` and tells the window.
    """

    def __init__(
        self,
        page: Page,
        *,
        failure_title: str,
        problem: Callable[[str], None],
        panel: JobPanel | None = None,
        ended: Callable[[], None] | None = None,
        explain_always: bool = False,
    ):
        self.page, self.panel, self.failure_title = page, panel, failure_title
        self._problem, self._on_end, self._explain_always = problem, ended, explain_always
        self.job: Job | None = None

    @property
    def running(self) -> bool:
        return self.job is not None

    def start(
        self,
        job: Job,
        message: str = "",
        *,
        done: Callable[[object], None] | None = None,
        cancelled: Callable[[], None] | None = None,
        replace: bool = False,
    ) -> Job | None:
        """Start `job` (None if one is running, unless `replace` drops that one); `done(result)` when it finishes."""
        if self.job is not None:
            if not replace:
                return None
            self.drop()
        self.job = job

        def current() -> bool:
            return job is self.job

        if done is not None:
            job.signals.finished.connect(lambda result: done(result) if current() else None)
        if cancelled is not None:
            job.signals.cancelled.connect(lambda: cancelled() if current() else None)
        job.signals.failed.connect(lambda message, details: self._failed(message, details) if current() else None)
        job.signals.ended.connect(lambda: self._ended(job))
        if self.panel is not None:
            self.panel.follow(job, message)
        self.page.changed.emit()
        return job.start()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def drop(self) -> None:
        """Stop the job the user no longer wants; what it still reports is ignored."""
        if self.job is not None:
            if self.panel is not None:
                self.panel.cancel()
            else:
                self.job.cancel()
            self.job = None

    def _failed(self, message: str, details: str) -> None:
        self._problem(message)
        if details or self._explain_always:
            show_error(self.page, self.failure_title, message, details)

    def _ended(self, job: Job) -> None:
        if job is self.job:
            self.job = None
            if self._on_end is not None:
                self._on_end()
            self.page.changed.emit()
