"""Step 7, Export: build a bundle that runs elsewhere with one command, checked; and where the run is."""

from __future__ import annotations

import html
import shlex
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
)

from exporters.bundle import BundleResult, build_bundle
from exporters.serving import LocalServer, start_server
from ui.jobs import Job
from ui.pages import Page
from ui.widgets import InlineMessage, JobPanel, PageJob, open_path, with_tip
from workbench.generation.compare import CONVERSATIONS
from workbench.layout import CHART_FILE, INT4, ORIGINAL, REPORT_FILE, RUN_FILE, TUNE_CHART_FILE, folder_bytes
from workbench.units import format_size

TARGETS = (
    ("runner", "Runs with “python run.py”"),
    ("triton", "Triton Inference Server repository"),
)
OPTIONAL_CONTENTS = {TUNE_CHART_FILE, CONVERSATIONS}  # only some runs have them; their rows hide otherwise
# {model}: the model's own files, the size the Report gives (the folder also holds the tokenizer and settings).
CONTENTS = (
    (INT4, "The INT4 model ({model} of it) and its tokenizer: the part to deploy. It runs with ONNX Runtime."),
    (ORIGINAL, "The original model as 32-bit ONNX ({model} of it), for comparisons."),
    (CONVERSATIONS, "Your conversations from the Compare step, one file each; they come back when the run is opened."),
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


def destination_in(folder: Path, run_dir: Path, target: str) -> Path:
    """Where a bundle goes when the user picks `folder`: an empty folder (say, one just created in
    the dialog) is the bundle itself; a folder holding files gets a new bundle folder inside."""
    folder = Path(folder)
    if folder.is_dir() and not any(folder.iterdir()):
        return folder
    return bundle_path(folder, run_dir, target)


def use_command(result: BundleResult) -> str:
    """The shell line that runs the bundle, starting with `cd` into where it was written."""
    path = result.path
    if result.target == "triton":
        return f'cd {shlex.quote(str(path))} && tritonserver --model-repository "$PWD"'
    steps = "pip install -r requirements.txt && python run.py"
    if path.suffix == ".zip":  # the zip holds one top folder named like it
        return (f"cd {shlex.quote(str(path.parent))} && python -m zipfile -e {shlex.quote(path.name)} . && "
                f"cd {shlex.quote(path.stem)} && {steps}")
    return f"cd {shlex.quote(str(path))} && {steps}"


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
        self.build_button = QPushButton("Build bundle")
        self.build_button.setObjectName("primary")
        controls = QHBoxLayout()
        controls.addWidget(self.target)
        controls.addWidget(self.zip)
        controls.addStretch(1)
        self.destination = QLineEdit()
        self.destination.setToolTip("The bundle is written exactly here (with .zip added for one file). "
                                    "A folder that does not exist yet is created.")
        self.choose_button = QPushButton("Choose…")
        self.choose_button.setToolTip("Choose or create a folder; an empty one becomes the bundle.")
        where = QHBoxLayout()
        where.addWidget(QLabel("Save to"))
        where.addWidget(self.destination, 1)
        where.addWidget(self.choose_button)
        where.addWidget(self.build_button)
        self.problem = InlineMessage()
        self.panel = JobPanel()
        self.jobs = PageJob(self, panel=self.panel, failure_title="The bundle could not be written",
                            problem=self.problem.problem, ended=lambda: self.build_button.setEnabled(True))
        self.result = QLabel()
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.result.hide()
        self.command = QLineEdit(readOnly=True)
        self.command.setObjectName("command")
        self.command.setToolTip("Paste this into a terminal to run the bundle.")
        self.open_bundle_button = QPushButton("Open folder")
        self.open_bundle_button.setToolTip("Show the bundle in the file manager.")
        self.server: LocalServer | None = None
        self.server_jobs = PageJob(self, failure_title="The server could not start", problem=self.problem.problem,
                                   ended=self._server_start_ended)
        self.serve_button = QPushButton("Start server")
        self.serve_button.setToolTip("Serve the bundle here over the OpenAI HTTP API (python run.py --serve), "
                                     "for other programs on this computer.")
        self.serve_button.hide()
        self.serving = QLabel()
        self.serving.setWordWrap(True)
        self.serving.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.serving.hide()
        self.copy_button = QPushButton("Copy command")
        done_row = QHBoxLayout()
        done_row.addWidget(self.command, 1)
        done_row.addWidget(self.copy_button)
        done_row.addWidget(self.open_bundle_button)
        done_row.addWidget(self.serve_button)
        self.done_box = QGroupBox("How to use it")
        self.done_box.setLayout(done_row)
        self.done_box.hide()
        bundle_layout.addWidget(explanation)
        bundle_layout.addLayout(controls)
        bundle_layout.addLayout(where)
        bundle_layout.addWidget(self.problem)
        bundle_layout.addWidget(self.panel)
        bundle_layout.addWidget(self.result)
        bundle_layout.addWidget(self.done_box)
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
            description = QLabel(meaning.format(model="…"))
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

        self.build_button.clicked.connect(lambda: self.build(Path(self.destination.text().strip()).expanduser()))
        self.choose_button.clicked.connect(self._pick_folder)
        self.copy_button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.command.text()))
        self.target.currentIndexChanged.connect(self._suggest_destination)
        self.open_bundle_button.clicked.connect(self._open_bundle)
        self.serve_button.clicked.connect(self._toggle_server)
        QApplication.instance().aboutToQuit.connect(self._stop_server)
        self.open_button.clicked.connect(lambda: open_path(self.session.run_dir))
        session.run_changed.connect(self._show_run)

    def blocker(self) -> str | None:
        return "Wait until the bundle is written." if self.jobs.running else None

    def build(self, destination: Path) -> Job | None:
        """Write the run's bundle exactly at `destination` (a new folder, or an empty one) in the background."""
        run_dir = self.session.run_dir
        if run_dir is None or self.jobs.running:
            return None
        if not str(destination).strip(" ."):
            self.problem.problem("Type or choose where to save the bundle.")
            return None
        target, zip_file = self.target.currentData(), self.zip.isChecked()
        out = Path(destination).absolute()
        self.destination.setText(str(out))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder chosen or made for it: the bundle takes its place, nothing else there
        self.problem.clear()
        self.result.hide()
        self.done_box.hide()
        self.build_button.setEnabled(False)
        return self.jobs.start(Job(build_bundle, run_dir, out, target=target, zip_file=zip_file),
                               f"Writing {out.name}…", done=lambda result: self._built(run_dir, result))

    def _pick_folder(self) -> None:
        start = str(Path(self.destination.text()).parent) if self.destination.text() else ""
        folder = QFileDialog.getExistingDirectory(self, "Choose or create the bundle's folder", start)
        if folder:
            self.choose(Path(folder))

    def choose(self, folder: Path) -> None:
        """The user picked `folder`: show exactly where the bundle will be written."""
        if self.session.run_dir is not None:
            self.destination.setText(str(destination_in(folder, self.session.run_dir, self.target.currentData())))

    def _suggest_destination(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is not None and not self.jobs.running:
            self.destination.setText(str(bundle_path(run_dir.parent, run_dir, self.target.currentData())))

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
            lines.append("Run it with the command below (Python 3.10 or newer); it chats with the model.")
            if result.genai["written"]:
                lines.append("It also runs with onnxruntime-genai (genai_config.json).")
        else:
            lines.append("Serve it with the command below (tritonserver); its README says what a request holds.")
        self.result.setText("<br>".join(lines))
        self.result.show()
        self.command.setText(use_command(result))
        self.done_box.show()
        self.serve_button.setVisible(result.target == "runner" and not result.path.suffix == ".zip")
        self._suggest_destination()  # a new name for the next bundle

    def _toggle_server(self) -> None:
        """Start the bundle's OpenAI server in the background, cancel its start, or stop the running one."""
        if self.server is not None:
            self._stop_server()
            return
        if self.server_jobs.running:  # loading a large model on a busy machine can take minutes: the user decides
            self.server_jobs.cancel()
            self.serve_button.setEnabled(False)
            return
        if self.bundle is None:
            return
        self.serve_button.setText("Cancel start")
        self.server_jobs.start(Job(start_server, self.bundle, port=0), done=self._serving)

    def _server_start_ended(self) -> None:
        self.serve_button.setEnabled(True)
        if self.server is None:
            self.serve_button.setText("Start server")

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
        self.done_box.hide()
        self.serve_button.hide()
        self.problem.clear()
        self._suggest_destination()
        self.entered()

    def entered(self) -> None:
        run_dir = self.session.run_dir
        if run_dir is None:
            return
        self.folder.setText(f"This run is saved in <b>{run_dir}</b>")
        model_bytes = {INT4: self.session.record.int4.bytes, ORIGINAL: self.session.record.original.bytes}
        for name, meaning in CONTENTS:
            if name in model_bytes:
                self.content_rows[name][2].setText(meaning.format(model=format_size(model_bytes[name])))
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
