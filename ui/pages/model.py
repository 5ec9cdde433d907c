"""Step 1, Model: the demo model, a folder, a GGUF file or a hub id; what it is and whether it fits."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
)

from ui.jobs import Job
from ui.pages import Page
from ui.session import ModelFacts
from ui.widgets import (
    FitLabel,
    InlineMessage,
    JobPanel,
    PageJob,
    human_count,
    term_label,
)
from workbench.run.memory import original_sizes, preset_estimates, ram_estimates
from workbench.units import format_size
from workbench.durations import rough_duration
from workbench.run.pipeline import plan_run
from workbench.run.streamed import builder_reason
from workbench.run.tune import CANDIDATES
from workbench.settings import DEFAULT_PRESET, PRESETS, preset_settings
from workbench.sources import DEMO, DEMO_NAME, ResolvedModel, resolve

DEFAULT_SETTINGS = PRESETS[DEFAULT_PRESET].settings  # the machine's figures are read with these (ModelFacts.ram)

KINDS = {
    "demo": "the demo model",
    "folder": "a Hugging Face folder",
    "gguf": "a GGUF file, read tensor by tensor",
    "hub": "from the Hugging Face hub",
}


def open_model(spec: str, trust_remote_code: bool, *, progress, cancelled) -> tuple[ResolvedModel, ModelFacts]:
    """The model and the core's size and RAM figures for it (a background job)."""
    model = resolve(spec, trust_remote_code=trust_remote_code, progress=progress, cancelled=cancelled)
    progress(1.0, "estimating sizes")
    facts = ModelFacts(
        original_bytes=sum(original_sizes(model.info).values()),
        preset_bytes=preset_estimates(model.info),
        ram=ram_estimates(model.info, DEFAULT_SETTINGS, builder_reason(model, DEFAULT_SETTINGS) is None),
    )
    return model, facts


