"""One verdict scale: thresholds in plain words with the measured number, the same on every surface,
and a plain word where the user's text fares worse than the preset's benchmark."""

from __future__ import annotations


from exporters.bundle.card import model_card
from exporters.bundle.layout import Layout
from ui.pages.report import ReportPage
from conftest import open_run_on
from workbench.quality.verdict import SCALE, band, scale_words
from workbench.run.folders import load_run, save_run
from workbench.run.record import QualityResult, RunRecord, RunSource
from workbench.run.wording import render_report, verdict
from workbench.settings import PRESETS


def measured(record: RunRecord, increase: float, settings_of: str | None = None) -> RunRecord:
    quality = QualityResult(text="mine.txt", tokens=4000, window=512, original_perplexity=10.0,
                            int4_perplexity=10.0 * (1 + increase / 100), perplexity_increase_pct=increase,
                            top1_agreement=0.71, mean_kl=0.2)
    record = record.replace(quality=(quality,))
    return record.replace(settings=PRESETS[settings_of].settings) if settings_of else record


def test_the_scale_in_words():
    assert [band(x).words for x in (0, 8, 8.1, 15, 29.1, 30.1)] == [
        SCALE[0].words, SCALE[0].words, SCALE[1].words, SCALE[1].words, SCALE[2].words, SCALE[3].words]
    words = scale_words()
    for limit in ("+8\u00a0%", "+15\u00a0%", "+30\u00a0%"):
        assert limit in words


def test_a_rise_larger_than_the_benchmark_is_said_plainly(tiny_run):
    record = load_run(tiny_run)
    text = verdict(measured(record, 29.1, "balanced"))
    assert "noticeably less well" in text and "+29.1\u00a0%" in text and "normal" not in text
    assert "more than this preset's benchmark (+8.9\u00a0%" in text and "SmolLM2-135M" in text
    assert "another model and text" in text and "rounded to 4 bits" not in text
    # The demo is the benchmark's model with its weights rounded to 4 bits in its file: that is why, not the text.
    demo = verdict(measured(record.replace(source=RunSource("demo", "demo", "SmolLM2-135M-Instruct", "x")), 20.3,
                            "balanced"))
    assert "already rounded to 4 bits" in demo and "another model" not in demo
    # Its own settings (RTN) are not the preset's: no benchmark to compare with.
    assert "benchmark" not in verdict(measured(record, 29.1))
    assert "almost like the original" in verdict(measured(record, 4.0, "balanced"))
    assert "benchmark" not in verdict(measured(record, 4.0, "balanced"))


def test_every_surface_shows_the_same_verdict_and_scale(tiny_run, qtbot):
    record = measured(load_run(tiny_run), 29.1, "balanced")
    save_run(tiny_run, record)
    sentence = verdict(record)
    assert sentence in render_report(record) and scale_words() in render_report(record)
    card = model_card(record, Layout.for_target("runner", "model"), {"written": False, "reason": "not asked for"})
    assert sentence in card and scale_words() in card
    window, page = open_run_on(qtbot, tiny_run, ReportPage)
    assert page.verdict.text() == sentence and scale_words() in page.quality_note.text()


def test_preset_cards_say_what_was_measured_on_which_model():
    for preset in PRESETS.values():
        assert f"+{preset.benchmark.increase_pct:.1f}\u00a0%" in preset.quality_cost and "SmolLM2-135M" in preset.quality_cost
        assert band(preset.benchmark.increase_pct).words.capitalize() in preset.quality_cost
