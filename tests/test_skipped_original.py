"""A run without its fp32 original (`quantize --no-original`, the path an original too large to run here
takes too): every step works on the INT4 model alone and says why the original is missing.

The run is made for real on the tiny model; nothing is patched. The commands run as the CLI runs them,
the GUI's Compare and Report steps in a real offscreen window.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
from conftest import ask_on_compare, cli, open_run_on
from conftest import wait_for_jobs as wait

from workbench.generation.bench import bench_run
from workbench.layout import CHART_FILE, INT4, ORIGINAL, REPORT_FILE
from workbench.run.folders import load_run
from workbench.run.pipeline import NOT_ASKED, quantize_run
from workbench.settings import QuantSettings


@pytest.fixture(scope="module")
def alone_run(tiny_llama, tmp_path_factory):
    """A finished RTN run of the tiny model whose original was not kept, alone in its runs folder."""
    run = tmp_path_factory.mktemp("alone") / "run"
    quantize_run(str(tiny_llama), run, QuantSettings(method="rtn"), original=False)
    return run


def test_the_run_has_no_original_and_says_why(alone_run):
    record = load_run(alone_run)
    assert not (alone_run / ORIGINAL).exists() and (alone_run / INT4).is_dir()
    assert record.original.skipped == NOT_ASKED and record.original.peak_rss_bytes is None
    assert record.ram_ratio is None and record.int4.peak_rss_bytes > 0
    report = (alone_run / REPORT_FILE).read_text()
    assert NOT_ASKED in report and "too large" not in report
    assert (alone_run / CHART_FILE).stat().st_size > 0


def test_bench_evaluate_and_report_measure_the_int4_model_alone(alone_run, prose):
    done = cli("bench", str(alone_run), "--rounds", "1", "--new-tokens", "8", "--prompt-tokens", "16", "--json", "-q")
    assert done.returncode == 0, done.stderr
    speed = json.loads(done.stdout)
    assert speed["original"] is None and speed["speedup"] is None and speed["int4"]["tokens_per_s"] > 0
    done = cli("bench", str(alone_run), "--rounds", "1", "--new-tokens", "8", "--prompt-tokens", "16", "-q")
    assert done.returncode == 0 and "no original to compare with" in done.stdout, done.stderr

    done = cli("evaluate", str(alone_run), "--text", str(prose), "--max-tokens", "256", "-q")
    assert done.returncode == 0, done.stderr
    assert "INT4 perplexity" in done.stdout and "no original to compare with" in done.stdout
    quality = load_run(alone_run).quality[-1]
    assert not quality.compared and quality.int4_perplexity > 1 and quality.top1_agreement is None

    done = cli("report", str(alone_run), "--json", "-q")
    assert done.returncode == 0, done.stderr
    verdict = json.loads(done.stdout)["verdict"]
    assert "tokens per second" in verdict and "perplexity" in verdict and NOT_ASKED in verdict
    report = (alone_run / REPORT_FILE).read_text()
    assert "| decode tokens/s | not run |" in report and f"| {prose.name} | " in report
    assert "None" not in report


def test_compare_lets_the_int4_model_answer_alone(alone_run, tmp_path):
    table = tmp_path / "table.md"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nCount to three\n", encoding="utf-8")
    done = cli("compare", str(alone_run), "--prompts", str(prompts), "--max-new-tokens", "6", "--out", str(table), "-q")
    assert done.returncode == 0, done.stderr
    assert "INT4 model answered alone" in done.stdout and NOT_ASKED in done.stdout
    rows = table.read_text().splitlines()[2:]
    assert len(rows) == 3 and all(row.split("|")[3].strip() == "" for row in rows)  # the original's tokens: empty
    assert all(row.split("|")[4].strip() for row in rows)  # the INT4 model's: there

    done = cli("compare", str(alone_run), "--prompt", "Hello", "--max-new-tokens", "6", "--json", "-q")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["prompts"][0]
    assert row["original"] is None and row["agreement"] is None and "judgement" not in row
    assert row["int4"]["tokens"] == 6

    done = cli("compare", str(alone_run), "--prompt", "Hello", "--speculative", "-q")
    assert done.returncode != 0 and "needs the original model" in done.stderr and NOT_ASKED in done.stderr


def test_the_bundle_card_says_the_original_was_not_run(alone_run, tmp_path):
    done = cli("bundle", str(alone_run), "-o", str(tmp_path / "bundle"), "-q")
    assert done.returncode == 0, done.stderr
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert f"the original was not run: {NOT_ASKED}" in card and "None" not in card
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["metrics"]["memory"]["original_peak_rss_bytes"] is None


def test_the_compare_and_report_steps_show_the_int4_model_alone(qtbot, alone_run, monkeypatch):
    from ui.pages.compare import ComparePage
    from ui.pages.report import ReportPage

    window, page = open_run_on(qtbot, alone_run, ComparePage)
    assert page.run_button.text() == "Ask the 4-bit model"
    assert NOT_ASKED in page.columns[ORIGINAL].text.toPlainText()
    page.max_tokens.setValue(6)
    arrivals = ask_on_compare(qtbot, page, "Hello, who are you?")
    assert set(arrivals) == {INT4}
    assert "Hello, who are you?" in page.columns[INT4].text.toPlainText()
    assert page.columns[INT4].metrics["tokens"].text().startswith("6 tokens")
    assert NOT_ASKED in page.columns[ORIGINAL].text.toPlainText()
    assert "Only the 4-bit model answered" in page.agreement.text() and not page.judgement.isVisible()
    window.close()

    window, report = open_run_on(qtbot, alone_run, ReportPage)
    assert NOT_ASKED in report.verdict.text()
    assert report.figures["ram"][0].text() == "not run"
    monkeypatch.setattr("ui.pages.report.bench_run", partial(bench_run, rounds=1, new_tokens=8, prompt_tokens=16))
    report.measure_speed()
    wait(qtbot)
    assert not report.problem.isVisible(), report.problem.text()
    assert report.speed_figures["tokens_per_s"][0].text() == "not run"
    assert report.speed_figures["tokens_per_s"][1].text().endswith("tokens/s")
    window.close()
