"""Step 3, Calibration: example text from a file (with a preview), or written by the model itself."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QButtonGroup,
    QFileDialog,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
)

from ui.jobs import Job
from ui.pages import Page
from ui.widgets import InlineMessage, JobPanel, PageJob, with_tip
from workbench.durations import rough_duration
from workbench.quantization.calibration import SUPPORTED_EXTENSIONS, CalibrationPreview, preview
from workbench.run.pipeline import estimate_run

FILE_FILTER = f"Text files ({' '.join('*' + e for e in SUPPORTED_EXTENSIONS)});;All files (*)"


def preview_file(path: Path, model_dir: Path, *, progress, cancelled) -> CalibrationPreview:
    """The core's preview of a calibration file, tokens counted with the model's own tokenizer."""
    from transformers import AutoTokenizer

    progress(0.0, "loading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    progress(0.3, f"reading {path.name}")
    return preview(path, tokenizer)


class CalibrationPage(Page):
    title = "Calibration"
    purpose = (
        "Careful shrinking reads example text to learn what matters most in the model: give text like what "
        "you will use the model for, or let the model write its own."
    )
    needs = "model"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.not_used = InlineMessage()
        self.body.addWidget(self.not_used)

        self.choice = QGroupBox("Example text")
        self.self_written = QRadioButton()
        with_tip(self.self_written, "data-free")
        self.from_file = QRadioButton("Use text from a file (.txt, .jsonl, .csv or .json)")
        with_tip(self.from_file, "calibration")
        group = QButtonGroup(self)
        group.addButton(self.self_written)
        group.addButton(self.from_file)
        self.path = QLineEdit(placeholderText="a file with text like yours: documents, chats, questions…")
        self.browse = QPushButton("Choose file…")
        file_row = QHBoxLayout()
        file_row.setContentsMargins(28, 0, 0, 0)
        file_row.addWidget(self.path, 1)
        file_row.addWidget(self.browse)
        self.problem = InlineMessage()
        problem_row = QHBoxLayout()
        problem_row.setContentsMargins(28, 0, 0, 0)  # under the field it is about
        problem_row.addWidget(self.problem)
        self.panel = JobPanel()
        self.jobs = PageJob(self, panel=self.panel, failure_title="The file could not be read", problem=self._refuse)
        box = QVBoxLayout(self.choice)
        box.setSpacing(10)
        box.addWidget(self.self_written)
        box.addWidget(self.from_file)
        box.addLayout(file_row)
        box.addLayout(problem_row)
        box.addWidget(self.panel)
        self.body.addWidget(self.choice)

        self.preview_box = QGroupBox("What was found")
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.samples = QVBoxLayout()
        self.samples.setSpacing(6)
        preview_layout = QVBoxLayout(self.preview_box)
        preview_layout.addWidget(self.summary)
        preview_layout.addLayout(self.samples)
        self.preview_box.hide()
        self.body.addWidget(self.preview_box)
        self.body.addStretch(1)

        self.self_written.setChecked(True)
        self.self_written.toggled.connect(self._mode_changed)
        self.browse.clicked.connect(self._pick)
        self.path.editingFinished.connect(lambda: self.use_file(Path(self.path.text())) if self.path.text() else None)
        session.settings_changed.connect(self._settings_changed)
        session.model_changed.connect(self._model_changed)
        for signal in (session.model_changed, session.settings_changed, session.run_changed):
            signal.connect(self._show_writing_time)  # a finished run taught the rates the time comes from
        self._show_writing_time()
        self._mode_changed()
        self._settings_changed()

    def blocker(self) -> str | None:
        if not self.session.settings.needs_calibration:
            return None
        if self.jobs.running:
            return "Wait until the file has been read."
        return self.session.calibration_problem

    def use_file(self, path: Path) -> Job | None:
        """Preview `path` in the background; it becomes the calibration text if it can be read."""
        self.from_file.setChecked(True)
        self.path.setText(str(path))
        self.jobs.drop()
        self.problem.clear()
        self.preview_box.hide()
        if self.session.model is None:
            self._refuse("Choose a model first: the preview counts tokens with its tokenizer.")
            return None
        self.session.set_calibration(None, "Wait until the file has been read.")
        job = Job(preview_file, path, self.session.model.path)
        return self.jobs.start(job, f"Reading {path.name}…", done=self._previewed)

    def use_self_written(self) -> None:
        self.self_written.setChecked(True)

    def _pick(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose example text", "", FILE_FILTER)
        if path:
            self.use_file(Path(path))

    def _mode_changed(self) -> None:
        writes_own = self.self_written.isChecked()
        self.path.setEnabled(not writes_own)
        self.browse.setEnabled(not writes_own)
        if writes_own:
            self.jobs.drop()
            self.problem.clear()
            self.preview_box.hide()
            self.session.set_calibration(None)
        elif not self.path.text():
            self.session.set_calibration(None, "Choose a file with example text, or let the model write its own.")
        self.changed.emit()

    def _settings_changed(self) -> None:
        method = self.session.settings.method
        if self.session.settings.needs_calibration:
            self.not_used.clear()
        else:
            self.not_used.note(
                f"The chosen method ({method.upper()}) does not read example text, so there is nothing to do "
                "here: go on to Quantize. (GPTQ, the presets' method, and AWQ use it.)"
            )
        self.choice.setEnabled(self.session.settings.needs_calibration)
        self.preview_box.setEnabled(self.session.settings.needs_calibration)
        self.changed.emit()

    def _show_writing_time(self) -> None:
        """How long the model takes to write its own text here, from the rates learnt on this machine."""
        session = self.session
        took = ""
        if session.model is not None and session.settings.needs_calibration:
            plan = estimate_run(session.model, session.settings)
            # "here" only for a time this machine measured; before its first run the rate is a typical one.
            where = "here" if "calibration" in plan.measured else "on a typical two-core computer"
            took = f"; takes {rough_duration(plan.stages.get('calibration', 0.0))} {where}"
        self.self_written.setText(f"Let the model write its own (no file needed{took})")

    def _model_changed(self) -> None:
        if self.from_file.isChecked() and self.path.text():
            self.use_file(Path(self.path.text()))  # token counts depend on the model's tokenizer

    def _previewed(self, result: CalibrationPreview) -> None:
        tokens = f"{result.tokens:,} tokens" if result.tokens is not None else "tokens not counted"
        where = "in pieces read across this large file, as calibration reads it" if result.sampled else "in the file"
        self.summary.setText(
            f"<b>{result.samples:,} samples</b>, {tokens}, {result.characters:,} characters {where} "
            f"({result.format.upper()} file). The first samples:"
        )
        while self.samples.count():
            self.samples.takeAt(0).widget().deleteLater()
        for text in result.first_samples:
            sample = QLabel(text)
            sample.setObjectName("sample")
            sample.setWordWrap(True)
            sample.setFrameShape(QFrame.Shape.StyledPanel)
            sample.setTextFormat(Qt.TextFormat.PlainText)
            self.samples.addWidget(sample)
        self.preview_box.show()
        self.session.set_calibration(result.path)

    def _refuse(self, message: str) -> None:
        self.problem.problem(message)
        self.session.set_calibration(None, f"The example text cannot be used: {message}")
        self.changed.emit()