class ModelPage(Page):
    title = "Model"
    purpose = (
        "Choose the language model to shrink; you will see how big it is now, after INT4, and whether it "
        "fits this computer."
    )

    def __init__(self, session, parent=None):
        super().__init__(session, parent)

        sources = QGroupBox("Which model?")
        self.demo_button = QPushButton(f"Use the demo model ({DEMO_NAME})")
        self.demo_button.setObjectName("primary")
        self.demo_button.setToolTip(
            "A small chat model (135 million parameters) that ships with the workbench: no download needed."
        )
        self.folder_button = QPushButton("Open folder…")
        self.folder_button.setToolTip("A Hugging Face model folder: config.json, tokenizer and *.safetensors weights.")
        self.gguf_button = QPushButton("Open GGUF file…")
        self.gguf_button.setToolTip("A .gguf file (llama.cpp format); its weights are read from it as they are needed.")
        buttons = QHBoxLayout()
        for button in (self.demo_button, self.folder_button, self.gguf_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        self.hub_id = QLineEdit(placeholderText="organisation/model, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
        self.hub_id.setToolTip(
            "The name of a model on huggingface.co, the public model library: its configuration, "
            "tokenizer and weights are downloaded once (needs the internet)."
        )
        self.hub_button = QPushButton("Download")
        hub_row = QHBoxLayout()
        hub_row.addWidget(QLabel("Or a Hugging Face hub id:"))
        hub_row.addWidget(self.hub_id, 1)
        hub_row.addWidget(self.hub_button)
        self.trust = QCheckBox("Allow code shipped with the model (trust remote code)")
        self.trust.setToolTip(
            "Some models need Python code from their own folder to load. That code can do anything on "
            "this computer: allow it only for models from authors you trust."
        )
        self.problem = InlineMessage()
        self.panel = JobPanel()
        self.jobs = PageJob(self, panel=self.panel, failure_title="The model could not be opened",
                            problem=self.problem.problem)
        box = QVBoxLayout(sources)
        box.setSpacing(12)
        box.addLayout(buttons)
        box.addLayout(hub_row)
        box.addWidget(self.trust)
        box.addWidget(self.problem)
        box.addWidget(self.panel)
        self.body.addWidget(sources)

        self.facts_box = QGroupBox("About this model")
        self.form = form = QFormLayout(self.facts_box)
        form.setHorizontalSpacing(24)
        form.setVerticalSpacing(10)
        self.name = QLabel()
        self.kind = QLabel()
        self.parameters = QLabel()
        self.context = QLabel()
        self.size_now = QLabel()
        self.presets = QLabel()
        self.machine = QLabel()
        self.choice = QLabel()
        self.time = QLabel()
        self.fit_shrink, self.fit_original, self.fit_int4 = FitLabel(), FitLabel(), FitLabel()
        self.fit_gpu = FitLabel()
        for label in (self.name, self.kind, self.parameters, self.context, self.size_now, self.presets, self.machine,
                      self.choice, self.time):
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addRow("Model", self.name)
        form.addRow(term_label("Type", "architecture"), self.kind)
        form.addRow(term_label("Parameters", "parameters"), self.parameters)
        form.addRow(term_label("Context length", "context length"), self.context)
        form.addRow(term_label("Size now", "fp32"), self.size_now)
        form.addRow(term_label("Size after INT4", "INT4"), self.presets)
        form.addRow(term_label("This computer", "RAM"), self.machine)
        # What shrinking costs follows the settings chosen in step 2 (the default preset until then).
        form.addRow("Shrinking with", self.choice)
        form.addRow("Time to shrink it", self.time)
        form.addRow(term_label("Memory to shrink it", "RAM"), self.fit_shrink)
        form.addRow("Memory to run the original", self.fit_original)
        form.addRow("Memory to run the INT4 model", self.fit_int4)
        form.addRow("INT4 on the GPU", self.fit_gpu)
        self.gpu_row = form.rowCount() - 1
        self.facts_box.hide()
        self.body.addWidget(self.facts_box)
        self.body.addStretch(1)

        self.demo_button.clicked.connect(lambda: self.load(DEMO))
        self.folder_button.clicked.connect(self._pick_folder)
        self.gguf_button.clicked.connect(self._pick_gguf)
        self.hub_button.clicked.connect(lambda: self.load(self.hub_id.text()))
        self.hub_id.returnPressed.connect(lambda: self.load(self.hub_id.text()))
        # A run made or opened since: an earlier problem opening a model no longer describes the state.
        session.run_changed.connect(self.problem.clear)
        session.run_changed.connect(self._show_plan)  # a finished run taught the rates the times come from
        session.settings_changed.connect(self._show_plan)

    def blocker(self) -> str | None:
        if self.jobs.running:
            return "Wait until the model is open."
        return None if self.session.model else "Choose a model first."

    def load(self, spec: str) -> Job | None:
        """Open `spec` ('demo', a folder, a .gguf file or a hub id) in the background."""
        if not spec.strip():
            self.problem.problem("Type a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or pick a folder or file.")
            return None
        self.problem.clear()
        trust = self.trust.isChecked()
        return self.jobs.start(
            Job(open_model, spec, trust), "Reading the model…" if spec != DEMO else "Preparing the demo model…",
            done=lambda result: self._opened(result, trust), replace=True,
        )

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a Hugging Face model folder")
        if folder:
            self.load(folder)

    def _pick_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF file", "", "GGUF files (*.gguf);;All files (*)")
        if path:
            self.load(path)

    def _show_plan(self) -> None:
        """Time and memory to shrink the model with the chosen settings, and to run each side, from the core's
        one estimate (workbench.run.pipeline.plan_run, as `info` gives them)."""
        session = self.session
        if session.model is None:
            return
        title = PRESETS[session.preset].title
        own = session.settings != preset_settings(session.preset)
        if session.tune is not None:
            choice = f"auto-tune: up to {len(CANDIDATES)} settings are tried; the figures below are for {title}"
        elif own:
            choice = f"your own settings (changed from {title} in step 2, Settings)"
        else:
            choice = title + (" (the default: choose another in step 2, Settings)" if session.preset == DEFAULT_PRESET
                              else " (chosen in step 2, Settings)")
        self.choice.setText(choice)
        plan = plan_run(session.model, session.settings, session.calibration)
        self.time.setText(f"{'Your settings' if own else title}: {rough_duration(plan.time.seconds)}"
                          f"<br><i>{plan.time.basis_sentence}</i>")
        self.fit_shrink.set_fit(plan.shrink_ram, plan.available)
        self.fit_original.set_fit(plan.run_original_ram, plan.available)
        if plan.original_skipped:
            self.fit_original.setText(self.fit_original.text() + "<br>a run skips it and measures the INT4 model alone")
        self.fit_int4.set_fit(plan.run_int4_ram, plan.available)
        gpu_free = session.facts.ram["gpu_free"] if session.facts else None
        self.form.setRowVisible(self.gpu_row, gpu_free is not None)
        if gpu_free is not None:  # the INT4 weights and buffers live in GPU memory when CUDA runs them
            self.fit_gpu.set_fit(plan.run_int4_ram, gpu_free)

    def _opened(self, result: tuple[ResolvedModel, ModelFacts], trust_remote_code: bool) -> None:
        model, facts = result
        self._show(model, facts)
        self.session.set_model(model, facts, trust_remote_code)
        self._show_plan()

    def _show(self, model: ResolvedModel, facts: ModelFacts) -> None:
        info = model.info
        self.name.setText(f"<b>{info.name}</b>")
        self.kind.setText(f"{info.architecture}, {info.layers} layers; {KINDS.get(info.kind, info.kind)}")
        self.parameters.setText(human_count(info.parameters))
        self.context.setText(f"{info.context_length:,} tokens" if info.context_length else "not stated")
        self.size_now.setText(f"{format_size(info.fp32_bytes)} (32-bit weights)")
        self.presets.setText(
            "<br>".join(
                f"{PRESETS[name].title}: <b>{format_size(size)}</b> ({facts.original_bytes / size:.1f}x smaller)"
                for name, size in facts.preset_bytes.items()
            )
        )
        ram = facts.ram
        self.machine.setText(
            f"{format_size(ram['machine_total'])} of RAM, {format_size(ram['machine_available'])} free now"
        )
        self.facts_box.show()
