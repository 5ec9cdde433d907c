"""Step 4, Quantize: the core's `quantize_run` (or `tune_run`) in the background, stage by stage, with Cancel."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

from ui.glossary import tip
from ui.jobs import Job
from ui.pages import Page
from ui.widgets import (
    Collapsible,
    InlineMessage,
    PageJob,
    human_duration,
    with_tip,
)
from workbench.errors import WorkbenchError
from workbench.quantization.methods import METHODS
from workbench.jobs import ProgressEvent, Stage
from workbench.run.pipeline import estimate_run, quantize_run
from workbench.durations import rough_duration
from workbench.run.rates import Estimate
from workbench.run.folders import check_output_dir
from workbench.settings import PRESETS, preset_settings
from workbench.run.tune import CANDIDATES, tune_run
from workbench.run.record import RunRecord
from workbench.units import format_size

SECONDS_SUFFIX = re.compile(r" \(\d+ s\)$")  # the core's elapsed-time counter in long messages
MIN_FRACTION_FOR_ESTIMATE = 0.03
RUNNING, DONE, STOPPED = "running", "done", "stopped"
STATE_MARKS = {RUNNING: "◐", DONE: "✓", STOPPED: "✕"}


def default_run_name(runs_dir: Path, model_name: str, preset: str) -> str:
    """'model-preset-date-time', numbered when a run of the same minute exists."""
    plain = re.sub(r"[^\w.-]+", "-", model_name).strip("-.") or "model"
    base = f"{plain}-{preset}-{datetime.datetime.now():%Y%m%d-%H%M}"
    name, number = base, 2
    while (runs_dir / name).exists():
        name, number = f"{base}-{number}", number + 1
    return name


class StageRow:
    """One stage, as the core names it: a mark, its title, a bar (busy while it runs) and what it is doing or took."""

    def __init__(self, grid: QGridLayout, stage: Stage):
        self.mark = QLabel()
        self.mark.setObjectName("stageMark")
        self.title = QLabel(stage.title)
        if stage.term:
            with_tip(self.title, stage.term)
        self.bar = QProgressBar()
        self.bar.setTextVisible(False)
        self.bar.setMaximumWidth(220)
        self.detail = QLabel()
        self.detail.setObjectName("stageDetail")
        row = grid.rowCount()
        for column, widget in enumerate((self.mark, self.title, self.bar, self.detail)):
            grid.addWidget(widget, row, column)
        self.started = 0.0
        self.set_state(RUNNING)

    def set_state(self, state: str, detail: str = "") -> None:
        self.state = state
        self.mark.setText(STATE_MARKS[state])
        self.mark.setProperty("state", state)
        self.mark.style().unpolish(self.mark)
        self.mark.style().polish(self.mark)
        self.bar.setRange(0, 0 if state == RUNNING else 1)  # a busy bar while running
        self.bar.setValue(1 if state == DONE else 0)
        if state == RUNNING:
            self.started = time.monotonic()
        self.detail.setText(detail)


class QuantizePage(Page):
    title = "Quantize"
    purpose = (
        "Make the INT4 copy of the model. The expected time is below. Meanwhile you can keep using the window: "
        "look at earlier runs, or change steps 1–3 for the next run (a run keeps the choices it started with)."
    )
    needs = "model"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.jobs = PageJob(self, failure_title="Quantizing stopped", problem=self._failed, ended=self._ended,
                            explain_always=True)
        self._began = 0.0
        self._fraction = 0.0
        self._plan: Estimate | None = None  # the stages' expected seconds, for a run of one setting
        self._stage, self._stage_began = None, 0.0
        self._name_edited = False
        self._last_logged = ""
        self._running_choices: tuple | None = None  # what the running job was started with

        plan = QGroupBox("What will happen")
        form = QFormLayout(plan)
        form.setVerticalSpacing(10)
        form.setHorizontalSpacing(24)
        self.model_label = QLabel()
        self.settings_label = QLabel()
        self.calibration_label = QLabel()
        self.time_label = QLabel()
        for label in (self.model_label, self.settings_label, self.calibration_label, self.time_label):
            label.setWordWrap(True)
        self.name = QLineEdit()
        self.name.setToolTip("The name of the new folder that will hold both models, the figures and the report.")
        self.folder_label = QLabel()
        self.folder_label.setWordWrap(True)
        self.folder_button = QPushButton("Change…")
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_label, 1)
        folder_row.addWidget(self.folder_button)
        self.name_problem = InlineMessage()
        self.next_note = InlineMessage()
        form.addRow(self.next_note)
        form.addRow("Model", self.model_label)
        form.addRow("Settings", self.settings_label)
        form.addRow("Example text", self.calibration_label)
        form.addRow("Expected time", self.time_label)
        form.addRow("Save as", self.name)
        form.addRow("In", folder_row)
        form.addRow("", self.name_problem)
        self.start_button = QPushButton("Start quantizing")
        self.start_button.setObjectName("primary")
        start_row = QHBoxLayout()
        start_row.addWidget(self.start_button)
        start_row.addStretch(1)
        form.addRow("", start_row)
        self.body.addWidget(plan)

        progress = QGroupBox("Progress")
        layout = QVBoxLayout(progress)
        layout.setSpacing(12)
        self.overall = QProgressBar()
        self.overall.setRange(0, 1000)
        self.overall.setFormat("%p %")
        self.times = QLabel("Not started. The steps appear here as they begin.")
        self.stage_grid = QGridLayout()
        self.stage_grid.setHorizontalSpacing(14)
        self.stage_grid.setVerticalSpacing(8)
        self.stage_grid.setColumnStretch(3, 1)
        self.rows: dict[str, StageRow] = {}
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop quantizing; nothing half-written is kept.")
        self.cancel_button.setEnabled(False)
        top = QHBoxLayout()
        top.addWidget(self.overall, 1)
        top.addWidget(self.cancel_button)
        self.result = InlineMessage()
        self.log = QPlainTextEdit(readOnly=True)
        self.log.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.log.setMinimumHeight(140)
        self.log.setMaximumBlockCount(2000)
        layout.addLayout(top)
        layout.addWidget(self.times)
        layout.addLayout(self.stage_grid)
        layout.addWidget(self.result)
        self.log_section = Collapsible("Log", self.log)
        layout.addWidget(self.log_section)
        self.body.addWidget(progress)
        self.body.addStretch(1)

        self._clock = QTimer(self, interval=1000)
        self._clock.timeout.connect(self._show_times)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.folder_button.clicked.connect(self._pick_folder)
        self.name.textEdited.connect(self._name_typed)
        self.name.textChanged.connect(self._check_name)
        for signal in (session.model_changed, session.settings_changed, session.calibration_changed,
                       session.runs_dir_changed):
            signal.connect(self._refresh_plan)
        self._refresh_plan()

    # The plan ---------------------------------------------------------------------------------

    def blocker(self) -> str | None:
        return "Wait until quantizing finishes (or cancel it)." if self.jobs.running else None

    def _start_blocker(self) -> str | None:
        session = self.session
        if session.model is None:
            return "Choose a model first (step Model)."
        if session.tune is not None and session.tune.text is None:
            return "Choose the text auto-tune judges quality on (step Settings)."
        if self._reads_calibration() and session.calibration_problem:
            return f"{session.calibration_problem} (step Calibration)"
        return self._name_problem()

    def _name_problem(self) -> str | None:
        name = self.name.text().strip()
        if not name:
            return "Give the new run folder a name."
        if name != Path(name).name or name.startswith("."):
            return "Use a plain folder name, without slashes and not starting with a dot."
        try:
            check_output_dir(self.session.runs_dir / name, 0)
        except WorkbenchError as error:
            return str(error)
        return None

    def _reads_calibration(self) -> bool:
        if self.session.tune is not None:
            return any(settings.needs_calibration for settings in CANDIDATES)
        return self.session.settings.needs_calibration

    def _run_kind(self) -> str:
        """The run's name part after the model: its preset, or 'tuned'."""
        return "tuned" if self.session.tune is not None else self.session.preset

    def entered(self) -> None:
        self._refresh_plan()

    def _choices(self) -> tuple:
        session = self.session
        return session.model, session.preset, session.settings, session.tune, session.calibration

    def _refresh_plan(self) -> None:
        session = self.session
        if self._running_choices is not None:  # the plan shown is the running job's until it ends
            if self._choices() != self._running_choices:
                self.next_note.note("You changed steps 1–3 while this run goes on: it keeps the choices below, "
                                    "and your new ones are used when you start the next run.")
            else:
                self.next_note.clear()
            return
        self.folder_label.setText(str(session.runs_dir))
        if session.model is None:
            self.model_label.setText("none yet")
        else:
            info = session.model.info
            self.model_label.setText(f"{info.name} ({format_size(info.fp32_bytes)} of 32-bit weights)")
            if not self._name_edited and not self.jobs.running:
                self.name.setText(default_run_name(session.runs_dir, info.name, self._run_kind()))
        self._describe_settings()
        if not self._reads_calibration():
            self.calibration_label.setText(f"not used by {session.settings.method.upper()}")
        elif session.calibration is not None:
            self.calibration_label.setText(session.calibration.name)
        else:
            self.calibration_label.setText(session.calibration_problem or "written by the model itself")
        if session.model is None:
            self.time_label.setText("–")
        elif session.tune is not None:
            self.time_label.setText(f"several runs: up to {len(CANDIDATES)} settings are tried")
        else:
            plan = self._estimate()
            self.time_label.setText(f"{rough_duration(plan.seconds)}\n{plan.basis_sentence}")
        self._check_name()

    def _estimate(self) -> Estimate:
        session = self.session
        return estimate_run(session.model, session.settings, session.calibration)

    def _describe_settings(self) -> None:
        session = self.session
        if session.tune is not None:
            text = session.tune.text.name if session.tune.text else "a text still to choose"
            self.settings_label.setToolTip(tip("perplexity"))
            self.settings_label.setText(
                f"Auto-tune: the smallest of {len(CANDIDATES)} settings whose perplexity on {text} rises no more "
                f"than {session.tune.max_quality_loss_pct:g} %"
            )
            return
        settings = session.settings
        changed = " (changed)" if settings != preset_settings(session.preset) else ""
        eight_bit = f", kept at 8 bits: {', '.join(settings.eight_bit)}" if settings.eight_bit else ""
        self.settings_label.setToolTip(
            "\n\n".join(tip(term) for term in (METHODS[settings.method].term, "block size", "symmetric"))
        )
        # Plain words first (the method's own title names it); the terms are in the tooltip.
        self.settings_label.setText(
            f"{PRESETS[session.preset].title}{changed}: {METHODS[settings.method].title}; one scale per "
            f"{settings.block_size} weights{', symmetric' if settings.symmetric else ''}{eight_bit}"
        )

    def _name_typed(self) -> None:
        self._name_edited = True

    def _check_name(self) -> None:
        problem = self._name_problem()
        if problem and self.name.text().strip():
            self.name_problem.problem(problem)
        else:
            self.name_problem.clear()
        blocker = self._start_blocker()
        self.start_button.setEnabled(not self.jobs.running and blocker is None)
        self.start_button.setToolTip(blocker or "Export, shrink and measure the model.")

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Where to keep the runs", str(self.session.runs_dir))
        if folder:
            self.session.set_runs_dir(Path(folder))

    # The job ----------------------------------------------------------------------------------

    def start(self) -> Job | None:
        blocker = self._start_blocker()
        if blocker or self.jobs.running:
            self.result.problem(blocker or "Already quantizing.")
            return None
        session = self.session
        run_dir = session.runs_dir / self.name.text().strip()
        calibration = session.calibration if self._reads_calibration() else None
        if session.tune is not None:
            job = Job(tune_run, session.model, run_dir, session.tune.max_quality_loss_pct, text=session.tune.text,
                      calibration=calibration, trust_remote_code=session.trust_remote_code)
        else:
            job = Job(quantize_run, session.model, run_dir, session.settings, calibration=calibration,
                      trust_remote_code=session.trust_remote_code, preset=session.preset)
        job.signals.progress.connect(self._progress)
        self._reset_rows()
        self.log.clear()
        self._last_logged = ""
        self.result.clear()
        self._began, self._fraction = time.monotonic(), 0.0
        self._plan = self._estimate() if session.tune is None else None
        self._running_choices = self._choices()
        self._stage, self._stage_began = None, self._began
        self.overall.setValue(0)
        self._clock.start()
        self._show_times()
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.name.setEnabled(False)
        self.folder_button.setEnabled(False)
        return self.jobs.start(job, done=self._finished, cancelled=self._cancelled)

    def cancel(self) -> None:
        if self.jobs.running:
            self.jobs.cancel()
            self.cancel_button.setEnabled(False)
            self.times.setText("Stopping… the current step ends its piece of work first.")

    def _reset_rows(self) -> None:
        while self.stage_grid.count():
            self.stage_grid.takeAt(0).widget().deleteLater()
        self.rows = {}

    def _progress(self, event: ProgressEvent) -> None:
        """A row per stage, in the order the stages start; the ones before a new stage are over."""
        stage = event.stage
        if stage is None:
            return
        if stage.name not in self.rows:
            for earlier in self.rows.values():
                self._finish_row(earlier)
            self.rows[stage.name] = StageRow(self.stage_grid, stage)
            self._stage, self._stage_began = stage.name, time.monotonic()
        row = self.rows[stage.name]
        if event.message == "done":
            self._finish_row(row)
        elif row.state == RUNNING:
            row.detail.setText(event.message)
            done = self._plan.stage_fraction(stage.name, event.fraction) if self._plan else 0.0
            if done > 0:  # the stage counts its work: a bar that fills instead of a busy one
                row.bar.setRange(0, 1000)
                row.bar.setValue(round(done * 1000))
        self._fraction = event.fraction
        self.overall.setValue(round(event.fraction * 1000))
        self.status.emit(f"Quantizing: {self.overall.text()}. {stage.title}")  # the bar's own figure, not a second rounding
        self._log(f"{stage.title}: {event.message}")

    def _finish_row(self, row: StageRow) -> None:
        if row.state != DONE:
            row.set_state(DONE, human_duration(time.monotonic() - row.started))

    def _log(self, message: str) -> None:
        steady = SECONDS_SUFFIX.sub("", message)
        if steady != self._last_logged:
            self._last_logged = steady
            self.log.appendPlainText(f"{human_duration(time.monotonic() - self._began):>10}  {steady}")

    def _show_times(self) -> None:
        elapsed = time.monotonic() - self._began
        text = f"Elapsed {human_duration(elapsed)}"
        if self._plan is not None and self._stage is not None:
            # The stages to come at the rates measured on this machine; the current one at its own pace.
            finished = [name for name, row in self.rows.items() if row.state == DONE]
            remaining = self._plan.remaining(finished, self._stage, self._plan.stage_fraction(self._stage, self._fraction),
                                             time.monotonic() - self._stage_began)
            text += f" · {rough_duration(remaining)} left"
        elif self._fraction >= MIN_FRACTION_FOR_ESTIMATE:
            remaining = elapsed * (1 - self._fraction) / self._fraction
            text += f" · about {human_duration(remaining)} left"
        self.times.setText(text)

    def _finished(self, record: RunRecord) -> None:
        for name, row in self.rows.items():
            row.set_state(DONE, human_duration(record.timings_s.get(name, 0.0)))
        self.overall.setValue(1000)
        self.times.setText(f"Finished in {human_duration(time.monotonic() - self._began)}.")
        self.result.note(
            f"Done: {format_size(record.original.bytes)} → {format_size(record.int4.bytes)} on disk "
            f"({record.size_ratio:.1f}x smaller), "
            + (f"{record.ram_ratio:.1f}x less RAM. Saved in {record.run_dir}. Next: compare the two models' answers."
               if record.ram_ratio else f"the original was not run: {record.original.skipped}. Saved in "
               f"{record.run_dir}. Next: try the 4-bit model's answers.")
            + (f"\n{record.tune['explanation']}" if record.tune else "")
        )
        self._name_edited = False
        self.session.set_run(Path(record.run_dir), record)

    def _failed(self, message: str) -> None:
        self._stop_rows()
        self.times.setText("Stopped by a problem; nothing was kept.")
        self.result.problem(message)

    def _cancelled(self) -> None:
        self._stop_rows()
        self.times.setText("Cancelled; nothing was kept.")
        self.result.note("Cancelled. Nothing was written; start again whenever you like.")

    def _stop_rows(self) -> None:
        for row in self.rows.values():
            if row.state == RUNNING:
                row.set_state(STOPPED, "stopped")

    def _ended(self) -> None:
        self._clock.stop()
        self.cancel_button.setEnabled(False)
        self.name.setEnabled(True)
        self.folder_button.setEnabled(True)
        self.status.emit(self.times.text())
        # The choices made meanwhile, a new default name (the old folder now exists), the rows kept as the run left them.
        self._running_choices = None
        self.next_note.clear()
        self._refresh_plan()
