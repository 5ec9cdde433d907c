"""The typed run record reads run.json files of schema version 1 as written before it existed.

tests/data/run_v1_*.json are literal run.json files written by the workbench before RunRecord
(a tiny llama: one with quality and speed measured, one with sensitive 8-bit layers). They must
keep opening, read back to the same JSON, and render in every place a run is put into words.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporters.bundle import Layout
from exporters.bundle.card import model_card
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.layout import REPORT_FILE, RUN_FILE
from workbench.run.folders import load_run, save_run
from workbench.run.record import RunRecord
from workbench.run.wording import figure_rows, render_report, verdict
from workbench.units import format_size

DATA = Path(__file__).parent / "data"
FIXTURES = sorted(DATA.glob("run_v1_*.json"))


def run_folder(tmp_path: Path, fixture: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(fixture, folder / RUN_FILE)
    return folder


def test_fixtures_are_found():
    assert {p.name for p in FIXTURES} >= {"run_v1_measured.json", "run_v1_sensitivity.json"}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_a_version_1_record_reads_and_saves_back_unchanged(tmp_path, fixture):
    folder = run_folder(tmp_path, fixture)
    record = load_run(folder)
    assert isinstance(record, RunRecord) and record.run_dir == str(folder.absolute())
    data = json.loads(fixture.read_text())
    assert record.to_dict() == data and list(record.to_dict()) == list(data)  # same keys, same order
    save_run(folder, record)
    assert json.loads((folder / RUN_FILE).read_text()) == data


def test_the_typed_fields_hold_the_file_figures():
    data = json.loads((DATA / "run_v1_measured.json").read_text())
    record = RunRecord.from_dict(data)
    assert record.int4.bytes == data["int4"]["bytes"] and record.original.components == data["original"]["components"]
    assert record.settings.method == data["settings"]["method"] and record.model.layers == data["model"]["layers"]
    assert record.quality[0].int4_perplexity == data["quality"][0]["int4"]["perplexity"]
    assert record.speed.speedup == data["speed"]["speedup"] and record.speed.machine == data["speed"]["machine"]
    assert RunRecord.from_dict({**data, "added_later": {"x": 1}}).to_dict()["added_later"] == {"x": 1}


def test_every_rendering_reads_an_old_record(tmp_path):
    record = load_run(run_folder(tmp_path, DATA / "run_v1_measured.json"))
    sentence = verdict(record)
    assert "smaller on disk" in sentence and record.quality[-1].text in sentence
    report = render_report(record)
    assert sentence in report and format_size(record.int4.bytes) in report and "## Speed" in report
    card = model_card(record, Layout.for_target("runner", "model-int4"), {"written": False, "reason": "not checked"})
    assert sentence in card and format_size(record.int4.bytes) in card
    assert figure_rows(record)["disk"][1] == format_size(record.int4.bytes)


def test_the_cli_report_regenerates_an_old_run(tmp_path, capsys):
    folder = run_folder(tmp_path, DATA / "run_v1_sensitivity.json")
    assert main(["report", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == verdict(load_run(folder))
    assert "## Layers kept at 8 bits by sensitivity" in (folder / REPORT_FILE).read_text()


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "is damaged"), ('{"schema_version": 2}', "has schema version 2"), ('{"schema_version": 1}', "lacks")],
)
def test_a_bad_run_file_is_refused_with_what_to_do(tmp_path, content, message):
    (tmp_path / RUN_FILE).write_text(content)
    with pytest.raises(WorkbenchError, match=message):
        load_run(tmp_path)


def test_format_size_uses_binary_units():
    assert [format_size(v) for v in (512, 40_000, 3 * 2**20 // 2, 5 * 2**30)] == [
        "512 bytes", "39 KiB", "1.5 MiB", "5.0 GiB"]
