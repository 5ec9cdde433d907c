"""Times you can believe: stage rates learnt per machine, estimates before a run, determinate stage
bars and a remaining time from those rates while a run goes on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ui import jobs
from ui.main_window import STEP_PAGES, MainWindow
from ui.pages.model import ModelPage
from ui.pages.quantize import QuantizePage
from ui.pages.settings import SettingsPage
from workbench.durations import rough_duration
from workbench.run import rates
from workbench.run.pipeline import estimate_run, quantize_run, run_stages
from workbench.settings import PRESETS, QuantSettings

RTN = QuantSettings(method="rtn")
JOB_TIMEOUT_MS = 180_000


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A machine that has not timed any run yet."""
    monkeypatch.setenv("INT4_WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_finished_run_teaches_the_rates_its_estimates_use(own_cache, tiny_llama, tmp_path):
    before = estimate_run(10**9, RTN)
    assert before.basis.startswith("a rough estimate") and before.seconds == pytest.approx(
        sum(rates.DEFAULT_RATES[stage.name] for stage, weight in run_stages(RTN) if weight))
    record = quantize_run(str(tiny_llama), tmp_path / "run", RTN)
    known = json.loads(rates.rates_path().read_text())["machines"][rates.machine_id()]
    parameters = record.model.parameters
    for stage, seconds in record.timings_s.items():
        assert known[stage] == {"seconds_per_billion": pytest.approx(seconds / parameters * 1e9, rel=1e-3), "runs": 1}
    after = estimate_run(parameters, RTN)
    assert after.basis == "an estimate from the runs made on this machine"
    assert after.seconds == pytest.approx(sum(record.timings_s.values()), rel=1e-3)
    # A second run counts half: the rate follows the machine as it is now.
    rates.remember({"int4": 4 * record.timings_s["int4"]}, parameters, RTN, None)
    assert rates.measured_rates()["int4"]["seconds_per_billion"] == pytest.approx(
        2.5 * record.timings_s["int4"] / parameters * 1e9, rel=1e-3)
    # Data-free calibration and a calibration file are timed apart.
    gptq = QuantSettings(method="gptq")
    assert rates.rate_key("calibration", gptq, None) != rates.rate_key("calibration", gptq, tmp_path / "text.txt")


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
    for name, figures in data["estimates"].items():
        assert figures["seconds"] == round(estimate_run(data["parameters"], PRESETS[name].settings).seconds)
        assert "estimate" in figures["estimate"] and figures["peak_ram_bytes"] >= data["ram_bytes"]["run_int4"]


def test_stage_bars_fill_and_the_time_left_comes_from_the_rates(own_cache, qtbot, tiny_llama, tmp_path):
    # This machine is said to export at a day per million parameters: the tiny model's export
    # alone is then expected to take hours, which only the rates can tell.
    rates.remember({"export": 86400.0}, 10**6, RTN, None)
    window = MainWindow(tmp_path / "runs")
    qtbot.addWidget(window)
    window.show()
    window.page(ModelPage).load(str(tiny_llama))
    qtbot.waitUntil(lambda: not jobs.running() and window.session.model is not None, timeout=JOB_TIMEOUT_MS)
    info = window.session.model.info
    balanced = estimate_run(info.parameters, PRESETS["balanced"].settings)
    assert f"Balanced: about {rough_duration(balanced.seconds)}" in window.page(ModelPage).time.text()
    settings = window.page(SettingsPage)
    settings.advanced.set_open(True)
    # AWQ takes the optimum export, which reports its progress for a while even on the tiny model
    # (the graph builder of RTN writes it in a blink).
    settings.method.setCurrentIndex(settings.method.findData("awq"))
    window.go(STEP_PAGES.index(QuantizePage))
    page = window.page(QuantizePage)
    plan = estimate_run(window.session.model.info.parameters, window.session.settings)
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
