"""Small pieces shared by the pages: number formats, messages, the fit verdict, charts, job panels."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QElapsedTimer, Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ui.glossary import tip
from ui.jobs import Job
from workbench.durations import human_duration  # noqa: F401 (the pages take it from here)
from workbench.run.memory import FITS, NO_FIT, TIGHT, fit_verdict

FIT_COLOURS = {FITS: "#2e7d32", TIGHT: "#b26a00", NO_FIT: "#c62828"}


def human_bytes(value: float) -> str:
    if value >= 1e9:
        return f"{value / 1e9:,.1f} GB"
    return f"{value / 1e6:,.0f} MB" if value >= 1e6 else f"{value / 1e3:,.0f} kB"


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
    """'● fits comfortably: needs about 1.9 GB of the 21.7 GB free' in the verdict's colour."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWordWrap(True)
        self.verdict = ""

    def set_fit(self, needed: int, available: int) -> None:
        self.verdict = fit_verdict(needed, available)
        self.setText(
            f'<span style="color:{FIT_COLOURS[self.verdict]}; font-weight:600">● {self.verdict}</span>'
            f" &nbsp;needs about {human_bytes(needed)} of the {human_bytes(available)} free"
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
        job.signals.progress.connect(lambda fraction, text: self._progress(job, fraction, text))
        job.signals.ended.connect(lambda: self._ended(job))
        self.show()

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.cancel_button.setEnabled(False)
            self.message.setText("Stopping…")

    def _progress(self, job: Job, fraction: float, message: str) -> None:
        if job is not self._job or job.cancel_requested:
            return
        self.bar.setRange(0, 1000)
        self.bar.setValue(round(fraction * 1000))
        self.message.setText(f"{message} · {human_duration(self._clock.elapsed() / 1000)}")

    def _ended(self, job: Job) -> None:
        if job is self._job:
            self._job = None
            self.hide()
