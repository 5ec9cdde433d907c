"""report.md and memory.png of a run folder, regenerated whenever the run gains figures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.layout import CHART_FILE, REPORT_FILE, TUNE_CHART_FILE
from workbench.run.folders import load_run, save_run, write_failed
from workbench.run.memory import draw_memory_chart, pyplot
from workbench.run.record import RunRecord
from workbench.run.wording import part_words, render_report
from workbench.units import MIB


def write_report(run_dir: Path, record: RunRecord) -> None:
    try:
        draw_memory_chart(run_dir / CHART_FILE, *memory_chart(record))
        if record.tune is not None:
            draw_tune_chart(run_dir / TUNE_CHART_FILE, record.tune)
        (run_dir / REPORT_FILE).write_text(render_report(record), encoding="utf-8")
    except OSError as error:
        raise write_failed(error, Path(error.filename or run_dir)) from error


def memory_chart(record: RunRecord) -> tuple[dict, dict, str]:
    """memory.png's figures: disk (adding up to the measured files) and RAM per component of both models, and its title."""
    return (
        {"disk": part_words(record.original.disk_parts), "ram": part_words(record.original.ram_components)},
        {"disk": part_words(record.int4.disk_parts), "ram": part_words(record.int4.ram_components)},
        f"{record.source.name}: {record.size_ratio:.1f}x smaller on disk, "
        + (f"{record.ram_ratio:.1f}x less RAM" if record.ram_ratio else "original not run"),
    )


def draw_tune_chart(path: Path, tune: dict) -> None:
    """Size (x) against perplexity increase (y) of every tried candidate, the budget as a line."""
    plt = pyplot()
    tried = [c for c in tune["candidates"] if c["tried"]]
    # Numbered points, the long labels in a legend below: labels beside the points overlap and get cut.
    figure, axis = plt.subplots(figsize=(7.5, 4.4 + 0.22 * len(tried)), dpi=110)
    for number, candidate in enumerate(tried, 1):
        chosen = candidate["label"] == tune["chosen"]
        x, y = candidate["int4_bytes"] / MIB, candidate["perplexity_increase_pct"]
        axis.scatter([x], [y], s=90 if chosen else 40, zorder=3,
                     color="#c44e52" if chosen else ("#4c72b0" if candidate["within_budget"] else "#8c8c8c"),
                     label=f"{number}. {candidate['label']}" + (" (kept)" if chosen else ""))
        axis.annotate(str(number), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9,
                      fontweight="bold" if chosen else "normal")
    axis.axhline(tune["budget_pct"], color="#55a868", linestyle="--", label=f"budget: +{tune['budget_pct']:g} %")
    axis.set_xlabel("INT4 model size (MiB)")
    axis.set_ylabel(f"perplexity increase on {tune['text']} (%)")
    axis.set_title("Auto-tune: size against quality of each candidate", fontsize=11)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    axis.margins(x=0.15, y=0.2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def update_run(run_dir: Path, change: Callable[[RunRecord], RunRecord]) -> RunRecord:
    """Replace a run's record by `change(record)`, save run.json and regenerate the report; return the new record."""
    record = change(load_run(run_dir))
    save_run(run_dir, record)
    write_report(run_dir, record)
    return record
