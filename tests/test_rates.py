"""Times you can believe: stage rates learnt per machine, estimates before a run, determinate stage
bars and a remaining time from those rates while a run goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ui import jobs
from ui.main_window import STEP_PAGES, MainWindow
from ui.pages.calibration import CalibrationPage
from ui.pages.model import ModelPage
from ui.pages.quantize import QuantizePage
from ui.pages.settings import SettingsPage
from workbench.durations import rough_duration
from workbench.run import rates
from workbench.run.pipeline import estimate_run, plan_run, quantize_run
from workbench.run.rates import RunShape
from workbench.settings import PRESETS, QuantSettings
from workbench.sources import resolve

from gguf_files import write_llama_gguf

RTN = QuantSettings(method="rtn")
JOB_TIMEOUT_MS = 180_000


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A machine that has not timed any run yet."""
    monkeypatch.setenv("INT4_WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_finished_run_teaches_the_rates_its_estimates_use(own_cache, tiny_llama, tmp_path):
    model = resolve(str(tiny_llama))
    shape = RunShape(RTN)  # the graph builder writes the tiny Llama
    before = estimate_run(model, RTN, opens_model=True)
    assert before.basis.startswith("a rough estimate") and before.seconds == pytest.approx(
        sum(rates.DEFAULT_RATES[shape.key(name)] for name in before.stages) * model.info.parameters / 1e9
        + rates.DEFAULT_REST_S["rest:command"])
    record = quantize_run(str(tiny_llama), tmp_path / "run", RTN)
    known = rates.measured_rates()
    parameters = record.model.parameters
    size = rates.size_class(parameters)
    assert set(record.timings_s) == set(before.stages)  # the estimate counted the stages that ran, no others
    for stage, seconds in record.timings_s.items():
        assert known[f"{shape.key(stage)}@{size}"] == {"seconds_per_billion": pytest.approx(seconds / parameters * 1e9, rel=1e-3),
                                           "runs": 1}
    after = estimate_run(model, RTN, opens_model=True)
    assert after.basis == "an estimate from the runs made on this machine (1 so far), for a model of this size"
    assert after.seconds == pytest.approx(sum(record.timings_s.values()) + known["rest:command"]["seconds"], rel=1e-3)
    # The app's Quantize step has the model open already: no time for opening it.
    assert "model" not in estimate_run(model, RTN).stages


def test_rates_from_a_model_of_another_size_serve_only_until_this_size_is_timed(own_cache, tiny_llama):
    model = resolve(str(tiny_llama))
    shape, tiny = RunShape(RTN), model.info.parameters
    rates.remember({"int4": 50.0}, 8 * 10**9, shape)  # an 8B model: its fixed costs spread thin
    plan = estimate_run(model, RTN)
    assert plan.stages["int4"] == pytest.approx(50.0 / 8 * tiny / 1e9) and "another size" not in plan.basis
    rates.remember({"export": 1.0, "int4": 2.0, "measure": 3.0}, tiny, shape)
    assert estimate_run(model, RTN).stages["int4"] == pytest.approx(2.0)  # its own size wins
    rates.remember({"int4": 1.0}, 10**9, shape)  # a 1B model: for 4B the 8B one is nearer
    assert estimate_run(resolve(str(tiny_llama)), RTN).stages["int4"] == pytest.approx(2.0)
    bigger = rates.estimate(4 * 10**9, shape, ["export", "int4", "measure"])
    assert bigger.stages["int4"] == pytest.approx(50.0 / 8 * 4)  # 8B is the nearest timed size to 4B
    assert "scaled from models of another size" in bigger.basis


def test_a_remembered_rate_changes_the_next_estimate(own_cache, tiny_llama):
    model = resolve(str(tiny_llama))
    shape = RunShape(RTN)
    rates.remember({"int4": 10.0}, 10**9, shape)
    assert estimate_run(model, RTN).stages["int4"] == pytest.approx(10.0 * model.info.parameters / 1e9)
    # A step that became five times faster (a new version, a quieter machine): one run is enough.
    rates.remember({"int4": 2.0}, 10**9, shape)
    assert estimate_run(model, RTN).stages["int4"] == pytest.approx(2.0 * model.info.parameters / 1e9)
    # A run a little off the remembered rate is noise: it moves the estimate half-way.
    rates.remember({"int4": 2.5}, 10**9, shape)
    assert rates.measured_rates()["int4:built@0"] == {"seconds_per_billion": 2.25, "runs": 3}


def test_each_way_of_running_a_stage_is_timed_apart():
    gptq = QuantSettings(method="gptq")
    built, exported = RunShape(gptq), RunShape(gptq, built=False)
    assert built.key("export") != exported.key("export") and built.key("gptq") != exported.key("gptq")
    assert built.key("measure") == exported.key("measure") != RunShape(gptq, original=False).key("measure")
    assert RunShape(gptq, original=False).key("export") is None  # the builder writes no original then
    # Data-free calibration and a calibration file are timed apart, per token of text.
    assert built.key("calibration") != RunShape(gptq, Path("text.txt")).key("calibration")
    longer = RunShape(QuantSettings(method="gptq", calibration_samples=64))
    assert longer.work("calibration") == 2 * built.work("calibration") == longer.work("gptq") != longer.work("int4")
    # ... and text written by the float model (the export path) apart from text written by a round-to-nearest copy.
    assert built.key("calibration") != exported.key("calibration")


def test_the_estimate_times_the_writer_the_run_will_use(own_cache, tiny_llama):
    """On the graph builder's path a round-to-nearest copy on ONNX Runtime writes data-free calibration text
    (memory.calibration_writer), 3.8x faster than the float model in PyTorch at 1B; the export path, for
    architectures the builder does not know, has the float model write it."""
    model, balanced = resolve(str(tiny_llama)), PRESETS["balanced"].settings
    written = balanced.for_model(model.info.parameters, reads_file=False)  # a tiny model writes 128 samples
    assert written.calibration_samples == 128
    work = written.calibration_token_count / rates.CALIBRATION_TOKENS * model.info.parameters / 1e9
    copied = estimate_run(model, balanced).stages["calibration"]
    assert copied == pytest.approx(rates.DEFAULT_RATES["calibration:copy"] * work)
    exported = rates.estimate(model.info.parameters, RunShape(written, built=False), ["calibration"])
    assert exported.stages["calibration"] == pytest.approx(rates.DEFAULT_RATES["calibration:written"] * work)
    assert copied < exported.stages["calibration"]


def test_a_conversion_on_first_use_does_not_teach_the_model_stage(own_cache, tiny_llama, tmp_path):
    gguf_file = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    quantize_run(str(gguf_file), tmp_path / "first", RTN)  # converts the GGUF file to a folder, then quantizes
    size = rates.size_class(resolve(str(gguf_file)).info.parameters)
    assert f"model@{size}" not in rates.measured_rates() and f"int4:built@{size}" in rates.measured_rates()
    quantize_run(str(gguf_file), tmp_path / "second", RTN)  # converted already: opening it is what is timed
    assert rates.measured_rates()[f"model@{size}"]["runs"] == 1


def test_remaining_time_follows_the_rates_then_the_stage_pace():
    plan = rates.Estimate({"a": 100.0, "b": 300.0})
    assert plan.stage_fraction("a", 0.125) == pytest.approx(0.5) and plan.stage_fraction("b", 0.625) == pytest.approx(0.5)
    assert plan.remaining([], "a", 0.0, 0.0) == 400.0
    assert plan.remaining([], "a", 0.05, 30.0) == pytest.approx(370.0)  # too early for its own pace
    assert plan.remaining(["a"], "b", 0.5, 60.0) == pytest.approx(60.0)  # half done in 60 s: 60 s more


def test_info_json_estimates_every_preset(own_cache, tiny_llama):
    done = subprocess.run([sys.executable, "-m", "workbench.cli", "info", str(tiny_llama), "--json", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert set(data["estimates"]) == set(PRESETS)
    model = resolve(str(tiny_llama))
    for name, figures in data["estimates"].items():  # the one estimate the app shows too (plan_run)
        plan = plan_run(model, PRESETS[name].settings, opens_model=True)
        assert figures["seconds"] == round(estimate_run(model, PRESETS[name].settings, opens_model=True).seconds)
        assert {key: figures[key] for key in ("shrink_ram_bytes", "run_int4_ram_bytes", "run_original_ram_bytes",
                                              "peak_ram_bytes", "path")} == \
            {key: plan.to_dict()[key] for key in ("shrink_ram_bytes", "run_int4_ram_bytes", "run_original_ram_bytes",
                                                  "peak_ram_bytes", "path")}
        assert "estimate" in figures["estimate"] and figures["peak_ram_bytes"] >= figures["run_int4_ram_bytes"]
        assert set(figures["fit"]) == {"shrink", "run_int4", "run_original"}


def test_the_self_written_text_time_says_here_only_once_this_machine_timed_it(own_cache, qtbot, tiny_llama, tmp_path):
    window = MainWindow(tmp_path / "runs")
    qtbot.addWidget(window)
    window.show()
    window.page(ModelPage).load(str(tiny_llama))
    qtbot.waitUntil(lambda: not jobs.running() and window.session.model is not None, timeout=JOB_TIMEOUT_MS)
    option = window.page(CalibrationPage).self_written
    assert "on a typical two-core computer" in option.text() and " here" not in option.text()
    balanced = PRESETS["balanced"].settings
    rates.remember({"calibration": 600.0}, window.session.model.info.parameters, RunShape(balanced))
    window.page(SettingsPage).choose("smallest")  # any change of settings shows the time again
    window.page(SettingsPage).choose("balanced")
    writing = rough_duration(estimate_run(window.session.model, balanced).stages["calibration"])
    assert option.text() == f"Let the model write its own (no file needed; takes {writing} here)"
    window.close()


def test_stage_bars_fill_and_the_time_left_comes_from_the_rates(own_cache, qtbot, tiny_llama, tmp_path):
    # This machine is said to export at a day per million parameters: the tiny model's export
    # alone is then expected to take hours, which only the rates can tell.
    rates.remember({"export": 86400.0}, 10**6, RunShape(QuantSettings(method="awq"), built=False))
    window = MainWindow(tmp_path / "runs")
    qtbot.addWidget(window)
    window.show()
    window.page(ModelPage).load(str(tiny_llama))
    qtbot.waitUntil(lambda: not jobs.running() and window.session.model is not None, timeout=JOB_TIMEOUT_MS)
    balanced = estimate_run(window.session.model, PRESETS["balanced"].settings)
    assert f"Balanced: {rough_duration(balanced.seconds)}" in window.page(ModelPage).time.text()
    writing = rough_duration(balanced.stages["calibration"])  # not timed here: a typical machine's rate
    assert f"takes {writing} on a typical two-core computer" in window.page(CalibrationPage).self_written.text()
    settings = window.page(SettingsPage)
    settings.advanced.set_open(True)
    # AWQ takes the optimum export, which reports its progress for a while even on the tiny model
    # (the graph builder of RTN writes it in a blink).
    settings.method.setCurrentIndex(settings.method.findData("awq"))
    window.go(STEP_PAGES.index(QuantizePage))
    page = window.page(QuantizePage)
    plan = estimate_run(window.session.model, window.session.settings)
    assert plan.stages["export"] > 3600 and "partly from the runs made on this machine" in page.time_label.text()

    seen = []

    def look(_event):
        page._show_times()
        for name, row in page.rows.items():
            seen.append((name, row.bar.maximum(), row.bar.value(), page.times.text()))

    job = page.start()
    job.signals.progress.connect(look)
    qtbot.waitUntil(lambda: not jobs.running(), timeout=JOB_TIMEOUT_MS)
    assert window.session.run_dir is not None, page.result.text()
    exporting = [s for s in seen if s[0] == "export"]
    assert any(maximum == 1000 and 0 < value < 1000 for _, maximum, value, _ in exporting), exporting
    # Early in the export the time left is the export's expected hours, not a guess from the bar.
    assert any(" h " in text and "left" in text for *_, text in exporting[:3]), exporting[:3]
    window.close()
