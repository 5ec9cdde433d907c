"""Step 6, Report: what was saved (disk, RAM), what it cost (quality on the user's text), a verdict."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ui.glossary import tip
from ui.jobs import Job
from ui.pages import Page
from ui.pages.calibration import FILE_FILTER
from ui.widgets import (
    ChartView,
    InlineMessage,
    JobPanel,
    PageJob,
    open_path,
    term_label,
)
from workbench.generation.bench import NEW_TOKENS, bench_run
from workbench.quality.evaluate import evaluate_run
from workbench.generation.chat import list_conversations
from workbench.layout import CHART_FILE, INT4, ORIGINAL, REPORT_FILE, TUNE_CHART_FILE
from workbench.quality.verdict import scale_words
from workbench.run.folders import load_run
from workbench.run.record import Speed
from workbench.run.wording import figure_rows, quality_cells, speed_note, speed_rows, verdict

QUALITY_COLUMNS = (
    ("Text", None),
    ("Tokens", "tokens"),
    ("Surprise at the text, original → INT4", "perplexity"),
    ("Change", "perplexity"),
    ("Same next word", "top-1 agreement"),
    ("Drift (KL)", "KL"),
)


def figure_grid(rows) -> tuple[QGridLayout, dict[str, tuple[QLabel, QLabel, QLabel]]]:
    """A small table: a row per (key, title, term), columns original, INT4 and how they differ."""
    grid = QGridLayout()
    grid.setHorizontalSpacing(28)
    grid.setVerticalSpacing(6)
    for column, heading in enumerate(("", "Original", "INT4", "")):
        grid.addWidget(QLabel(f"<b>{heading}</b>"), 0, column)
    cells = {}
    for row, (key, title, term) in enumerate(rows, start=1):
        grid.addWidget(term_label(title, term) if term else QLabel(title), row, 0)
        cells[key] = (QLabel(), QLabel(), QLabel())
        for column, cell in enumerate(cells[key], start=1):
            grid.addWidget(cell, row, column)
    grid.setColumnStretch(3, 1)
    return grid, cells


def fill(cells: dict[str, tuple[QLabel, ...]], rows: dict[str, tuple[str, ...]]) -> None:
    for key, texts in rows.items():
        for cell, text in zip(cells[key], texts, strict=True):
            cell.setText(text)


class ReportPage(Page):
    title = "Report"
    purpose = "See what the INT4 model saves and what it costs, measured on a text of your own."
    needs = "run"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.verdict = QLabel()
        self.verdict.setObjectName("verdict")
        self.verdict.setWordWrap(True)
        self.verdict.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.verdict.setToolTip("\n\n".join(tip(term) for term in ("perplexity", "top-1 agreement")))
        self.body.addWidget(self.verdict)

        self.measure_button = QPushButton("Measure quality on a text…")
        self.measure_button.setObjectName("primary")
        self.measure_button.setToolTip(
            "Both models read the same text; the workbench compares how well each predicts it. "
            "A few pages of text like yours is enough."
        )
        self.open_report = QPushButton("Open the written report")
        buttons = QHBoxLayout()
        buttons.addWidget(self.measure_button)
        buttons.addWidget(self.open_report)
        buttons.addStretch(1)
        self.body.addLayout(buttons)
        self.problem = InlineMessage()
        self.panel = JobPanel()
        self.jobs = PageJob(self, panel=self.panel, failure_title="Quality could not be measured",
                            problem=self.problem.problem, ended=self._ended)
        self.body.addWidget(self.problem)
        self.body.addWidget(self.panel)

        memory = QGroupBox("Memory")
        memory_layout = QVBoxLayout(memory)
        self.chart = ChartView()
        self.chart.setToolTip("Disk and RAM of each part of the model, original (left bar) and INT4 (right bar).")
        memory_layout.addWidget(self.chart)
        figures, self.figures = figure_grid(
            # Two peaks are measured (here: loading and a short answer; under Speed: a longer test), so
            # each row says which one it is.
            (("disk", "Model on disk", None), ("ram", "Peak RAM: loading, a short answer", "peak memory"),
             ("bits", "Average bits per number stored", "bits per weight"))
        )
        memory_layout.addLayout(figures)

        quality = QGroupBox("Quality")
        quality_layout = QVBoxLayout(quality)
        self.quality_note = QLabel()
        self.quality_note.setWordWrap(True)
        self.quality = QTableWidget(0, len(QUALITY_COLUMNS))
        self.quality.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.quality.verticalHeader().hide()
        self.quality.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.quality.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column, (title, term) in enumerate(QUALITY_COLUMNS):
            item = QTableWidgetItem(title)
            if term:
                item.setToolTip(tip(term))
            self.quality.setHorizontalHeaderItem(column, item)
        quality_layout.addWidget(self.quality_note)
        quality_layout.addWidget(self.quality)
        self.body.addWidget(quality)

        self.tune = QGroupBox("Auto-tune: the candidates tried")
        tune_layout = QVBoxLayout(self.tune)
        self.tune_note = QLabel()
        self.tune_note.setWordWrap(True)
        self.tune_chart = ChartView()
        self.tune_chart.setToolTip("Each point is one candidate setting: its size (across) and how much its "
                                   "perplexity rose on your text (up). The dashed line is the budget.")
        tune_layout.addWidget(self.tune_note)
        tune_layout.addWidget(self.tune_chart)
        self.body.addWidget(self.tune)

        speed = QGroupBox("Speed")
        speed_layout = QVBoxLayout(speed)
        self.speed_note = QLabel()
        self.speed_note.setWordWrap(True)
        self.speed_button = QPushButton("Measure speed")
        self.speed_button.setToolTip(
            f"Each model writes {NEW_TOKENS} tokens of the same prose, in turn, three times; the middle "
            "result counts. About a minute for a small model."
        )
        speed_grid, self.speed_figures = figure_grid(
            (("tokens_per_s", "Writing speed", "tok/s"), ("ttft_s", "First token after", "TTFT"),
             ("peak_rss_bytes", "Peak RAM during this test", "peak memory"))
        )
        self.speed_table = QWidget()
        self.speed_table.setLayout(speed_grid)
        speed_layout.addWidget(self.speed_note)
        speed_layout.addWidget(self.speed_table)
        speed_layout.addWidget(self.speed_button, alignment=Qt.AlignmentFlag.AlignLeft)
        self.body.addWidget(speed)
        self.body.addWidget(memory)  # last: the chart is the tallest part
        self.body.addStretch(1)

        self.measure_button.clicked.connect(self._pick_text)
        self.speed_button.clicked.connect(self.measure_speed)
        self.open_report.clicked.connect(self._open_report)
        session.run_changed.connect(self._show_run)

    def blocker(self) -> str | None:
        return "Wait until the measurement has finished (or cancel it)." if self.jobs.running else None

    def _open_report(self) -> None:
        path = self.session.run_dir / REPORT_FILE
        if not open_path(path):
            self.problem.note(f"No program to show it was found here; the report is {path}.")

    def measure(self, text: Path) -> Job | None:
        """Measure quality on `text` in the background; the figures land in run.json and here."""
        return self._start(Job(evaluate_run, self.session.run_dir, Path(text)),
                           f"Reading {Path(text).name} with both models…")

    def measure_speed(self) -> Job | None:
        """The core's speed bench (as `int4-workbench bench` runs it) in the background."""
        return self._start(Job(bench_run, self.session.run_dir), "Timing both models…")

    def _start(self, job: Job, message: str) -> Job | None:
        """One measurement at a time; its figures land in run.json, and then here."""
        run_dir = self.session.run_dir
        if run_dir is None or self.jobs.running:
            return None
        self.problem.clear()
        self.measure_button.setEnabled(False)
        self.speed_button.setEnabled(False)
        return self.jobs.start(job, message, done=lambda _figures: self._reload(run_dir))

    def _show_speed(self, speed: Speed | None) -> None:
        if speed is None:
            self.speed_table.hide()
            talked = [c for c in list_conversations(self.session.run_dir) if c.turns]
            if talked:  # the speeds the user saw in Compare belong here too, said for what they are
                last = max(talked, key=lambda c: c.created).turns[-1]
                self.speed_note.setText(
                    f"Not timed by the speed test yet. In your last conversation (Compare), the original wrote "
                    f"{last[ORIGINAL]['tokens_per_s']:.1f} and the 4-bit model {last[INT4]['tokens_per_s']:.1f} "
                    "tokens per second, both at the same time." if last[ORIGINAL] else
                    f"Not timed by the speed test yet. In your last conversation (Compare), the 4-bit model wrote "
                    f"{last[INT4]['tokens_per_s']:.1f} tokens per second."
                )
            else:
                self.speed_note.setText(
                    "Not measured yet. The Compare step also shows each model's speed on your own prompts."
                )
            self.speed_button.setText("Measure speed")
            return
        fill(self.speed_figures, speed_rows(speed))
        self.speed_table.show()
        self.speed_note.setText(speed_note(speed))
        self.speed_button.setText("Measure again")

    def _pick_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a text to measure quality on", "", FILE_FILTER)
        if path:
            self.measure(Path(path))

    def _reload(self, run_dir: Path) -> None:
        """The core stored the new figures in run.json; show them unless another run was opened."""
        if self.session.run_dir == run_dir:
            self.session.set_run(run_dir, load_run(run_dir))

    def _ended(self) -> None:
        self.measure_button.setEnabled(True)
        self.speed_button.setEnabled(True)

    def _show_run(self) -> None:
        record = self.session.record
        self.verdict.setText(verdict(record))
        self._show_speed(record.speed)
        self.chart.load(self.session.run_dir / CHART_FILE)
        tune = record.tune
        self.tune.setVisible(tune is not None)
        if tune is not None:
            self.tune_note.setText(tune["explanation"])
            self.tune_chart.load(self.session.run_dir / TUNE_CHART_FILE)
        fill(self.figures, figure_rows(record))
        qualities = record.quality
        self.quality.setVisible(bool(qualities))
        self.quality_note.setText(
            f"Less surprise (lower perplexity) is better. The original was not run, so nothing is compared: "
            f"{record.original.skipped}."
            if qualities and record.original.skipped else
            "Less surprise (lower perplexity) is better. " + scale_words()
            if qualities else
            "Not measured yet. Choose “Measure quality on a text…” and pick a few pages of text like yours."
        )
        self.quality.setRowCount(len(qualities))
        for row, q in enumerate(qualities):
            for column, text in enumerate(quality_cells(q)):
                item = QTableWidgetItem(text)
                if column:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.quality.setItem(row, column, item)
        self.quality.setFixedHeight(
            self.quality.horizontalHeader().height() + sum(self.quality.rowHeight(r) for r in range(len(qualities))) + 4
        )
