"""Step 7, Export: build a bundle that runs elsewhere with one command, checked; and where the run is."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
)

from exporters.bundle import BundleResult, build_bundle
from exporters.serving import LocalServer, start_server
from ui.jobs import Job
from ui.pages import Page
from ui.widgets import InlineMessage, JobPanel, PageJob, open_path, with_tip
from workbench.layout import CHART_FILE, INT4, ORIGINAL, REPORT_FILE, RUN_FILE, TUNE_CHART_FILE, folder_bytes
from workbench.units import format_size

TARGETS = (
    ("runner", "Runs with “python run.py”"),
    ("triton", "Triton Inference Server repository"),
)
OPTIONAL_CONTENTS = {TUNE_CHART_FILE}  # only tuned runs have it; its row hides otherwise
CONTENTS = (
    (INT4, "The INT4 model and its tokenizer: the part to deploy. It runs with ONNX Runtime."),
    (ORIGINAL, "The original model as 32-bit ONNX, for comparisons."),
    (REPORT_FILE, "The report: what was saved and what it cost, in plain words."),
    (CHART_FILE, "The memory chart."),
    (TUNE_CHART_FILE, "The auto-tune chart: size against quality of every candidate tried."),
    (RUN_FILE, "Every setting and figure of this run, for tools and for later."),
)


def bundle_path(parent: Path, run_dir: Path, target: str) -> Path:
    """A new name in `parent` for the run's bundle: run-bundle, run-bundle-2, ... (.zip added by the core)."""
    stem = f"{run_dir.name}-{'bundle' if target == 'runner' else 'triton'}"
    for number in range(1, 1000):
        path = parent / (stem if number == 1 else f"{stem}-{number}")
        if not path.exists() and not path.with_name(path.name + ".zip").exists():
            return path
    return parent / stem  # the core then says it exists


