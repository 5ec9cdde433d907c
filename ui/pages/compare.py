"""Step 5, Compare: a conversation with both models at once, side by side, streamed and kept with the run."""

from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path

import psutil
from PySide6.QtCore import QElapsedTimer, Qt, QTimer
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
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ui.glossary import tip
from ui.jobs import Job
from ui.pages import Page
from ui.widgets import Collapsible, InlineMessage, JobPanel, PageJob, term_label, with_tip
from workbench.errors import WorkbenchError
from workbench.generation import chat
from workbench.generation.chat import CHAT, SUITE, Conversation, as_result, list_conversations
from workbench.generation.compare import (
    ANSWER_END,
    MODELS,
    TABLE_COLUMNS,
    CompareOptions,
    CompareResult,
    read_prompts,
    table_rows,
    write_table,
)
from workbench.generation.engine import GenerationConfig, GenerationError
from workbench.generation.runtime import cuda_status
from workbench.layout import INT4, ORIGINAL
from workbench.units import format_size

COLUMN_TITLES = {ORIGINAL: "Original (32-bit)", INT4: "4-bit (INT4)"}
EMPTY_COLUMNS = {  # what an empty pane is for, until the first answer
    ORIGINAL: "The original model's answers appear here as it writes them.",
    INT4: "The 4-bit model's answers appear here at the same time; words the original would rarely have "
          "chosen are highlighted.",
}
UNLIKELY_COLOUR = "#ffe08a"
# Private-use characters around the words to highlight: they pass through Markdown rendering as text.
MARK_START, MARK_END = "\ue000", "\ue001"
MAX_LISTED_PLACES = 12
MEMORY_INTERVAL_MS = 500
MEMORY_NOW = "Memory this app holds now, both models together"
MEMORY_THEN = "Memory this app held while both models wrote"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
NO_SEED = -1
FINISH_REASONS = {
    "eos": "finished by the model",
    "length": "stopped at the token limit",
    "stop": "stopped at a stop string",
    "context": "stopped: the model's context is full",
    "cancelled": "stopped",
}


# After an answer that did not end by itself, so that a cut sentence is not read as the model's own ending.
CUT_NOTES = {
    "length": "cut off here: the longest answer allowed was reached (Generation settings)",
    "context": "cut off here: the model's context is full",
}


def shown_answer(entry: dict) -> str:
    """A saved answer as its column shows it: the text, and a note where it was cut off."""
    note = CUT_NOTES.get(entry["finish_reason"])
    return f"{entry['text']} …\n\n*({note})*" if note else entry["text"]


def check_cuda(*, progress, cancelled) -> tuple[bool, str]:
    """Whether CUDA works here, and why not (a background job: it starts a small session)."""
    return cuda_status()


def stop_strings(text: str) -> tuple[str, ...]:
    """Stop strings typed as a comma-separated list; \\n stands for a line break."""
    return tuple(s.replace("\\n", "\n") for s in (part.strip() for part in text.split(",")) if s)


def transcript_markdown(turns: list[tuple[str, str, list[tuple[int, int]]]]) -> str:
    """One model's side of a conversation as Markdown: each prompt, then the answer, whose marked
    (start, end) spans are wrapped in MARK_START / MARK_END to be highlighted once rendered."""
    parts = []
    for prompt, answer, marks in turns:
        for start, end in sorted(marks, reverse=True):  # from the end: earlier offsets stay right
            answer = answer[:start] + MARK_START + answer[start:end] + MARK_END + answer[end:]
        quoted = "\n".join(f"> {line}" for line in f"**You:** {prompt}".splitlines())
        parts.append(f"{quoted}\n\n{answer}")
    return "\n\n---\n\n".join(parts)


