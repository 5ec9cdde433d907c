"""The desktop app, driven with pytest-qt on the tiny model: the whole wizard, Cancel, bad inputs."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from PySide6.QtCore import QRect, Qt, QTimer
from PySide6.QtWidgets import QMessageBox, QStyle

from conftest import JOB_TIMEOUT_MS, open_model, open_run_on, prose_text, wait_for_jobs
from ui import jobs
from ui.glossary import tip
from ui.theme import RUN_ITEM_PADDING_X
from ui.jobs import Job
from ui.main_window import STEP_PAGES, MainWindow
from ui.pages.calibration import CalibrationPage
from ui.pages.compare import ComparePage
from ui.pages.export import ExportPage
from ui.pages.model import ModelPage
from ui.pages.quantize import DONE, QuantizePage
from ui.pages.report import ReportPage
from ui.pages.settings import SettingsPage
from workbench.run.memory import FITS, NO_FIT, TIGHT, fit_verdict
from workbench.run.folders import list_runs
from workbench.generation.bench import bench_run
from workbench.errors import WorkbenchError
from workbench.jobs import check
from workbench.run import stages
from workbench.run.pipeline import plan_run, quantize_run
from workbench.run.folders import load_run
from workbench.quantization.methods import METHODS as METHOD_TABLE
from workbench.settings import METHODS, PRESETS, QuantSettings
from workbench.units import format_size
from workbench.durations import rough_duration

RTN = QuantSettings(method="rtn")


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def window(qtbot, runs_dir):
    window = MainWindow(runs_dir)
    qtbot.addWidget(window)
    window.show()
    yield window
    for job in jobs.running():  # no test leaves work running into the next one
        job.cancel()
    wait_for_jobs(qtbot)


@pytest.fixture
def prose(tmp_path) -> Path:
    path = tmp_path / "prose.txt"
    path.write_text(prose_text(12), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory) -> Path:
    """A run made by the core directly, for the tests that reopen one."""
    run_dir = tmp_path_factory.mktemp("finished") / "runs" / "tiny-rtn"
    quantize_run(str(tiny_llama), run_dir, RTN, preset="balanced")
    return run_dir


def use_rtn(window) -> None:
    """RTN keeps the tests fast; set through the Advanced controls as a user would."""
    settings = window.page(SettingsPage)
    settings.advanced.set_open(True)
    settings.method.setCurrentIndex(settings.method.findData("rtn"))


def leftovers(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in runs_dir.iterdir()) if runs_dir.exists() else []


def test_version_prints_and_exits_without_a_display():
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run([sys.executable, "-m", "ui.app", "--version"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("int4-workbench ")


def test_fit_verdict_thresholds():
    assert fit_verdict(1, 10) == FITS
    assert fit_verdict(5, 10) == TIGHT
    assert fit_verdict(9, 10) == NO_FIT
    assert fit_verdict(1, 0) == NO_FIT


def test_every_method_and_stage_is_explained_in_plain_words():
    for method in METHODS:
        assert METHOD_TABLE[method].title and tip(METHOD_TABLE[method].term)
    for stage in (*stages.ALL, stages.candidate(1, 3)):
        assert stage.title and (stage.term is None or tip(stage.term))


def test_steps_unlock_in_order(window, qtbot, tiny_llama):
    assert [window.unavailable(i) is None for i in range(len(STEP_PAGES))] == [True] + [False] * 6
    assert not window.next_button.isEnabled()
    assert "Choose a model" in window.hint.text()
    open_model(window, qtbot, tiny_llama)
    assert [window.unavailable(i) is None for i in range(len(STEP_PAGES))] == [True] * 4 + [False] * 3
    assert window.next_button.isEnabled()


def test_the_model_step_shows_what_the_chosen_settings_cost(window, qtbot, tiny_llama):
    """Time and memory to shrink, and memory to run each side, follow the settings chosen in step 2, with the
    figures `info` gives (plan_run), on the Model step and beside the size estimate in Settings."""
    page = open_model(window, qtbot, tiny_llama)
    model = window.session.model

    def shown(settings: QuantSettings, title: str) -> None:
        plan = plan_run(model, settings)
        assert f"{title}: {rough_duration(plan.time.seconds)}" in page.time.text()
        for label, needed in ((page.fit_shrink, plan.shrink_ram), (page.fit_int4, plan.run_int4_ram),
                              (page.fit_original, plan.run_original_ram)):
            assert f"needs about {format_size(needed)} of" in label.text() and label.verdict == plan.fit(needed)
        assert f"about <b>{format_size(plan.shrink_ram)}</b> of memory" in window.page(SettingsPage).estimate.text()

    window.go(STEP_PAGES.index(SettingsPage))
    assert "Balanced" in page.choice.text() and "default" in page.choice.text()
    shown(PRESETS["balanced"].settings, "Balanced")
    window.page(SettingsPage).choose("quality")
    title = PRESETS["quality"].title
    assert page.choice.text().startswith(title)
    shown(PRESETS["quality"].settings, title)
    use_rtn(window)
    assert "your own settings" in page.choice.text()
    shown(window.session.settings, "Your settings")
    assert window.session.settings.method == "rtn"


def test_the_whole_wizard_from_model_to_report(window, qtbot, tiny_llama, prose, runs_dir):
    page = open_model(window, qtbot, tiny_llama)
    assert page.facts_box.isVisible()
    assert "model" in page.name.text()
    assert page.fit_shrink.verdict in (FITS, TIGHT, NO_FIT)
    assert "MiB" in page.presets.text() or "KiB" in page.presets.text()

    qtbot.mouseClick(window.next_button, Qt.MouseButton.LeftButton)
    settings = window.page(SettingsPage)
    assert window.current == STEP_PAGES.index(SettingsPage)
    balanced = settings.estimate.text()
    settings.choose("smallest")
    assert window.session.preset == "smallest" and settings.estimate.text() != balanced
    use_rtn(window)
    assert window.session.settings.method == "rtn" and window.session.settings.block_size == PRESETS["smallest"].settings.block_size
    assert "Changed in Advanced" in settings.custom_note.text()

    window.go(window.current + 1)
    calibration = window.page(CalibrationPage)
    assert calibration.not_used.isVisible() and "RTN" in calibration.not_used.text()
    assert window.next_button.isEnabled()

    window.go(window.current + 1)
    quantize = window.page(QuantizePage)
    quantize.name.setText("my-first-run")
    gaps = ResponsivenessProbe()
    assert quantize.start() is not None and quantize.jobs.running
    wait_for_jobs(qtbot)
    gaps.stop()
    assert max(gaps.intervals) < 1.0, "the window froze while quantizing"
    assert quantize.result.property("kind") != "problem", quantize.result.text()

    run_dir = runs_dir / "my-first-run"
    assert (run_dir / "run.json").is_file() and (run_dir / "int4" / "model.onnx").is_file()
    assert list(quantize.rows) == list(window.session.record.timings_s)  # a row per stage run
    assert "export" in quantize.rows and all(row.state == DONE for row in quantize.rows.values())
    assert "smaller" in quantize.result.text()
    assert window.runs.count() == 1 and window.runs.item(0).text().startswith("my-first-run\nSmallest (changed) · ")
    assert quantize.name.text() != "my-first-run"  # ready for another run
    assert window.unavailable(STEP_PAGES.index(ReportPage)) is None

    window.go(window.current + 1)
    comparison = window.page(ComparePage)
    comparison.max_tokens.setValue(8)
    comparison.ask("Hello, who are you?")
    wait_for_jobs(qtbot)
    assert not comparison.problem.isVisible(), comparison.problem.text()
    for column in comparison.columns.values():
        assert column.turns[-1][0] == "Hello, who are you?" and column.metrics["speed"].text().endswith("tokens per second")
    assert "Ran on CPU" in comparison.agreement.text()

    window.go(window.current + 1)
    report = window.page(ReportPage)
    assert window.current == STEP_PAGES.index(ReportPage)
    assert "smaller on disk" in report.verdict.text()
    assert not report.chart.pixmap().isNull()
    assert not report.quality.isVisible()
    report.measure(prose)
    wait_for_jobs(qtbot)
    assert not report.problem.isVisible(), report.problem.text()
    assert report.quality.rowCount() == 1 and report.quality.item(0, 0).text() == "prose.txt"
    assert "perplexity" in report.verdict.text()
    assert load_run(run_dir).quality[0].text == "prose.txt"

    window.go(window.current + 1)
    export = window.page(ExportPage)
    assert str(run_dir) in export.folder.text()
    assert all(label.text() != "missing" for label in export.sizes.values())
    assert export.sizes["tune.png"].isHidden()  # only tuned runs have the auto-tune chart
    assert not export.sizes["conversations"].isHidden()  # the Compare step's conversation is kept there
    # The folder holds the tokenizer too; the model's own size beside it is the Report's figure.
    record = window.session.record
    assert report.figures["disk"][1].text() == format_size(record.int4.bytes)
    assert f"({format_size(record.int4.bytes)} of it)" in export.content_rows["int4"][2].text()
    assert f"({format_size(record.original.bytes)} of it)" in export.content_rows["original"][2].text()


class ResponsivenessProbe:
    """Ticks every 20 ms in the GUI thread and records the gaps between ticks."""

    def __init__(self):
        self.intervals: list[float] = []
        self._last = time.monotonic()
        self._timer = QTimer(interval=20)
        self._timer.timeout.connect(self._tick)
        self._timer.start()

    def _tick(self) -> None:
        now = time.monotonic()
        self.intervals.append(now - self._last)
        self._last = now

    def stop(self) -> None:
        self._timer.stop()


def test_steps_1_to_3_stay_usable_while_quantizing_and_the_run_keeps_its_choices(window, qtbot, tiny_llama,
                                                                                tiny_qwen, runs_dir, prose):
    open_model(window, qtbot, tiny_llama)
    use_rtn(window)
    window.go(STEP_PAGES.index(QuantizePage))
    quantize = window.page(QuantizePage)
    started_with = quantize.settings_label.text()
    assert quantize.start() is not None
    # While it runs: every step can be opened, and the choices changed for the next run.
    assert all(window.unavailable(index) is None for index in range(STEP_PAGES.index(QuantizePage) + 1))
    window.go(STEP_PAGES.index(SettingsPage))
    assert window.current == STEP_PAGES.index(SettingsPage)
    settings = window.page(SettingsPage)
    assert settings.isEnabled() and settings.method.isEnabled()
    settings.method.setCurrentIndex(settings.method.findData("hqq"))
    window.go(STEP_PAGES.index(CalibrationPage))
    assert window.current == STEP_PAGES.index(CalibrationPage)
    window.go(0)
    assert window.current == 0
    window.page(ModelPage).load(str(tiny_qwen))
    window.go(STEP_PAGES.index(QuantizePage))
    assert quantize.jobs.running and quantize.settings_label.text() == started_with  # the running job's plan
    assert "next run" in quantize.next_note.text() and quantize.next_note.isVisible()
    wait_for_jobs(qtbot)
    made = window.session.record
    assert made is not None and made.settings.method == "rtn" and made.model.model_type == "llama", quantize.result.text()
    assert load_run(made.run_dir).settings.method == "rtn"
    # Afterwards the plan shows the new choices, and the next run takes them.
    assert window.session.model.info.model_type == "qwen2" and window.session.settings.method == "hqq"
    assert "HQQ" in quantize.settings_label.text() and not quantize.next_note.isVisible()
    quantize.start()
    wait_for_jobs(qtbot)
    second = window.session.record
    assert second.run_dir != made.run_dir and second.settings.method == "hqq" and second.model.model_type == "qwen2"


def test_cancel_a_running_quantize_leaves_nothing(window, qtbot, tiny_llama, runs_dir):
    open_model(window, qtbot, tiny_llama)
    use_rtn(window)
    window.go(STEP_PAGES.index(QuantizePage))
    quantize = window.page(QuantizePage)
    # The status bar's percentage is the progress bar's, read at the same moment (not a second rounding).
    shown = []
    quantize.status.connect(lambda message: shown.append((message, quantize.overall.text())))
    job = quantize.start()
    qtbot.waitUntil(lambda: "export" in quantize.rows, timeout=JOB_TIMEOUT_MS)
    assert shown and all(message.startswith(f"Quantizing: {bar}.") for message, bar in shown if "%" in message)
    with qtbot.waitSignal(job.signals.cancelled, timeout=JOB_TIMEOUT_MS):
        qtbot.mouseClick(quantize.cancel_button, Qt.MouseButton.LeftButton)
    wait_for_jobs(qtbot)
    assert leftovers(runs_dir) == []
    assert "Cancelled" in quantize.result.text()
    # The graph builder may have finished the export before the click: no row is left running.
    assert quantize.rows and all(row.state in ("done", "stopped") for row in quantize.rows.values())
    assert quantize.start_button.isEnabled() and window.unavailable(0) is None


def test_closing_during_a_job_asks_then_cancels(window, qtbot, tiny_llama, runs_dir, monkeypatch):
    asked = []

    def answer_yes(*args, **kwargs):
        asked.append(args)
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", answer_yes)
    open_model(window, qtbot, tiny_llama)
    use_rtn(window)
    window.go(STEP_PAGES.index(QuantizePage))
    quantize = window.page(QuantizePage)
    quantize.start()
    qtbot.waitUntil(lambda: "export" in quantize.rows, timeout=JOB_TIMEOUT_MS)
    assert not window.close()  # refused for now: the job is stopped first
    assert len(asked) == 1
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=JOB_TIMEOUT_MS)
    assert not jobs.running() and leftovers(runs_dir) == []


def test_closing_when_idle_does_not_ask(window, monkeypatch):
    monkeypatch.setattr(QMessageBox, "question", lambda *args, **kwargs: pytest.fail("asked"))
    assert window.close()


def test_a_folder_without_config_json_says_so(window, qtbot, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    page = open_model(window, qtbot, empty)
    assert page.problem.isVisible() and "config.json" in page.problem.text()
    assert window.session.model is None and not window.next_button.isEnabled()
    assert not window.findChildren(QMessageBox)  # a user's mistake is shown inline, not as a crash


def test_an_offline_hub_id_says_what_to_do(window, qtbot):
    page = open_model(window, qtbot, "someone/no-such-model")
    assert "offline" in page.problem.text() and "Open folder" in page.problem.text()


def test_a_binary_calibration_file_says_so(window, qtbot, tiny_llama, tmp_path):
    open_model(window, qtbot, tiny_llama)
    window.go(STEP_PAGES.index(CalibrationPage))
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    page = window.page(CalibrationPage)
    page.use_file(binary)
    wait_for_jobs(qtbot)
    assert page.problem.isVisible() and "binary" in page.problem.text()
    assert not window.next_button.isEnabled() and "cannot be used" in window.hint.text()
    window.go(STEP_PAGES.index(QuantizePage))
    start = window.page(QuantizePage).start_button
    assert not start.isEnabled() and "cannot be used" in start.toolTip()
    page.use_self_written()
    assert start.isEnabled()


def test_a_calibration_file_is_previewed(window, qtbot, tiny_llama, prose):
    open_model(window, qtbot, tiny_llama)
    window.go(STEP_PAGES.index(CalibrationPage))
    page = window.page(CalibrationPage)
    page.use_file(prose)
    wait_for_jobs(qtbot)
    assert page.preview_box.isVisible() and "12 samples" in page.summary.text() and "tokens" in page.summary.text()
    assert page.samples.count() == 3 and window.session.calibration == prose


def test_an_earlier_run_reopens_at_its_report_and_measures_speed(qtbot, finished_run, monkeypatch):
    window = MainWindow(finished_run.parent)
    qtbot.addWidget(window)
    window.show()
    assert window.runs.count() == 1
    window.runs.setCurrentRow(0)
    qtbot.mouseClick(window.open_run_button, Qt.MouseButton.LeftButton)
    assert window.session.run_dir == finished_run
    assert window.current == STEP_PAGES.index(ReportPage)
    report = window.page(ReportPage)
    assert "smaller on disk" in report.verdict.text()
    assert all(window.unavailable(i) is None for i in (4, 5, 6))

    assert not report.speed_table.isVisible()
    # The core's bench, shortened: one round of a few tokens per model.
    monkeypatch.setattr("ui.pages.report.bench_run", partial(bench_run, rounds=1, new_tokens=8, prompt_tokens=16))
    report.measure_speed()
    wait_for_jobs(qtbot)
    assert not report.problem.isVisible(), report.problem.text()
    assert report.speed_table.isVisible() and "as fast" in report.speed_figures["tokens_per_s"][2].text()
    window.close()


def test_export_builds_a_checked_bundle_and_opens_its_folder(qtbot, finished_run, tmp_path, monkeypatch):
    window, page = open_run_on(qtbot, finished_run, ExportPage)
    assert str(finished_run) in page.folder.text() and not page.open_bundle_button.isVisible()
    opened = []
    monkeypatch.setattr("ui.pages.export.open_path", opened.append)

    page.zip.setChecked(True)
    job = page.build(tmp_path / f"{finished_run.name}-bundle")
    assert job is not None and page.panel.isVisible() and page.blocker()
    assert page.build(tmp_path / "other") is None  # one bundle at a time
    wait_for_jobs(qtbot)
    assert not page.problem.isVisible(), page.problem.text()
    zipped = tmp_path / f"{finished_run.name}-bundle.zip"
    assert zipped.is_file() and str(zipped) in page.result.text() and "python run.py" in page.command.text()
    qtbot.mouseClick(page.open_bundle_button, Qt.MouseButton.LeftButton)
    assert opened == [tmp_path]

    page.zip.setChecked(False)
    page.target.setCurrentIndex(page.target.findData("triton"))
    page.build(tmp_path / f"{finished_run.name}-triton")
    wait_for_jobs(qtbot)
    repository = tmp_path / f"{finished_run.name}-triton"
    assert (repository / "manifest.json").is_file() and "tritonserver" in page.command.text()
    qtbot.mouseClick(page.open_bundle_button, Qt.MouseButton.LeftButton)
    assert opened[-1] == repository

    (tmp_path / "a-file").write_text("not a folder")
    page.build(tmp_path / "a-file" / "bundle")
    wait_for_jobs(qtbot)
    assert page.problem.isVisible() and "Cannot write" in page.problem.text()
    assert not page.open_bundle_button.isVisible() and page.blocker() is None
    window.close()


def test_a_damaged_run_is_refused_with_a_message(window, runs_dir):
    damaged = runs_dir / "damaged"
    damaged.mkdir(parents=True)
    (damaged / "run.json").write_text("{not json", encoding="utf-8")
    window.refresh_runs()
    window.open_run(damaged)
    boxes = window.findChildren(QMessageBox)
    assert boxes and "damaged" in boxes[0].text()
    assert window.session.run_dir is None


def test_work_in_progress_is_not_listed(tmp_path):
    (tmp_path / ".run.partial-x").mkdir()
    (tmp_path / ".run.partial-x" / "run.json").write_text("{}")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "run.json").write_text("{}")
    assert list_runs(tmp_path) == [tmp_path / "done"]


def test_the_runs_list_shows_each_title_whole(qtbot, finished_run, tmp_path):
    """Each earlier run's lines wrap where they are painted (inside the style's padding): none is cut to "…"."""
    window = MainWindow(tmp_path / "none-yet")
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    view = window.runs
    text_margin = view.style().pixelMetric(QStyle.PixelMetric.PM_FocusFrameHMargin, None, view) + 1
    room = view.viewport().width() - 2 * RUN_ITEM_PADDING_X - 2 * text_margin  # where the text is painted
    # A name just too wide for that room but not for the whole row: the case that was cut.
    name = "x"
    while view.fontMetrics().horizontalAdvance(name) <= room:
        name += " x"
    assert view.fontMetrics().horizontalAdvance(name) < room + 2 * RUN_ITEM_PADDING_X
    (tmp_path / "runs" / name).mkdir(parents=True)
    shutil.copy(finished_run / "run.json", tmp_path / "runs" / name / "run.json")
    window.session.set_runs_dir(tmp_path / "runs")
    qtbot.waitUntil(lambda: view.count() == 1 and view.item(0).text().startswith(name))
    item = view.item(0)
    shown = view.visualItemRect(item).intersected(view.viewport().rect())
    lines = view.fontMetrics().boundingRect(QRect(0, 0, room, 10**5), Qt.TextFlag.TextWordWrap, item.text())
    assert shown.height() >= lines.height(), (item.text(), shown, lines)
    window.close()


def counting(n, *, progress, cancelled):
    for i in range(n):
        check(cancelled)
        progress(i / n, f"count: {i}")
        time.sleep(0.001)
    return n


def test_the_job_runner_reports_every_outcome(qtbot):
    job = Job(counting, 200)
    seen = []
    job.signals.progress.connect(lambda event: seen.append(event.message))
    with qtbot.waitSignal(job.signals.finished, timeout=10_000) as result:
        job.start()
    assert result.args == [200] and 0 < len(seen) < 200  # progress is thinned out, not flooded

    def fail_plainly(*, progress, cancelled):
        raise WorkbenchError("The file is missing; choose another.")

    job = Job(fail_plainly)
    with qtbot.waitSignal(job.signals.failed, timeout=10_000) as failure:
        job.start()
    assert failure.args == ["The file is missing; choose another.", ""]

    def crash(*, progress, cancelled):
        raise ValueError("boom")

    job = Job(crash)
    with qtbot.waitSignal(job.signals.failed, timeout=10_000) as failure:
        job.start()
    assert "boom" in failure.args[0] and "Traceback" in failure.args[1]

    job = Job(counting, 10**6)
    with qtbot.waitSignal(job.signals.cancelled, timeout=10_000):
        job.start()
        job.cancel()
    qtbot.waitUntil(lambda: not jobs.running())


def test_garbage_is_collected_in_the_gui_thread_while_jobs_run(qtbot):
    """A collection started by a worker thread could free Qt objects outside the GUI thread, which crashes Qt:
    while a job runs, every collection happens in the GUI thread, and afterwards collection is automatic again."""
    collected_in = []

    def record(phase, info):
        if phase == "start":
            collected_in.append(threading.current_thread())

    def make_cycles(*, progress, cancelled):
        for _ in range(5 * gc.get_threshold()[0]):  # enough for several automatic collections
            cycle = []
            cycle.append(cycle)
        time.sleep(3 * jobs.COLLECT_INTERVAL_MS / 1000)  # the GUI thread's timer comes round meanwhile

    assert gc.isenabled()
    gc.callbacks.append(record)
    try:
        job = Job(make_cycles)
        with qtbot.waitSignal(job.signals.finished, timeout=10_000):
            job.start()
            assert not gc.isenabled()
        qtbot.waitUntil(lambda: not jobs.running())
    finally:
        gc.callbacks.remove(record)
    assert collected_in and set(collected_in) == {threading.main_thread()}
    assert gc.isenabled()


def test_an_unexpected_error_hides_its_traceback_behind_details(window, qtbot, tiny_llama, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("unexpected")

    monkeypatch.setattr("ui.pages.model.resolve", broken)
    page = open_model(window, qtbot, tiny_llama)
    assert "unexpected" in page.problem.text() and "Traceback" not in page.problem.text()
    box = next(b for b in window.findChildren(QMessageBox) if b.objectName() == "errorDialog")
    assert "Traceback" not in box.text() and "Traceback" in box.detailedText()


def test_a_prompt_file_fills_a_table_that_saves_as_csv_and_markdown(qtbot, finished_run, tmp_path):
    window, page = open_run_on(qtbot, finished_run, ComparePage)
    qtbot.waitUntil(lambda: "CUDA" in page.provider_note.text(), timeout=JOB_TIMEOUT_MS)
    cuda = page.provider.model().item(1)
    assert cuda.isEnabled() or cuda.toolTip().startswith("Not available")

    page.schema.setPlainText("{not json")
    assert page.ask("Hello") is None and "not valid JSON" in page.problem.text()
    page.schema.setPlainText("")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, who are you?\nCount to three.\n", encoding="utf-8")
    page.max_tokens.setValue(6)
    page.run_file(prompts)
    wait_for_jobs(qtbot)
    assert page.suite.isVisible() and page.table.rowCount() == 3  # two prompts and their average
    assert page.table.item(2, 1).text() == "average"
    page.save_table(tmp_path / "table.csv")
    page.save_table(tmp_path / "table.md")
    assert (tmp_path / "table.csv").read_text().startswith("#,prompt,")
    assert "| average |" in (tmp_path / "table.md").read_text()
    window.close()


def test_export_serves_the_bundle_and_stops_it(qtbot, finished_run, tmp_path):
    import json
    import urllib.request

    window, page = open_run_on(qtbot, finished_run, ExportPage)
    page.build(tmp_path)
    wait_for_jobs(qtbot)
    assert page.serve_button.isVisible()
    qtbot.mouseClick(page.serve_button, Qt.MouseButton.LeftButton)
    wait_for_jobs(qtbot)
    server = page.server
    assert server is not None and server.url in page.serving.text() and "curl " in page.serving.text(), page.problem.text()
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"
    qtbot.mouseClick(page.serve_button, Qt.MouseButton.LeftButton)
    assert page.server is None and server.process.poll() is not None and not page.serving.isVisible()
    window.close()