class ExportPage(Page):
    title = "Export"
    purpose = "Take the INT4 model elsewhere: a bundle that runs with one command and proves what it is."
    needs = "run"

    def __init__(self, session, parent=None):
        super().__init__(session, parent)
        self.bundle: Path | None = None  # the last bundle built for this run

        bundle_box = QGroupBox("Bundle")
        bundle_layout = QVBoxLayout(bundle_box)
        explanation = QLabel(
            "A bundle holds the INT4 model, its tokenizer, a small program that chats with it, and a manifest "
            "with a checksum of every file and the figures measured here. Before it is saved, the bundled model "
            "must answer a fixed question exactly as the quantized model did here. On another computer, "
            "<tt>int4-workbench verify</tt> checks it again."
        )
        explanation.setWordWrap(True)
        self.target = QComboBox()
        for key, text in TARGETS:
            self.target.addItem(text, key)
        self.target.setToolTip(
            "“python run.py” chats with the model on any computer with Python, onnxruntime, tokenizers and numpy "
            "(no workbench). Triton Inference Server serves the same model to many users from a server."
        )
        self.zip = QCheckBox("As one .zip file")
        self.zip.setToolTip("One file to send or upload; verify reads it without unpacking it by hand.")
        self.build_button = QPushButton("Build bundle…")
        self.build_button.setObjectName("primary")
        controls = QHBoxLayout()
        controls.addWidget(self.target)
        controls.addWidget(self.zip)
        controls.addWidget(self.build_button)
        controls.addStretch(1)
        self.problem = InlineMessage()
        self.panel = JobPanel()
        self.jobs = PageJob(self, panel=self.panel, failure_title="The bundle could not be written",
                            problem=self.problem.problem, ended=lambda: self.build_button.setEnabled(True))
        self.result = QLabel()
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.result.hide()
        self.open_bundle_button = QPushButton("Open folder")
        self.open_bundle_button.setToolTip("Show the bundle in the file manager.")
        self.open_bundle_button.hide()
        self.server: LocalServer | None = None
        self.server_jobs = PageJob(self, failure_title="The server could not start", problem=self.problem.problem,
                                   ended=lambda: self.serve_button.setEnabled(True))
        self.serve_button = QPushButton("Start server")
        self.serve_button.setToolTip("Serve the bundle here over the OpenAI HTTP API (python run.py --serve), "
                                     "for other programs on this computer.")
        self.serve_button.hide()
        self.serving = QLabel()
        self.serving.setWordWrap(True)
        self.serving.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.serving.hide()
        bundle_layout.addWidget(explanation)
        bundle_layout.addLayout(controls)
        bundle_layout.addWidget(self.problem)
        bundle_layout.addWidget(self.panel)
        bundle_layout.addWidget(self.result)
        bundle_buttons = QHBoxLayout()
        bundle_buttons.addWidget(self.open_bundle_button)
        bundle_buttons.addWidget(self.serve_button)
        bundle_buttons.addStretch(1)
        bundle_layout.addLayout(bundle_buttons)
        bundle_layout.addWidget(self.serving)
        self.body.addWidget(bundle_box)

        self.folder = QLabel()
        self.folder.setWordWrap(True)
        self.folder.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_button = QPushButton("Open run folder")
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(self.open_button)
        contents = QGroupBox("The run folder")
        grid = QGridLayout()
        grid.setHorizontalSpacing(24)
        grid.setVerticalSpacing(10)
        grid.setColumnStretch(2, 1)
        self.sizes: dict[str, QLabel] = {}
        self.content_rows: dict[str, tuple[QLabel, ...]] = {}
        for row_index, (name, meaning) in enumerate(CONTENTS):
            is_folder = "." not in name
            title = QLabel(f"<b>{name}{'/' if is_folder else ''}</b>")
            grid.addWidget(title, row_index, 0)
            self.sizes[name] = QLabel()
            grid.addWidget(self.sizes[name], row_index, 1, alignment=Qt.AlignmentFlag.AlignRight)
            description = QLabel(meaning)
            description.setWordWrap(True)
            if name == INT4:
                with_tip(description, "ONNX")
            grid.addWidget(description, row_index, 2)
            self.content_rows[name] = (title, self.sizes[name], description)
        contents_layout = QVBoxLayout(contents)
        contents_layout.addLayout(row)
        contents_layout.addLayout(grid)
        self.body.addWidget(contents)
        self.body.addStretch(1)

        self.build_button.clicked.connect(self._pick_folder)
        self.open_bundle_button.clicked.connect(self._open_bundle)
        self.serve_button.clicked.connect(self._toggle_server)
        QApplication.instance().aboutToQuit.connect(self._stop_server)
        self.open_button.clicked.connect(lambda: open_path(self.session.run_dir))
        session.run_changed.connect(self._show_run)

    def blocker(self) -> str | None:
        return "Wait until the bundle is written." if self.jobs.running else None

    def build(self, parent: Path) -> Job | None:
        """Write the run's bundle into the folder `parent` in the background, under a new name."""
        run_dir = self.session.run_dir
        if run_dir is None or self.jobs.running:
            return None
        target, zip_file = self.target.currentData(), self.zip.isChecked()
        out = bundle_path(Path(parent), run_dir, target)
        self.problem.clear()
        self.result.hide()
        self.open_bundle_button.hide()
        self.build_button.setEnabled(False)
        return self.jobs.start(Job(build_bundle, run_dir, out, target=target, zip_file=zip_file),
                               f"Writing {out.name}…", done=lambda result: self._built(run_dir, result))

    def _pick_folder(self) -> None:
        start = str(self.session.run_dir.parent) if self.session.run_dir else ""
        folder = QFileDialog.getExistingDirectory(self, "Where should the bundle be saved?", start)
        if folder:
            self.build(Path(folder))

    def _built(self, run_dir: Path, result: BundleResult) -> None:
        if self.session.run_dir != run_dir:
            return
        self.bundle = result.path
        check = result.check
        lines = [
            f"Saved <b>{result.path}</b>: {result.files} files, {format_size(result.bytes)}.",
            f"Checked: asked “{check['prompt']}”, the bundled model answers “{check['text'].strip()}”; "
            "verify expects the same answer.",
        ]
        if result.target == "runner":
            lines.append("Run it with <tt>pip install -r requirements.txt</tt> and <tt>python run.py</tt>.")
            if result.genai["written"]:
                lines.append("It also runs with onnxruntime-genai (genai_config.json).")
        else:
            lines.append("Point <tt>tritonserver --model-repository</tt> at it; its README says what a request holds.")
        self.result.setText("<br>".join(lines))
        self.result.show()
        self.open_bundle_button.show()
        self.serve_button.setVisible(result.target == "runner" and not result.path.suffix == ".zip")

    def _toggle_server(self) -> None:
        """Start the bundle's OpenAI server in the background, or stop the running one."""
        if self.server is not None:
            self._stop_server()
            return
        if self.bundle is None or self.server_jobs.running:
            return
        self.serve_button.setEnabled(False)
        self.server_jobs.start(Job(start_server, self.bundle, port=0), done=self._serving)

    def _serving(self, server: LocalServer) -> None:
        self.server = server
        self.serving.setText(f"Serving at <b>{server.url}</b> (OpenAI API) until you stop it or close the "
                             f"workbench. Try it:<br><tt>{html.escape(server.curl())}</tt>")
        self.serving.show()
        self.serve_button.setText("Stop server")

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.serving.hide()
        self.serve_button.setText("Start server")

    def _open_bundle(self) -> None:
        if self.bundle is not None:
            open_path(self.bundle if self.bundle.is_dir() else self.bundle.parent)

    def _show_run(self) -> None:
        self._stop_server()
        self.bundle = None
        self.result.hide()
        self.open_bundle_button.hide()
        self.serve_button.hide()
        self.problem.clear()
        self.entered()

    def entered(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is None:
            return
        self.folder.setText(f"This run is saved in <b>{run_dir}</b>")
        for name, label in self.sizes.items():
            path = run_dir / name
            shown = name not in OPTIONAL_CONTENTS or path.exists()
            for widget in self.content_rows[name]:
                widget.setVisible(shown)
            if not shown:
                label.clear()
            elif path.is_dir():
                label.setText(format_size(folder_bytes(path)))
            else:
                label.setText(format_size(path.stat().st_size) if path.is_file() else "missing")
