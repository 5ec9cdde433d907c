"""Step 5, Compare: both models answer the same prompt side by side (the core's `compare`), streamed."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from ui.glossary import tip
from ui.jobs import Job
from ui.pages import Page
from ui.widgets import Collapsible, InlineMessage, JobPanel, PageJob, term_label, with_tip
from workbench.generation.compare import (
    MODELS,
    TABLE_COLUMNS,
    CompareOptions,
    CompareResult,
    compare,
    read_prompts,
    table_rows,
    write_table,
)
from workbench.errors import WorkbenchError
from workbench.generation.engine import GenerationConfig, GenerationError
from workbench.layout import INT4, ORIGINAL
from workbench.generation.runtime import cuda_status
from workbench.units import format_size

COLUMN_TITLES = {ORIGINAL: "Original (32-bit)", INT4: "INT4"}
DIVERGENCE_COLOUR = "#fff1c2"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
NO_SEED = -1
FINISH_REASONS = {
    "eos": "finished by the model",
    "length": "stopped at the token limit",
    "stop": "stopped at a stop string",
    "context": "stopped: the model's context is full",
    "cancelled": "stopped",
}


def check_cuda(*, progress, cancelled) -> tuple[bool, str]:
    """Whether CUDA works here, and why not (a background job: it starts a small session)."""
    return cuda_status()


def stop_strings(text: str) -> tuple[str, ...]:
    """Stop strings typed as a comma-separated list; \\n stands for a line break."""
    return tuple(s.replace("\\n", "\n") for s in (part.strip() for part in text.split(",")) if s)


class AnswerColumn(QGroupBox):
    """One model's streamed answer and, under it, how fast and how big it was."""

    def __init__(self, key: str, parent: QWidget | None = None):
        super().__init__(COLUMN_TITLES[key], parent)
        self.text = QTextEdit(readOnly=True)
        self.text.setMinimumHeight(180)
        self.pieces: list[str] = []  # one per generated token, to find where the answers diverge
        self.metrics: dict[str, QLabel] = {}
        grid = QGridLayout()
        grid.setHorizontalSpacing(16)
        for row, (name, title, term) in enumerate(
            (("ttft", "First token after", "TTFT"), ("speed", "Writing speed", "tok/s"),
             ("memory", "Peak memory", "peak memory"), ("tokens", "Answer length", "tokens"))
        ):
            grid.addWidget(term_label(title, term), row, 0)
            self.metrics[name] = QLabel("–")
            grid.addWidget(self.metrics[name], row, 1)
        grid.setColumnStretch(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.text, 1)
        layout.addLayout(grid)

    def clear(self) -> None:
        self.text.clear()
        self.pieces = []
        for label in self.metrics.values():
            label.setText("–")

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        cursor = self.text.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(piece)
        self.text.setTextCursor(cursor)

    def show_entry(self, entry: dict) -> None:
        if not self.pieces:  # not streamed (an earlier prompt of a file): show the final text
            self.text.setPlainText(entry["text"])
        self.metrics["ttft"].setText(f"{entry['ttft_s']:.2f} s")
        self.metrics["speed"].setText(f"{entry['tokens_per_s']:.1f} tokens per second")
        memory = [format_size(entry["peak_rss_bytes"])] if entry["peak_rss_bytes"] else []
        if entry["gpu_bytes"]:
            memory.append(f"{format_size(entry['gpu_bytes'])} on the GPU")
        self.metrics["memory"].setText(", ".join(memory) or "not measured")
        ending = FINISH_REASONS.get(entry["finish_reason"], entry["finish_reason"])
        self.metrics["tokens"].setText(f"{entry['tokens']} tokens, {ending}")

    def highlight_from(self, token_index: int) -> None:
        """Mark the text from the first token that differs from the other model's."""
        start = len("".join(self.pieces[:token_index]))
        cursor = self.text.textCursor()
        cursor.setPosition(start)
        cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
        marked = QTextCharFormat()
        marked.setBackground(QColor(DIVERGENCE_COLOUR))
        cursor.mergeCharFormat(marked)


