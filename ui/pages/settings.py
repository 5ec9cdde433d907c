"""Step 2, Settings: a preset card, optional advanced choices, and a live size estimate."""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from ui.glossary import tip
from ui.pages import Page
from ui.pages.calibration import FILE_FILTER
from ui.session import TuneChoice
from ui.widgets import Collapsible, InlineMessage, term_label, with_tip
from workbench.quantization.calibration import check_text_file
from workbench.errors import WorkbenchError
from workbench.quantization.sizes import int4_bytes
from workbench.quantization.methods import METHODS
from workbench.settings import MAX_SENSITIVE_8BIT_PCT, PRESETS, Preset, QuantSettings, preset_settings
from workbench.durations import rough_duration
from workbench.run.pipeline import plan_run
from workbench.run.tune import CANDIDATES
from workbench.units import format_size

ACCURACY_TITLES = {
    4: "4: 8-bit inputs (fastest on CPU)",
    3: "3: bfloat16 inputs",
    2: "2: 16-bit inputs",
    1: "1: 32-bit inputs (most exact)",
    0: "0: the runtime decides",
}
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_QUALITY_LOSS_PCT = 5.0


def patterns(text: str) -> tuple[str, ...]:
    """Layer name patterns typed as a list separated by commas or spaces."""
    return tuple(p for p in re.split(r"[,\s]+", text) if p)


class PresetCard(QFrame):
    """One preset: its name, what it means for size and quality, and its estimated size."""

    chosen = Signal(str)

    def __init__(self, preset: Preset, parent: QWidget | None = None):
        super().__init__(parent)
        self.name = preset.name
        self.setObjectName("card")
        method = METHODS[preset.settings.method].term
        self.setToolTip(f"{method}, blocks of {preset.settings.block_size} weights. {tip(method)}")
        self.radio = QRadioButton(preset.title)
        self.radio.setObjectName("cardTitle")
        self.size = QLabel()
        self.size.setObjectName("cardSize")
        cost = QLabel(f"Quality: {preset.quality_cost}")
        cost.setObjectName("cardCost")
        cost.setWordWrap(True)
        description = QLabel(preset.description)
        description.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setSpacing(8)
        layout.addWidget(self.radio)
        layout.addWidget(self.size)
        layout.addWidget(cost)
        layout.addWidget(description)
        layout.addStretch(1)
        self.radio.toggled.connect(self._toggled)

    def mousePressEvent(self, event) -> None:
        self.radio.setChecked(True)

    def _toggled(self, checked: bool) -> None:
        self.setProperty("selected", checked)
        self.style().unpolish(self)
        self.style().polish(self)
        if checked:
            self.chosen.emit(self.name)


