"""One page per step of the journey; the main window shows each page's title and purpose above it."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QVBoxLayout, QWidget

from ui.session import Session


class Page(QWidget):
    title = ""
    purpose = ""  # one sentence: what this step is for
    needs = None  # "model" or "run": what must exist before the step can be opened
    changed = Signal()  # whether Next may be pressed may have changed
    status = Signal(str)  # a short message for the window's status bar

    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self.body = QVBoxLayout(self)
        self.body.setContentsMargins(0, 0, 0, 0)
        self.body.setSpacing(16)

    def blocker(self) -> str | None:
        """Why the user cannot go on from this page yet, in words; None when they can."""
        return None

    def entered(self) -> None:
        """The page is being shown."""