class AnswerColumn(QGroupBox):
    """One model's side of the conversation, rendered as Markdown, and how fast and how big it was.

    While the model writes, its answer streams in with the speed so far; afterwards the measured
    figures replace the live ones.
    """

    def __init__(self, key: str, parent: QWidget | None = None):
        super().__init__(COLUMN_TITLES[key], parent)
        self.key = key
        self.text = QTextBrowser()
        self.text.setOpenExternalLinks(True)
        self.text.setMinimumHeight(300)
        self.text.setPlaceholderText(EMPTY_COLUMNS[key])
        self.turns: list[tuple[str, str, list[tuple[int, int]]]] = []  # (prompt, answer, highlighted spans)
        self.prompt = ""  # the prompt being answered now
        self.pieces: list[str] = []  # of the answer being written, one per token
        self._clock = QElapsedTimer()
        self._first_token_ms = 0
        self.metrics: dict[str, QLabel] = {}
        grid = QGridLayout()
        grid.setHorizontalSpacing(16)
        for row, (name, title, term) in enumerate(
            (("ttft", "First word after", "TTFT"), ("speed", "Writing speed", "tok/s"),
             ("memory", "Peak memory", "peak memory"), ("tokens", "Answer length", "tokens"))
        ):
            grid.addWidget(term_label(title, term), row, 0)
            self.metrics[name] = QLabel("–")
            grid.addWidget(self.metrics[name], row, 1)
        grid.setColumnStretch(1, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.text, 1)
        layout.addLayout(grid)

    def show_turns(self, turns: list[tuple[str, str, list[tuple[int, int]]]]) -> None:
        self.turns = list(turns)
        self.prompt, self.pieces = "", []
        self._render()

    def begin(self, prompt: str) -> None:
        """A new prompt: its answer starts empty, the figures count again."""
        self.prompt, self.pieces = prompt, []
        self._clock.start()
        self._first_token_ms = 0
        for label in self.metrics.values():
            label.setText("–")
        self.metrics["speed"].setText("waiting for the first word…")
        self._render()

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        now = self._clock.elapsed()
        if len(self.pieces) == 1:  # the time to the first word shows once measured: this clock includes loading
            self._first_token_ms = now
        elif now > self._first_token_ms:
            speed = (len(self.pieces) - 1) * 1000 / (now - self._first_token_ms)
            self.metrics["speed"].setText(f"{speed:.1f} tokens per second so far")
        self.metrics["tokens"].setText(f"{len(self.pieces)} tokens so far")
        self._render()

    def answered(self) -> None:
        """The answer is complete (the other model may still be writing): its live figures are final."""
        for name in ("speed", "tokens"):
            self.metrics[name].setText(self.metrics[name].text().replace(" so far", ""))

    def show_entry(self, entry: dict) -> None:
        """The measured figures of the latest answer."""
        self.metrics["ttft"].setText(f"{entry['ttft_s']:.2f} s")
        self.metrics["speed"].setText(f"{entry['tokens_per_s']:.1f} tokens per second")
        memory = [format_size(entry["peak_rss_bytes"])] if entry.get("peak_rss_bytes") else []
        if entry.get("gpu_bytes"):
            memory.append(f"{format_size(entry['gpu_bytes'])} on the GPU")
        self.metrics["memory"].setText(", ".join(memory) or "not measured")
        ending = FINISH_REASONS.get(entry["finish_reason"], entry["finish_reason"])
        self.metrics["tokens"].setText(f"{entry['tokens']} tokens, {ending}")

    def clear(self) -> None:
        self.show_turns([])
        for label in self.metrics.values():
            label.setText("–")

    def not_run(self, reason: str) -> None:
        """This model does not answer in this run (an original too large to run here), and why."""
        self.clear()
        self.text.setMarkdown(f"*Not run here: {reason}.*")

    def _render(self) -> None:
        turns = self.turns + ([(self.prompt, "".join(self.pieces), [])] if self.prompt else [])
        self.text.setMarkdown(transcript_markdown(turns))
        self._highlight_marks()
        self._scroll_to_end()

    def _scroll_to_end(self) -> None:
        bar = self.text.verticalScrollBar()
        bar.setValue(bar.maximum())

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self._scroll_to_end()  # a conversation shown while the page was hidden: its latest turn

    def _highlight_marks(self) -> None:
        """Give the text between each pair of marks the highlight colour, and take the marks out."""
        document = self.text.document()
        marked = QTextCharFormat()
        marked.setBackground(QColor(UNLIKELY_COLOUR))
        pairs = []
        found = document.find(MARK_START)
        while not found.isNull():
            closing = document.find(MARK_END, found)
            if closing.isNull():
                break
            pairs.append((found.selectionStart(), closing.selectionStart()))
            found = document.find(MARK_START, closing)
        cursor = QTextCursor(document)
        cursor.beginEditBlock()
        for start, end in reversed(pairs):
            cursor.setPosition(end)
            cursor.setPosition(end + 1, QTextCursor.MoveMode.KeepAnchor)
            cursor.removeSelectedText()
            cursor.setPosition(start + 1)
            cursor.setPosition(end, QTextCursor.MoveMode.KeepAnchor)
            cursor.mergeCharFormat(marked)
            cursor.setPosition(start)
            cursor.setPosition(start + 1, QTextCursor.MoveMode.KeepAnchor)
            cursor.removeSelectedText()
        cursor.endEditBlock()

    def highlighted(self) -> list[str]:
        """The highlighted pieces of text, in order (what the user sees marked)."""
        pieces = []
        block = self.text.document().begin()
        while block.isValid():
            iterator = block.begin()
            while not iterator.atEnd():
                fragment = iterator.fragment()
                if fragment.charFormat().background().color() == QColor(UNLIKELY_COLOUR):
                    pieces.append(fragment.text())
                iterator += 1
            block = block.next()
        return pieces