class SettingsPage(Page):
    title = "Settings"
    purpose = (
        "Choose how hard to shrink the model: smaller files answer a little less well. Point at any "
        "setting to see what it means."
    )
    needs = "model"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.cards = {name: PresetCard(preset) for name, preset in PRESETS.items()}
        group = QButtonGroup(self)
        cards = QHBoxLayout()
        cards.setSpacing(16)
        for card in self.cards.values():
            group.addButton(card.radio)
            cards.addWidget(card, 1)
            card.chosen.connect(self._preset_chosen)
        self.body.addLayout(cards)
        self.body.addWidget(self._tune_box())

        self.method = QComboBox()
        for method in METHODS.values():
            self.method.addItem(method.title, method.name)
            self.method.setItemData(self.method.count() - 1, tip(method.term), Qt.ItemDataRole.ToolTipRole)
        self.block_size = QComboBox()
        for size in BLOCK_SIZES:
            self.block_size.addItem(f"{size} weights", size)
        self.symmetric = QCheckBox("Symmetric (no zero point)")
        self.accuracy = QComboBox()
        for level, title in ACCURACY_TITLES.items():
            self.accuracy.addItem(title, level)
        self.embeddings = QCheckBox("Shrink the embeddings too")
        self.lm_head = QCheckBox("Shrink the output layer (lm_head) too")
        self.eight_bit = QLineEdit(placeholderText="none; e.g. lm_head, model.layers.0.*")
        self.full_precision = QLineEdit(placeholderText="none; e.g. model.layers.0.*")
        self.sensitive = QDoubleSpinBox(minimum=0.0, maximum=MAX_SENSITIVE_8BIT_PCT, singleStep=5.0, decimals=0,
                                        suffix=" % larger", specialValueText="off")
        self.sensitive.setToolTip(
            "Measure which layers lose most at 4 bits (needs example text, or the model writes its own) and keep "
            "the worst at 8 bits, making the model at most this much larger."
        )
        self.act_order = QCheckBox("GPTQ: most important columns first (act order)")
        with_tip(self.symmetric, "symmetric")
        with_tip(self.embeddings, "embeddings")
        with_tip(self.lm_head, "lm_head")
        with_tip(self.act_order, "act order")
        advanced = QWidget()
        form = QFormLayout(advanced)
        form.setVerticalSpacing(10)
        form.setHorizontalSpacing(24)
        form.addRow(term_label("Method", "method"), self.method)
        form.addRow(term_label("Block size", "block size"), self.block_size)
        form.addRow("", self.symmetric)
        form.addRow(term_label("Accuracy level", "accuracy level"), self.accuracy)
        form.addRow(term_label("Embeddings", "embeddings"), self.embeddings)
        form.addRow(term_label("Output layer", "lm_head"), self.lm_head)
        form.addRow(term_label("Layers kept at 8 bits", "eight bit"), self.eight_bit)
        form.addRow(term_label("Layers kept at 32 bits", "full precision"), self.full_precision)
        form.addRow("Sensitive layers at 8 bits", self.sensitive)
        form.addRow("", self.act_order)
        self.advanced = Collapsible("Advanced", advanced)
        self.custom_note = QLabel()
        self.reset_button = QPushButton("Back to the preset")
        self.body.addWidget(self.advanced)
        custom = QHBoxLayout()
        custom.addWidget(self.custom_note)
        custom.addWidget(self.reset_button)
        custom.addStretch(1)
        self.body.addLayout(custom)

        self.estimate = QLabel()
        self.estimate.setObjectName("estimate")
        self.estimate.setWordWrap(True)
        with_tip(self.estimate, "bits per weight")
        self.problem = InlineMessage()
        self.body.addWidget(self.estimate)
        self.body.addWidget(self.problem)
        self.body.addStretch(1)

        for combo in (self.method, self.block_size, self.accuracy):
            combo.currentIndexChanged.connect(self._edited)
        for box in (self.symmetric, self.embeddings, self.lm_head, self.act_order):
            box.toggled.connect(self._edited)
        for line in (self.eight_bit, self.full_precision):
            line.textChanged.connect(self._edited)
        self.sensitive.valueChanged.connect(self._edited)
        self.reset_button.clicked.connect(lambda: self._preset_chosen(self.session.preset))
        session.model_changed.connect(self._update_sizes)
        self._loading = False
        self._problem: str | None = None
        self._tune_problem: str | None = None
        self.cards[session.preset].radio.setChecked(True)

    def _tune_box(self) -> QGroupBox:
        """Auto-tune: try several settings on the user's text and keep the smallest good enough."""
        self.tune = QGroupBox("Let the workbench choose (auto-tune)")
        self.tune.setCheckable(True)
        self.tune.setChecked(False)
        self.tune.setToolTip(
            f"Instead of one setting, try {len(CANDIDATES)} from the smallest up, measure each on your text and keep "
            "the smallest that loses no more than you allow. It exports once, so it takes a few minutes more than "
            "one preset."
        )
        self.max_loss = QDoubleSpinBox(minimum=0.0, maximum=100.0, singleStep=1.0, decimals=1,
                                       value=DEFAULT_QUALITY_LOSS_PCT, suffix=" % at most")
        self.max_loss.setMaximumWidth(200)
        with_tip(self.max_loss, "perplexity")
        self.tune_text = QLineEdit(placeholderText="a few pages of text like yours (.txt, .jsonl, .csv or .json)")
        self.tune_browse = QPushButton("Choose file…")
        text_row = QHBoxLayout()
        text_row.addWidget(self.tune_text, 1)
        text_row.addWidget(self.tune_browse)
        self.tune_problem = InlineMessage()
        form = QFormLayout(self.tune)
        form.setVerticalSpacing(10)
        form.setHorizontalSpacing(24)
        form.addRow(term_label("Perplexity may rise", "perplexity"), self.max_loss)
        form.addRow("Judged on your text", text_row)
        form.addRow("", self.tune_problem)
        self.tune.toggled.connect(self._tune_edited)
        self.max_loss.valueChanged.connect(self._tune_edited)
        self.tune_text.editingFinished.connect(self._tune_edited)
        self.tune_browse.clicked.connect(self._pick_tune_text)
        return self.tune

    def _pick_tune_text(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Choose a text to judge quality on", "", FILE_FILTER)
        if path:
            self.use_tune_text(Path(path))

    def use_tune_text(self, path: Path) -> None:
        self.tune.setChecked(True)
        self.tune_text.setText(str(path))
        self._tune_edited()

    def _tune_edited(self) -> None:
        on = self.tune.isChecked()
        for widget in (*self.cards.values(), self.advanced, self.custom_note, self.reset_button):
            widget.setEnabled(not on)
        typed = self.tune_text.text().strip()
        text, problem = None, "Choose a text of yours: auto-tune judges each setting on it."
        if typed:
            try:
                text, problem = check_text_file(Path(typed).expanduser()), None
            except WorkbenchError as error:
                problem = str(error)
        self._tune_problem = problem
        if on and problem and typed:
            self.tune_problem.problem(problem)
        else:
            self.tune_problem.clear()
        self.session.set_tune(TuneChoice(self.max_loss.value(), text) if on else None)
        self._update_sizes()

    def blocker(self) -> str | None:
        if self.session.tune is not None and self._tune_problem:
            return self._tune_problem
        return self._problem

    def choose(self, preset: str) -> None:
        self.cards[preset].radio.setChecked(True)

    def _preset_chosen(self, name: str) -> None:
        self._show_settings(preset_settings(name))
        self.session.set_settings(name, preset_settings(name))
        self._update_sizes()

    def _show_settings(self, settings: QuantSettings) -> None:
        """Put `settings` into the advanced controls without treating it as an edit."""
        self._loading = True
        self.method.setCurrentIndex(self.method.findData(settings.method))
        self.block_size.setCurrentIndex(self.block_size.findData(settings.block_size))
        self.symmetric.setChecked(settings.symmetric)
        self.accuracy.setCurrentIndex(self.accuracy.findData(settings.accuracy_level))
        self.embeddings.setChecked(settings.quantize_embeddings)
        self.lm_head.setChecked(settings.quantize_lm_head)
        self.eight_bit.setText(", ".join(settings.eight_bit))
        self.full_precision.setText(", ".join(settings.exclude))
        self.act_order.setChecked(settings.act_order)
        self.sensitive.setValue(settings.sensitive_8bit_pct)
        self._loading = False

    def _edited(self) -> None:
        if self._loading:
            return
        self.act_order.setEnabled(METHODS[self.method.currentData()].act_order)
        try:
            settings = preset_settings(self.session.preset).replace(
                method=self.method.currentData(),
                block_size=self.block_size.currentData(),
                symmetric=self.symmetric.isChecked(),
                accuracy_level=self.accuracy.currentData(),
                quantize_embeddings=self.embeddings.isChecked(),
                quantize_lm_head=self.lm_head.isChecked(),
                eight_bit=patterns(self.eight_bit.text()),
                exclude=patterns(self.full_precision.text()),
                act_order=self.act_order.isChecked(),
                sensitive_8bit_pct=self.sensitive.value(),
            )
        except WorkbenchError as error:
            self._set_problem(str(error))
            return
        self.session.set_settings(self.session.preset, settings)
        self._update_sizes()

    def _set_problem(self, problem: str | None) -> None:
        self._problem = problem
        if problem:
            self.problem.problem(problem)
            self.estimate.setText("")
        else:
            self.problem.clear()
        self.changed.emit()

    def _update_sizes(self) -> None:
        """The cards' sizes and the estimate for the current settings, from the model's weight shapes."""
        self._set_problem(None)
        self.act_order.setEnabled(METHODS[self.session.settings.method].act_order)
        changed = self.session.settings != preset_settings(self.session.preset)
        title = PRESETS[self.session.preset].title
        self.custom_note.setText(f"Changed in Advanced: no longer the plain “{title}” preset." if changed else "")
        self.reset_button.setVisible(changed)
        facts, model = self.session.facts, self.session.model
        if model is None:
            self.estimate.setText("Choose a model first to see the sizes.")
            return
        for name, card in self.cards.items():
            size = facts.preset_bytes[name]
            card.size.setText(f"about {format_size(size)} · {facts.original_bytes / size:.1f}x smaller")
        if self.session.tune is not None:
            sizes = [int4_bytes(model.info, settings) for settings in CANDIDATES]
            self.estimate.setText(
                f"Auto-tune tries {len(CANDIDATES)} settings, from about <b>{format_size(min(sizes))}</b> "
                f"({facts.original_bytes / min(sizes):.1f}x smaller) to about <b>{format_size(max(sizes))}</b> "
                f"({facts.original_bytes / max(sizes):.1f}x smaller), and keeps the smallest whose perplexity on your "
                f"text rises no more than {self.session.tune.max_quality_loss_pct:g} %."
            )
            return
        size = int4_bytes(model.info, self.session.settings)
        plan = plan_run(model, self.session.settings, self.session.calibration)
        self.estimate.setText(
            f"After INT4: about <b>{format_size(size)}</b>, {facts.original_bytes / size:.1f}x smaller than the "
            f"{format_size(facts.original_bytes)} now ({8 * size / model.info.parameters:.1f} bits per weight).<br>"
            f"Shrinking it here takes <b>{rough_duration(plan.time.seconds)}</b> and about "
            f"<b>{format_size(plan.shrink_ram)}</b> of memory ({plan.fit(plan.shrink_ram)}); the INT4 model then runs "
            f"in about {format_size(plan.run_int4_ram)} ({plan.fit(plan.run_int4_ram)})."
        )
