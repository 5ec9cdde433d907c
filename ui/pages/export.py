"""Step 7, Export: where the INT4 model and its figures are, and how to take them elsewhere."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton

from exporters.onnx_export import folder_bytes
from ui.pages import Page
from ui.widgets import human_bytes, open_path, with_tip
from workbench.report import CHART_FILE, REPORT_FILE
from workbench.runs import INT4, ORIGINAL, RUN_FILE

CONTENTS = (
    (INT4, "The INT4 model and its tokenizer: the part to deploy. It runs with ONNX Runtime."),
    (ORIGINAL, "The original model as 32-bit ONNX, for comparisons."),
    (REPORT_FILE, "The report: what was saved and what it cost, in plain words."),
    (CHART_FILE, "The memory chart."),
    (RUN_FILE, "Every setting and figure of this run, for tools and for later."),
)


class ExportPage(Page):
    title = "Export"
    purpose = "Take the INT4 model with you: everything of this run is in one folder."
    needs = "run"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.folder = QLabel()
        self.folder.setObjectName("verdict")
        self.folder.setWordWrap(True)
        self.folder.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_button = QPushButton("Open folder")
        self.open_button.setObjectName("primary")
        row = QHBoxLayout()
        row.addWidget(self.open_button)
        row.addStretch(1)
        self.body.addWidget(self.folder)
        self.body.addLayout(row)

        contents = QGroupBox("In the folder")
        grid = QGridLayout(contents)
        grid.setHorizontalSpacing(24)
        grid.setVerticalSpacing(10)
        grid.setColumnStretch(2, 1)
        self.sizes: dict[str, QLabel] = {}
        for row_index, (name, meaning) in enumerate(CONTENTS):
            is_folder = "." not in name
            grid.addWidget(QLabel(f"<b>{name}{'/' if is_folder else ''}</b>"), row_index, 0)
            self.sizes[name] = QLabel()
            grid.addWidget(self.sizes[name], row_index, 1, alignment=Qt.AlignmentFlag.AlignRight)
            description = QLabel(meaning)
            description.setWordWrap(True)
            if name == INT4:
                with_tip(description, "ONNX")
            grid.addWidget(description, row_index, 2)
        self.body.addWidget(contents)
        how = QLabel(
            "To use the model on another computer, copy the <b>int4</b> folder: it holds the model "
            "(model.onnx and its weights), the tokenizer and the configuration files that ONNX Runtime "
            "and a tokenizer library need."
        )
        how.setWordWrap(True)
        self.body.addWidget(how)
        self.body.addStretch(1)
        self.open_button.clicked.connect(lambda: open_path(self.session.run_dir))
        session.run_changed.connect(self.entered)

    def entered(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is None:
            return
        self.folder.setText(f"This run is saved in <b>{run_dir}</b>")
        for name, label in self.sizes.items():
            path = run_dir / name
            if path.is_dir():
                label.setText(human_bytes(folder_bytes(path)))
            else:
                label.setText(human_bytes(path.stat().st_size) if path.is_file() else "missing")