class ComparePage(Page):
    title = "Compare"
    purpose = (
        "Talk to both models at once and read their answers side by side: how fast each writes, and "
        "where the 4-bit model chose words the original would not have."
    )
    needs = "run"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self._result: CompareResult | None = None
        self.conversation: Conversation | None = None  # the one shown; None: a new one starts
        self._prompt_index = 0
        self._prompts: list[str] = []
        self._kept: dict[str, Conversation] = {}  # the run's saved conversations by id
        self._cuda_checked = False

        self.conversations = QComboBox()
        self.conversations.setToolTip("Conversations with this run are kept in its folder (conversations/).")
        self.conversations.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.new_button = QPushButton("New conversation")
        history = QHBoxLayout()
        history.addWidget(QLabel("Conversation"))
        history.addWidget(self.conversations, 1)
        history.addWidget(self.new_button)
        self.body.addLayout(history)

        self.columns = {key: AnswerColumn(key) for key in MODELS}
        side_by_side = QHBoxLayout()
        side_by_side.setSpacing(16)
        for column in self.columns.values():
            side_by_side.addWidget(column, 1)
        self.body.addLayout(side_by_side)
        self.memory_now = QLabel()
        self.memory_now.setObjectName("hint")
        self.memory_now.setToolTip("The resident memory of this app while both models write (psutil's RSS).")
        self._memory_timer = QTimer(self, interval=MEMORY_INTERVAL_MS)
        self._memory_timer.timeout.connect(self._show_memory_now)
        self.body.addWidget(self.memory_now)
        self.memory_now.hide()  # until both models write in this window
        # What the job does (loading, writing, rating, measuring memory) and its Cancel, right under the
        # answers the user is watching: below the settings it was out of sight while the models worked.
        self.panel = JobPanel()
        self.body.addWidget(self.panel)

        self.judgement = QLabel()
        self.judgement.setObjectName("verdict")
        self.judgement.setWordWrap(True)
        self.judgement.setTextFormat(Qt.TextFormat.RichText)
        self.body.addWidget(self.judgement)
        self.judgement.hide()  # until there is a judgement to show
        self.judgement_details = QLabel()
        self.judgement_details.setWordWrap(True)
        self.judgement_details.setTextFormat(Qt.TextFormat.RichText)
        self.details = Collapsible("Details: how the original model rated the 4-bit answer", self.judgement_details)
        self.details.hide()
        self.body.addWidget(self.details)
        self.agreement = QLabel()
        self.agreement.setObjectName("hint")
        self.agreement.setWordWrap(True)
        self.agreement.setToolTip("\n\n".join(tip(t) for t in ("first divergence", "top-1 agreement", "similarity")))
        self.body.addWidget(self.agreement)

        self.prompt = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt.setPlaceholderText("Ask what you would ask the model at work, or follow up on the answers…")
        self.prompt.setFixedHeight(72)
        self.body.addWidget(self.prompt)

        self.provider = QComboBox()
        self.provider.addItem("Processor (CPU)", "cpu")
        self.provider.addItem("NVIDIA graphics card (CUDA)", "cuda")
        with_tip(self.provider, "provider")
        self.provider.model().item(1).setEnabled(False)  # until the check says it works
        self.provider_note = QLabel("Checking for a graphics card…")
        self.provider_note.setObjectName("hint")
        self.provider_note.setWordWrap(True)
        self.run_button = QPushButton("Ask both models")
        self.run_button.setObjectName("primary")
        self.file_button = QPushButton("Run prompt file…")
        self.file_button.setToolTip(
            'A .txt file (one prompt per line) or .jsonl (a "prompt" per line): one table row each, kept '
            "as a conversation of its own."
        )
        actions = QHBoxLayout()
        actions.addWidget(self.run_button)
        actions.addWidget(self.file_button)
        actions.addSpacing(16)
        actions.addWidget(term_label("Run on", "provider"))
        actions.addWidget(self.provider)
        actions.addStretch(1)
        self.body.addLayout(actions)
        self.problem = InlineMessage()  # under the prompt and its button, which it is mostly about
        self.jobs = PageJob(self, panel=self.panel, failure_title="The comparison stopped", problem=self._failed,
                            ended=self._ended)
        self.body.addWidget(self.problem)
        self.body.addWidget(self.provider_note)

        self.body.addWidget(Collapsible("Generation settings", self._settings_form()))

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
        self.new_button.clicked.connect(lambda: self.show_conversation(None))
        self.conversations.activated.connect(self._conversation_chosen)
        self.save_csv.clicked.connect(lambda: self._save_table("csv"))
        self.save_markdown.clicked.connect(lambda: self._save_table("md"))
        self.temperature.valueChanged.connect(self._sampling_changed)
        session.run_changed.connect(self._run_changed)
        self._sampling_changed()

    def _settings_form(self) -> QWidget:
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, decimals=2)
        self.temperature.setSpecialValueText("0 (always the likeliest word)")
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
            ("Longest answer (tokens)", "max tokens", self.max_tokens),
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
        if works:
            self.provider_note.setText("A graphics card is ready (CUDA).")
        else:
            self.provider_note.setText("No usable graphics card (CUDA) here, so both models run on the processor.")
            self.provider_note.setToolTip(f"Why CUDA cannot be used: {why_not}.")

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

    # -- asking ------------------------------------------------------------------------------

    def ask(self, prompt: str) -> Job | None:
        """The next turn of the conversation shown (a new one after a prompt file's)."""
        if not prompt.strip():
            self.problem.problem("Type a prompt first.")
            return None
        conversation = self.conversation
        if conversation is None or conversation.kind != CHAT:
            conversation = Conversation.new()
        return self._start([prompt], lambda options: Job(
            chat.ask, self.session.run_dir, conversation, prompt, options, partial="on_token"))

    def run_file(self, path: Path) -> Job | None:
        try:
            prompts = read_prompts(path)
        except WorkbenchError as error:
            self.problem.problem(str(error))
            return None
        return self._start(prompts, lambda options: Job(
            chat.run_suite, self.session.run_dir, prompts, options, partial="on_token"))

    def _start(self, prompts: list[str], make_job) -> Job | None:
        if self.jobs.running or self.session.run_dir is None:
            return None
        try:
            options = self.options()
        except WorkbenchError as error:
            self.problem.problem(str(error))
            return None
        self.problem.clear()
        self._clear_judgement()
        self._prompts, self._prompt_index = prompts, 0
        if len(prompts) > 1:  # a prompt file starts a conversation of its own
            self.conversation = None
            self.suite.show()
            self.table.setRowCount(0)
            for column in self.columns.values():
                column.show_turns([])
        for column in self.answering().values():
            column.begin(prompts[0])
        job = make_job(options)
        job.signals.partial.connect(self._token)
        many = f" ({len(prompts)} prompts)" if len(prompts) > 1 else ""
        for button in (self.run_button, self.file_button, self.new_button):
            button.setEnabled(False)
        self.conversations.setEnabled(False)
        self._memory_timer.start()
        self._show_memory_now()
        self.memory_now.show()
        loading = "the 4-bit model" if self.skipped else "both models"
        return self.jobs.start(job, f"Loading {loading}{many}…", done=self._finished, cancelled=self._stopped)

    def _token(self, values: tuple) -> None:
        model, index, token, piece = values
        if index != self._prompt_index:  # the next prompt of a file: the last answers join the transcript
            self._prompt_index = index
            for column in self.answering().values():
                column.turns.append((column.prompt, "".join(column.pieces), []))
                column.begin(self._prompts[index])
        if token == ANSWER_END:
            self.columns[model].answered()
        else:
            self.columns[model].add(piece)

    def _finished(self, outcome) -> None:
        conversation = outcome[1] if isinstance(outcome, tuple) else outcome
        if conversation.turns[-1]["prompt"] == self.prompt.toPlainText():
            self.prompt.clear()  # asked and answered: the box is ready for the next turn
        self.show_conversation(conversation)
        self._list_conversations()

    def _stopped(self) -> None:
        self.problem.note("Stopped; the unfinished answers are not kept.")
        self.show_conversation(self.conversation)

    def _failed(self, message: str) -> None:
        self.problem.problem(message)
        self.show_conversation(self.conversation)

    def _ended(self) -> None:
        self._memory_timer.stop()
        self.memory_now.setText(self.memory_now.text().replace(MEMORY_NOW, MEMORY_THEN))
        for button in (self.run_button, self.file_button, self.new_button):
            button.setEnabled(True)
        self.conversations.setEnabled(True)

    def _show_memory_now(self) -> None:
        rss = psutil.Process().memory_info().rss
        self.memory_now.setText(f"{MEMORY_NOW}: {format_size(rss)}")

    # -- showing a conversation --------------------------------------------------------------

    def show_conversation(self, conversation: Conversation | None) -> None:
        """Show a kept conversation (its transcript, last figures, judgement, table); None: a new one."""
        self.conversation = conversation
        turns = list(conversation.turns) if conversation else []
        for key, column in self.answering().items():
            column.show_turns([(t["prompt"], shown_answer(t[key]), _marks(t, key)) for t in turns])
        self._clear_judgement()
        suite = conversation is not None and conversation.kind == SUITE
        self._result = as_result(conversation) if suite else None
        self.suite.setVisible(suite)
        if suite:
            self._fill_table(self._result)
        if turns and self.prompt.toPlainText() == DEFAULT_PROMPT:
            self.prompt.clear()  # the example prompt is for a new conversation
        if turns:
            last = turns[-1]
            for key, column in self.answering().items():
                column.show_entry(last[key])
            self._show_judgement(last, conversation.provider)
        else:
            for column in self.answering().values():
                column.clear()
        if self.skipped:
            self.columns[ORIGINAL].not_run(self.skipped)
        index = self.conversations.findData(conversation.id if conversation else None)
        self.conversations.setCurrentIndex(max(index, 0))

    def _show_judgement(self, turn: dict, provider: str) -> None:
        agreement = turn["agreement"]
        if agreement is None:  # the original was not run: nothing to compare
            self.agreement.setText(f"Only the 4-bit model answered, so nothing is compared. Ran on {provider.upper()}.")
            return
        self.agreement.setText(
            f"Same word at {agreement['token_agreement']:.0%} of the places; the texts are "
            f"{agreement['similarity']:.0%} alike. Ran on {provider.upper()}."
        )
        judgement = turn.get("judgement")
        if not judgement:
            return
        marked = " Highlighted in the 4-bit answer." if judgement["unlikely"] else ""
        latest = "<b>Latest answer:</b> " if len(self.conversation.turns) > 1 else ""
        self.judgement.setText(f"{latest}<b>{html.escape(judgement['sentence'])}</b>{marked}")
        self.judgement.show()
        places = "".join(
            f"<li>word {u['position'] + 1}: “{html.escape(u['text'])}”, which the original would write "
            f"{u['probability']:.1%} of the time</li>"
            for u in judgement["unlikely"][:MAX_LISTED_PLACES]
        )
        more = len(judgement["unlikely"]) - MAX_LISTED_PLACES
        self.judgement_details.setText(
            "The original model read the 4-bit answer word by word (each token) and gave, for each, how often "
            f"it would itself have written it there. Highlighted: words it would write {judgement['threshold_words']}"
            f" (below {judgement['threshold']:.0%})."
            + (f"<ul>{places}</ul>" if places else "<br>")
            + (f"and {more} more.<br>" if more > 0 else "")
            + "Average log-probability per token under the original (closer to 0: more what the original "
            f"would write): its own answer {_number(judgement['original_mean_logprob'])}, the 4-bit answer "
            f"{_number(judgement['int4_mean_logprob'])}."
        )
        self.details.show()

    def _clear_judgement(self) -> None:
        self.judgement.clear()
        self.judgement.hide()
        self.agreement.clear()
        self.judgement_details.clear()
        self.details.hide()

    def _fill_table(self, result: CompareResult) -> None:
        rows = table_rows(result)
        self.table.setRowCount(len(rows))
        for r, values in enumerate(rows):
            for c, value in enumerate(values):
                item = QTableWidgetItem(f"{value:.3g}" if isinstance(value, float) else str(value))
                if c != 1:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.table.setItem(r, c, item)

    def _list_conversations(self) -> None:
        kept = list_conversations(self.session.run_dir) if self.session.run_dir else []
        self._kept = {c.id: c for c in kept}
        self.conversations.clear()
        self.conversations.addItem("New conversation", None)
        for conversation in reversed(kept):  # newest first
            when = datetime.fromisoformat(conversation.created).astimezone().strftime("%d %b %H:%M")
            kind = f"prompt file, {len(conversation.turns)} prompts" if conversation.kind == SUITE else (
                f"{len(conversation.turns)} turn{'s' if len(conversation.turns) != 1 else ''}")
            self.conversations.addItem(f"{conversation.title} · {kind} · {when}", conversation.id)
        index = self.conversations.findData(self.conversation.id if self.conversation else None)
        self.conversations.setCurrentIndex(max(index, 0))

    def _conversation_chosen(self, index: int) -> None:
        self.show_conversation(self._kept.get(self.conversations.itemData(index)))

    @property
    def skipped(self) -> str | None:
        """Why the open run has no original (then the 4-bit model answers alone), or None."""
        return self.session.record.original.skipped if self.session.record else None

    def answering(self) -> dict[str, AnswerColumn]:
        """The columns of the models that answer in the open run."""
        return {key: column for key, column in self.columns.items() if key == INT4 or not self.skipped}

    def _run_changed(self) -> None:
        """Another run is open: its own conversations are listed, the latest one shown."""
        self.problem.clear()
        self.run_button.setText("Ask the 4-bit model" if self.skipped else "Ask both models")
        self._list_conversations()
        self.show_conversation(max(self._kept.values(), key=lambda c: c.created, default=None))

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


def _marks(turn: dict, key: str) -> list[tuple[int, int]]:
    """The spans of a turn's answer to highlight: in the INT4 answer, the words the original found unlikely."""
    if key != INT4 or not turn.get("judgement"):
        return []
    return [(u["start"], u["end"]) for u in turn["judgement"]["unlikely"] if u["end"] > u["start"]]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}".replace("-", "−")
