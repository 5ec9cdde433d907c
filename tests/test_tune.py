"""Auto-tune on a tiny model trained on the test text, so that 4 bits reliably cost perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PROSE, cli, leftovers, open_model, wait_for_jobs
from models import build_model
from workbench.errors import JobCancelled, WorkbenchError
from workbench.run.folders import load_run
from workbench.settings import QuantSettings
from workbench.run.tune import tune_run

SMALL = dict(method="rtn", symmetric=False, calibration_samples=4, calibration_tokens=32)
CANDIDATES = (
    QuantSettings(block_size=64, **SMALL),
    QuantSettings(block_size=32, **SMALL),
    QuantSettings(block_size=32, sensitive_8bit_pct=40, **SMALL),
    QuantSettings(block_size=16, eight_bit=("*.mlp.*",), **SMALL),
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny llama fitted to PROSE: at a minimum of its loss, any rounding raises perplexity."""
    path = build_model(tmp_path_factory.mktemp("tune") / "model", "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor(tokenizer(PROSE)["input_ids"][:2048]).reshape(16, 128)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return path


def test_impossible_budget_keeps_the_best_then_a_budget_keeps_the_smallest_within(trained, tmp_path, prose):
    record = tune_run(str(trained), tmp_path / "none", 0.0, text=prose, candidates=CANDIDATES, tokens=1024)
    tune = record.tune
    tried = tune["candidates"]
    assert all(c["tried"] and not c["within_budget"] for c in tried) and tune["within_budget"] is False
    best = min(tried, key=lambda c: c["perplexity_increase_pct"])
    assert tune["chosen"] == best["label"] and tune["explanation"].startswith("No candidate stayed within 0 %")
    assert [c["estimated_bytes"] for c in tried] == sorted(c["estimated_bytes"] for c in tried)
    assert record.quality[0].perplexity_increase_pct == best["perplexity_increase_pct"]
    sensitive = next(c for c in tried if c["settings"]["sensitive_8bit_pct"])
    assert sensitive["eight_bit_layers"]
    assert load_run(tmp_path / "none").tune == tune
    for name in ("tune.png", "memory.png", "report.md", "int4/model.onnx"):
        assert (tmp_path / "none" / name).is_file(), name
    assert "## Auto-tune" in (tmp_path / "none" / "report.md").read_text()

    # A budget between the figures: the first candidate by size that meets it is kept, the rest not needed.
    budget = sorted(c["perplexity_increase_pct"] for c in tried)[1]
    record = tune_run(str(trained), tmp_path / "some", budget, text=prose, candidates=CANDIDATES, tokens=1024)
    tune = record.tune
    meeting = [c for c in tried if c["perplexity_increase_pct"] <= budget]
    assert tune["within_budget"] and tune["chosen"] == meeting[0]["label"]
    position = [c["label"] for c in tune["candidates"]].index(tune["chosen"])
    assert all(c["tried"] and not c["within_budget"] for c in tune["candidates"][:position])
    assert not any(c["tried"] for c in tune["candidates"][position + 1:])
    assert "the smallest of 4 candidates" in tune["explanation"]
    assert leftovers(tmp_path) == []


def test_cli_tune_json_and_bad_inputs(trained, tmp_path, prose):
    run_dir = tmp_path / "run"
    result = cli("tune", str(trained), "--max-quality-loss", "1000", "--text", str(prose), "--tokens", "512",
                 "-o", str(run_dir), "--json", "-q")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["within_budget"] and data["run_dir"] == str(run_dir.absolute())
    assert data["candidates"][0]["tried"] and data["chosen"] == data["candidates"][0]["label"]
    assert all(not c["tried"] for c in data["candidates"][1:])
    assert cli("report", str(run_dir), "-q").returncode == 0

    for args, message in (
        (["--max-quality-loss", "5", "-o", str(tmp_path / "a")], "--text FILE"),
        (["--max-quality-loss", "-1", "--text", str(prose), "-o", str(tmp_path / "b")], "0 % or more"),
        (["--max-quality-loss", "5", "--text", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "c")],
         "does not exist"),
        (["--max-quality-loss", "5", "--text", str(prose), "-o", str(run_dir)], "already exists"),
    ):
        result = cli("tune", str(trained), *args, "-q")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cancel_during_a_candidate_leaves_nothing(trained, tmp_path, prose):
    seen = []

    def cancelled():
        return any(m.startswith("candidate 2:") for m in seen)

    with pytest.raises(JobCancelled):
        tune_run(str(trained), tmp_path / "run", 0.0, text=prose, candidates=CANDIDATES, tokens=256,
                 progress=lambda f, m: seen.append(m), cancelled=cancelled)
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def test_too_short_a_text_is_refused_before_the_export(trained, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(WorkbenchError, match="only"):
        tune_run(str(trained), tmp_path / "run", 5.0, text=short, candidates=CANDIDATES)
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def test_the_report_step_shows_the_tune_chart(qtbot, trained, tmp_path, prose):
    from PySide6.QtCore import Qt

    from ui.main_window import STEP_PAGES, MainWindow
    from ui.pages.report import ReportPage

    tune_run(str(trained), tmp_path / "runs" / "tuned", 1000.0, text=prose, candidates=CANDIDATES, tokens=256)
    window = MainWindow(tmp_path / "runs")
    qtbot.addWidget(window)
    window.show()
    window.runs.setCurrentRow(0)
    qtbot.mouseClick(window.open_run_button, Qt.MouseButton.LeftButton)
    assert window.current == STEP_PAGES.index(ReportPage)
    report = window.page(ReportPage)
    assert report.tune.isVisible() and report.tune_note.text().startswith("Kept RTN, blocks of 64")
    assert report.tune_chart.pixmap() is not None and not report.tune_chart.pixmap().isNull()
    assert report.quality.rowCount() == 1  # the chosen candidate's quality on the tune text
    window.close()


def test_the_wizard_runs_auto_tune(qtbot, trained, tmp_path, prose):
    from ui.main_window import STEP_PAGES, MainWindow
    from ui.pages.quantize import QuantizePage
    from ui.pages.settings import SettingsPage
    from workbench.run.tune import CANDIDATES as DEFAULT_CANDIDATES, candidate_label

    window = MainWindow(tmp_path / "runs")
    qtbot.addWidget(window)
    window.show()
    open_model(window, qtbot, trained)
    window.go(STEP_PAGES.index(SettingsPage))
    settings = window.page(SettingsPage)
    settings.tune.setChecked(True)
    assert "Choose a text" in settings.blocker() and not window.next_button.isEnabled()
    assert not any(card.isEnabled() for card in settings.cards.values()) and not settings.advanced.isEnabled()
    settings.use_tune_text(tmp_path / "missing.txt")
    assert "not found" in settings.tune_problem.text() and window.session.tune.text is None
    settings.use_tune_text(prose)
    settings.max_loss.setValue(100.0)  # every setting is good enough: the smallest is kept, alone tried
    assert settings.blocker() is None and window.session.tune.text == prose
    assert settings.estimate.text().startswith(f"Auto-tune tries {len(DEFAULT_CANDIDATES)} settings")

    window.go(STEP_PAGES.index(QuantizePage))
    quantize = window.page(QuantizePage)
    assert quantize.settings_label.text().startswith("Auto-tune") and "-tuned-" in quantize.name.text()
    assert quantize.start() is not None
    wait_for_jobs(qtbot)
    assert quantize.result.property("kind") != "problem", quantize.result.text()
    assert "candidate 1" in quantize.rows and quantize.rows["candidate 1"].title.text().startswith("Try setting 1")
    tune = window.session.record.tune
    assert tune["chosen"] == candidate_label(DEFAULT_CANDIDATES[0]) and tune["explanation"] in quantize.result.text()

    settings.tune.setChecked(False)  # back to one preset: its cards work again
    assert window.session.tune is None and all(card.isEnabled() for card in settings.cards.values())
    window.close()