class ComparePage(Page):
    title = "Compare"
    purpose = "Ask both models the same thing and read their answers side by side, with how fast each one writes."
    needs = "run"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self._result: CompareResult | None = None
        self._prompt_index = 0
        self._cuda_checked = False

        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setPlaceholderText("Ask what you would ask the model at work…")
        self.prompt.setFixedHeight(84)
        self.body.addWidget(self.prompt)

        self.provider = QComboBox()
        self.provider.addItem("CPU (processor)", "cpu")
        self.provider.addItem("CUDA (NVIDIA graphics card)", "cuda")
        with_tip(self.provider, "provider")
        self.provider.model().item(1).setEnabled(False)  # until the check says it works
        self.provider_note = QLabel("Checking for a graphics card…")
        self.provider_note.setObjectName("hint")
        self.provider_note.setWordWrap(True)
        self.run_button = QPushButton("Ask both models")
        self.run_button.setObjectName("primary")
        self.file_button = QPushButton("Run prompt file…")
        self.file_button.setToolTip(
            'A .txt file (one prompt per line) or .jsonl (a "prompt" per line): one table row each.'
        )
        actions = QHBoxLayout()
        actions.addWidget(self.run_button)
        actions.addWidget(self.file_button)
        actions.addSpacing(16)
        actions.addWidget(term_label("Run on", "provider"))
        actions.addWidget(self.provider)
        actions.addStretch(1)
        self.body.addLayout(actions)
        self.body.addWidget(self.provider_note)

        self.body.addWidget(Collapsible("Generation settings", self._settings_form()))
        self.problem = InlineMessage()
        self.panel = JobPanel()
        self.jobs = PageJob(self, panel=self.panel, failure_title="The comparison stopped",
                            problem=self.problem.problem, ended=self._ended)
        self.body.addWidget(self.problem)
        self.body.addWidget(self.panel)

        self.columns = {key: AnswerColumn(key) for key in MODELS}
        side_by_side = QHBoxLayout()
        side_by_side.setSpacing(16)
        for column in self.columns.values():
            side_by_side.addWidget(column, 1)
        self.body.addLayout(side_by_side)
        self.agreement = QLabel()
        self.agreement.setWordWrap(True)
        self.agreement.setToolTip("\n\n".join(tip(t) for t in ("first divergence", "top-1 agreement", "similarity")))
        self.body.addWidget(self.agreement)

        self.suite = QGroupBox("Prompt file")
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([name for name, _ in TABLE_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setMinimumHeight(220)
        self.save_csv = QPushButton("Save as CSV…")
        self.save_markdown = QPushButton("Save as Markdown…")
        exports = QHBoxLayout()
        exports.addWidget(self.save_csv)
        exports.addWidget(self.save_markdown)
        exports.addStretch(1)
        suite_layout = QVBoxLayout(self.suite)
        suite_layout.addWidget(self.table)
        suite_layout.addLayout(exports)
        self.suite.hide()
        self.body.addWidget(self.suite)
        self.body.addStretch(1)

        self.run_button.clicked.connect(lambda: self.ask(self.prompt.toPlainText()))
        self.file_button.clicked.connect(self._pick_prompt_file)
        self.save_csv.clicked.connect(lambda: self._save_table("csv"))
        self.save_markdown.clicked.connect(lambda: self._save_table("md"))
        self.temperature.valueChanged.connect(self._sampling_changed)
        session.run_changed.connect(self._run_changed)
        self._sampling_changed()

    def _settings_form(self) -> QWidget:
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, decimals=2)
        self.temperature.setSpecialValueText("0 (always the likeliest token)")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, decimals=2, value=1.0)
        self.top_k = QSpinBox(minimum=0, maximum=1000)
        self.top_k.setSpecialValueText("no limit")
        self.repetition = QDoubleSpinBox(minimum=0.5, maximum=2.0, singleStep=0.05, decimals=2, value=1.0)
        self.max_tokens = QSpinBox(minimum=1, maximum=4096, value=GenerationConfig().max_new_tokens)
        self.seed = QSpinBox(minimum=NO_SEED, maximum=2**31 - 1, value=NO_SEED)
        self.seed.setSpecialValueText("none (different each time)")
        self.stop = QLineEdit(placeholderText="none; e.g. \\n\\n, User:")
        self.system = QLineEdit(placeholderText="none; e.g. Answer in one sentence.")
        self.schema = QPlainTextEdit()
        self.schema.setPlaceholderText('none; e.g. {"type": "object", "properties": {"answer": {"type": "string"}}}')
        self.schema.setFixedHeight(70)
        form = QFormLayout()
        form.setHorizontalSpacing(24)
        form.setVerticalSpacing(8)
        for title, term, widget in (
            ("Temperature", "temperature", self.temperature),
            ("Top-p", "top-p", self.top_p),
            ("Top-k", "top-k", self.top_k),
            ("Repetition penalty", "repetition penalty", self.repetition),
            ("Max new tokens", "max tokens", self.max_tokens),
            ("Seed", "seed", self.seed),
            ("Stop strings", "stop strings", self.stop),
            ("System prompt", "system prompt", self.system),
            ("JSON schema", "JSON schema", self.schema),
        ):
            form.addRow(term_label(title, term), widget)
        widget = QWidget()
        widget.setLayout(form)
        return widget

    def blocker(self) -> str | None:
        return "Wait until both models have answered (or cancel)." if self.jobs.running else None

    def entered(self) -> None:
        if not self._cuda_checked:
            self._cuda_checked = True
            job = Job(check_cuda)
            job.signals.finished.connect(self._cuda_known)
            job.start()

    def _cuda_known(self, status: tuple[bool, str]) -> None:
        works, why_not = status
        cuda = self.provider.model().item(1)
        cuda.setEnabled(works)
        cuda.setToolTip("" if works else f"Not available: {why_not}.")
        self.provider.setCurrentIndex(1 if works else 0)
        self.provider_note.setText(
            "A graphics card is ready (CUDA)." if works
            else f"CUDA cannot be used here, so both models run on the processor: {why_not}."
        )

    def _sampling_changed(self) -> None:
        sampling = self.temperature.value() > 0
        for widget in (self.top_p, self.top_k, self.seed):
            widget.setEnabled(sampling)
            widget.setToolTip("" if sampling else "Only used when the temperature is above 0.")

    def options(self) -> CompareOptions:
        """The settings as the core takes them; a WorkbenchError says what to fix."""
        schema_text = self.schema.toPlainText().strip()
        try:
            schema = json.loads(schema_text) if schema_text else None
        except json.JSONDecodeError as error:
            raise WorkbenchError(f"The JSON schema is not valid JSON ({error.msg}, line {error.lineno}).") from error
        try:
            config = GenerationConfig(
                max_new_tokens=self.max_tokens.value(),
                temperature=self.temperature.value(),
                top_k=self.top_k.value(),
                top_p=self.top_p.value(),
                repetition_penalty=self.repetition.value(),
                stop=stop_strings(self.stop.text()),
                seed=None if self.seed.value() == NO_SEED else self.seed.value(),
            )
        except GenerationError as error:
            raise WorkbenchError(str(error)) from error
        return CompareOptions(
            config=config, provider=self.provider.currentData(), system=self.system.text().strip() or None,
            json_schema=schema,
        )

    def ask(self, prompt: str) -> Job | None:
        if not prompt.strip():
            self.problem.problem("Type a prompt first.")
            return None
        return self._start([prompt])

    def run_file(self, path: Path) -> Job | None:
        try:
            prompts = read_prompts(path)
        except WorkbenchError as error:
            self.problem.problem(str(error))
            return None
        return self._start(prompts)

    def _start(self, prompts: list[str]) -> Job | None:
        if self.jobs.running or self.session.run_dir is None:
            return None
        try:
            options = self.options()
        except WorkbenchError as error:
            self.problem.problem(str(error))
            return None
        self.problem.clear()
        self.agreement.clear()
        self._result = None
        self._prompt_index = 0
        for column in self.columns.values():
            column.clear()
        self.suite.setVisible(len(prompts) > 1)
        self.table.setRowCount(0)
        job = Job(compare, self.session.run_dir, prompts, options, partial="on_token")
        job.signals.partial.connect(self._token)
        many = f" ({len(prompts)} prompts)" if len(prompts) > 1 else ""
        for button in (self.run_button, self.file_button):
            button.setEnabled(False)
        return self.jobs.start(
            job, f"Loading both models{many}…", done=self._finished,
            cancelled=lambda: self.problem.note("Stopped; the unfinished prompt is not compared."),
        )

    def _token(self, values: tuple) -> None:
        model, index, _token, piece = values
        if index != self._prompt_index:  # the next prompt of a file: its answers replace the last ones
            self._prompt_index = index
            for column in self.columns.values():
                column.clear()
        self.columns[model].add(piece)

    def _finished(self, result: CompareResult) -> None:
        self._result = result
        row = result.rows[-1]
        for key, column in self.columns.items():
            column.show_entry(row[key])
        agreement = row["agreement"]
        divergence = agreement["first_divergence"]
        if divergence is None:
            summary = "<b>Both models wrote exactly the same answer.</b>"
        else:
            for column in self.columns.values():
                column.highlight_from(divergence)
            summary = (
                f"<b>The answers agree for the first {divergence} tokens</b>, then part ways (highlighted). "
                f"Same token at {agreement['token_agreement']:.0%} of the positions; "
                f"the texts are {agreement['similarity']:.0%} alike."
            )
        self.agreement.setText(f"{summary} Ran on {result.provider.upper()} ({result.provider_reason}).")
        if len(result.rows) > 1:
            self._fill_table(result)

    def _fill_table(self, result: CompareResult) -> None:
        rows = table_rows(result)
        self.table.setRowCount(len(rows))
        for r, values in enumerate(rows):
            for c, value in enumerate(values):
                item = QTableWidgetItem(f"{value:.3g}" if isinstance(value, float) else str(value))
                if c != 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)

    def _ended(self) -> None:
        for button in (self.run_button, self.file_button):
            button.setEnabled(True)

    def _run_changed(self) -> None:
        """Another run is open: answers of the previous one no longer apply."""
        for column in self.columns.values():
            column.clear()
        self.agreement.clear()
        self.suite.hide()
        self._result = None

    def _pick_prompt_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a prompt file", "", "Prompt files (*.txt *.jsonl)")
        if path:
            self.run_file(Path(path))

    def _save_table(self, suffix: str) -> None:
        if self._result is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save the table", f"comparison.{suffix}", f"*.{suffix}")
        if path:
            self.save_table(Path(path))

    def save_table(self, path: Path) -> None:
        try:
            write_table(self._result, path)
        except WorkbenchError as error:
            self.problem.problem(str(error))
            return
        except OSError as error:
            self.problem.problem(f"Could not save {path}: {error.strerror}. Choose another folder.")
            return
        self.problem.note(f"Saved {path}.")
