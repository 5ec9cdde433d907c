"""One quantity, one number: a model's size on disk reads the same on every surface, in the one unit."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import open_run_on
from exporters.bundle.card import model_card
from exporters.bundle.layout import Layout
from ui.pages.report import ReportPage
from workbench.cli import main
from workbench.layout import REPORT_FILE
from workbench.run.folders import load_run
from workbench.run.memory import draw_memory_chart
from workbench.run.report import memory_chart
from workbench.run.wording import quantized_line
from workbench.units import format_size

ROOT = Path(__file__).resolve().parents[1]
# A size divided into a unit and printed with it, anywhere but the one formatter.
OWN_FORMATTING = re.compile(r"/\s*(?:2\s*\*\*\s*(?:10|20|30)|1e[369]|1_000(?:_000)*|[KMG]IB)\b[^}\n]*\}\s*(?:[KMG]i?B|bytes)")


def test_the_size_on_disk_reads_the_same_on_every_surface(tiny_run, tmp_path, qtbot):
    record = load_run(tiny_run)
    original, int4 = record.original, record.int4
    # The parts of each bar add up to the files as measured (tensors, then the graph and padding).
    assert sum(original.disk_parts.values()) == original.bytes and sum(int4.disk_parts.values()) == int4.bytes
    sizes = format_size(original.bytes), format_size(int4.bytes)

    assert f"{sizes[0]} -> {sizes[1]}" in quantized_line(record)  # the CLI's line after quantize
    assert main(["report", str(tiny_run), "-q"]) == 0  # the CLI regenerates report.md and memory.png
    report = (tiny_run / REPORT_FILE).read_text()
    assert f"| model on disk | {sizes[0]} | {sizes[1]} |" in report
    assert draw_memory_chart(tmp_path / "memory.png", *memory_chart(record))[:2] == list(sizes)
    card = model_card(record, Layout.for_target("runner", "model"), {"written": False, "reason": "not asked for"})
    assert f"On disk: {sizes[0]} → {sizes[1]}" in card
    window, page = open_run_on(qtbot, tiny_run, ReportPage)
    assert tuple(label.text() for label in page.figures["disk"][:2]) == sizes


def test_no_surface_formats_a_size_on_its_own():
    offenders = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for folder in ("workbench", "ui", "exporters", "benchmarks")
                 for path in sorted((ROOT / folder).rglob("*.py")) if path.name != "units.py"
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if OWN_FORMATTING.search(line)]
    assert not offenders, "format sizes with workbench.units.format_size:\n" + "\n".join(offenders)
    assert OWN_FORMATTING.search('f"{needed / 2**30:.1f} GiB"') and OWN_FORMATTING.search('f"{b / 1e6:.1f} MB"')
