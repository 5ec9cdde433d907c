"""report.md and memory.png of a run folder, regenerated whenever the run gains figures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workbench.run.memory import draw_memory_chart, pyplot
from workbench.quality.verdict import quality_sentence, scale_words
from workbench.run.folders import INT4, ORIGINAL, load_run, save_run
from workbench.settings import PRESETS

REPORT_FILE = "report.md"
CHART_FILE = "memory.png"
TUNE_CHART_FILE = "tune.png"


def write_report(run_dir: Path, record: dict) -> None:
    draw_memory_chart(
        run_dir / CHART_FILE,
        {"disk": record[ORIGINAL]["components"], "ram": record[ORIGINAL]["ram_components"]},
        {"disk": record[INT4]["components"], "ram": record[INT4]["ram_components"]},
        f"{record['source']['name']}: {record['size_ratio']:.1f}x smaller on disk, "
        f"{record['ram_ratio']:.1f}x less RAM",
    )
    if "tune" in record:
        draw_tune_chart(run_dir / TUNE_CHART_FILE, record["tune"])
    (run_dir / REPORT_FILE).write_text(render_report(record), encoding="utf-8")


def draw_tune_chart(path: Path, tune: dict) -> None:
    """Size (x) against perplexity increase (y) of every tried candidate, the budget as a line."""
    plt = pyplot()
    tried = [c for c in tune["candidates"] if c["tried"]]
    # Numbered points, the long labels in a legend below: labels beside the points overlap and get cut.
    figure, axis = plt.subplots(figsize=(7.5, 4.4 + 0.22 * len(tried)), dpi=110)
    for number, candidate in enumerate(tried, 1):
        chosen = candidate["label"] == tune["chosen"]
        x, y = candidate["int4_bytes"] / 1e6, candidate["perplexity_increase_pct"]
        axis.scatter([x], [y], s=90 if chosen else 40, zorder=3,
                     color="#c44e52" if chosen else ("#4c72b0" if candidate["within_budget"] else "#8c8c8c"),
                     label=f"{number}. {candidate['label']}" + (" (kept)" if chosen else ""))
        axis.annotate(str(number), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9,
                      fontweight="bold" if chosen else "normal")
    axis.axhline(tune["budget_pct"], color="#55a868", linestyle="--", label=f"budget: +{tune['budget_pct']:g} %")
    axis.set_xlabel("INT4 model size (MB)")
    axis.set_ylabel(f"perplexity increase on {tune['text']} (%)")
    axis.set_title("Auto-tune: size against quality of each candidate", fontsize=11)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    axis.margins(x=0.15, y=0.2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def update_run(run_dir: Path, change: Callable[[dict], None]) -> dict:
    """Apply `change` to a run's record, save run.json and regenerate the report; return the record."""
    record = load_run(run_dir)
    change(record)
    save_run(run_dir, record)
    write_report(run_dir, record)
    return record


def _mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def verdict(record: dict) -> str:
    """One plain sentence on what was saved and what it cost, on the one verdict scale."""
    saved = f"The INT4 model is {record['size_ratio']:.1f}x smaller on disk and needs {record['ram_ratio']:.1f}x less RAM"
    speed = record.get("speed")
    if speed:
        saved += f", and writes {speed['speedup']:.1f}x as fast"
    if not record["quality"]:
        return saved + "; its quality is not measured yet: measure it on a text of yours."
    quality = record["quality"][-1]
    preset = PRESETS.get(record.get("preset") or "")
    # The preset's benchmark speaks for this run only if the run kept the preset's settings.
    benchmark = preset.benchmark if preset and preset.settings.to_dict() == record["settings"] else None
    cost = quality_sentence(
        quality["perplexity_increase_pct"], quality["text"], quality["top1_agreement"] * 100, benchmark
    )
    return f"{saved}; {cost}."


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _sensitivity_lines(section: dict | None) -> list[str]:
    if not section:
        return []
    lines = [
        "",
        "## Layers kept at 8 bits by sensitivity",
        "",
        f"{section['measured']} Allowed: +{section['budget_pct']:g} % of the size "
        f"({_mib(section['budget_bytes'])}); used {_mib(section['extra_bytes'])}. Layers are taken by KL per "
        "extra byte, so small layers with a modest KL come before big ones.",
        "",
    ]
    lines += [
        f"- `{entry['layer']}`: changing only this layer to INT4 moved the next-token distribution by KL "
        f"{entry['kl']:.3g}, the {_ordinal(entry['rank'])} largest of {section['layers']}; 8 bits cost "
        f"{_mib(entry['extra_bytes'])} more."
        for entry in section["chosen"]
    ] or ["- none: no layer fitted in the allowed size."]
    return lines


def _tune_lines(tune: dict | None) -> list[str]:
    if not tune:
        return []
    lines = [
        "",
        "## Auto-tune",
        "",
        tune["explanation"],
        "",
        f"![size against quality]({TUNE_CHART_FILE})",
        "",
        f"Budget: perplexity +{tune['budget_pct']:g} % at most on {tune['text']} ({tune['tokens']:,} tokens).",
        "",
        "| candidate | size | smaller | perplexity | top-1 agreement | mean KL | time | result |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in tune["candidates"]:
        if not c["tried"]:
            lines.append(f"| {c['label']} | ~{c['estimated_bytes'] / 1e6:,.0f} MB (est.) | | | | | | not needed |")
            continue
        result = "kept" if c["label"] == tune["chosen"] else ("within budget" if c["within_budget"] else "over budget")
        lines.append(
            f"| {c['label']} | {c['int4_bytes'] / 1e6:,.1f} MB | {c['size_ratio']:.2f}x | "
            f"{c['perplexity_increase_pct']:+.1f} % | {c['top1_agreement'] * 100:.1f} % | {c['mean_kl']:.4f} | "
            f"{c['seconds']:.0f} s | {result} |"
        )
    return lines


def render_report(record: dict) -> str:
    settings = record["settings"]
    source = record["source"]
    original, int4 = record[ORIGINAL], record[INT4]
    lines = [
        f"# INT4 report: {source['name']}",
        "",
        verdict(record),
        "",
        "## Model",
        "",
        f"- Source: {source['kind']} `{source['spec']}`",
        f"- Architecture: {record['model']['architecture']}, {record['model']['parameters']:,} parameters, "
        f"{record['model']['layers']} layers, tied embeddings: {record['model']['tied_embeddings']}",
        "",
        "## Settings",
        "",
        f"- Preset: {record.get('preset') or 'custom'}; method {settings['method']}, block size "
        f"{settings['block_size']}, {'symmetric' if settings['symmetric'] else 'asymmetric'}, accuracy level "
        f"{settings['accuracy_level']}",
        f"- Embeddings quantized: {settings['quantize_embeddings']}; lm_head quantized: {settings['quantize_lm_head']}"
        f"{' (shares the embeddings tensor)' if record['shared_embeddings'] else ''}",
        f"- Kept at 8 bits: {', '.join(n for n, b in record['int4_layers'].items() if b == 8) or 'none'}",
        f"- Kept at fp32: {', '.join(n for n, b in record['int4_layers'].items() if b is None) or 'none'}",
        f"- Calibration: {record['calibration'] or 'not used'}",
        *_sensitivity_lines(record.get("sensitivity")),
        *_tune_lines(record.get("tune")),
        "",
        "## Memory",
        "",
        f"![memory]({CHART_FILE})",
        "",
        "| | original | INT4 |",
        "|---|---:|---:|",
        f"| model on disk | {_mib(original['bytes'])} | {_mib(int4['bytes'])} |",
    ]
    for component in original["components"]:
        lines.append(
            f"| &nbsp;&nbsp;{component} | {_mib(original['components'][component])} | "
            f"{_mib(int4['components'][component])} |"
        )
    lines += [
        f"| peak RAM (measured) | {_mib(original['peak_rss_bytes'])} | {_mib(int4['peak_rss_bytes'])} |",
        "",
        f"Size ratio {record['size_ratio']:.2f}x, {record['bits_per_weight']:.2f} bits per weight overall, "
        f"RAM ratio {record['ram_ratio']:.2f}x.",
        "",
        "## Quality",
        "",
    ]
    if record["quality"]:
        lines += [
            "| text | tokens | original ppl | INT4 ppl | increase | top-1 agreement | mean KL |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for q in record["quality"]:
            lines.append(
                f"| {q['text']} | {q['tokens']:,} | {q['original']['perplexity']:.2f} | {q['int4']['perplexity']:.2f} "
                f"| +{q['perplexity_increase_pct']:.1f} % | {q['top1_agreement'] * 100:.1f} % | {q['mean_kl']:.4f} |"
            )
        lines += ["", scale_words()]
    else:
        lines.append("Not measured yet: `int4-workbench evaluate RUN_DIR --text FILE`.")
    lines += ["", "## Speed", ""]
    speed = record.get("speed")
    if speed:
        lines += [
            f"On {speed['provider']}, {speed['new_tokens']} new tokens after a {speed['prompt_tokens']}-token "
            f"prompt, median of {speed['rounds']} alternating rounds:",
            "",
            "| | original | INT4 |",
            "|---|---:|---:|",
            f"| decode tokens/s | {speed[ORIGINAL]['tokens_per_s']:.1f} | {speed[INT4]['tokens_per_s']:.1f} |",
            f"| time to first token | {speed[ORIGINAL]['ttft_s']:.2f} s | {speed[INT4]['ttft_s']:.2f} s |",
            f"| peak RAM | {_mib(speed[ORIGINAL]['peak_rss_bytes'])} | {_mib(speed[INT4]['peak_rss_bytes'])} |",
            "",
            f"INT4 decodes {speed['speedup']:.2f}x as fast with {speed['memory_ratio']:.2f}x less peak RAM.",
        ]
    else:
        lines.append("Not measured yet: `int4-workbench bench RUN_DIR`.")
    lines += ["", "## Timings", ""]
    lines += [f"- {stage}: {seconds:.1f} s" for stage, seconds in record["timings_s"].items()]
    lines += ["", "## INT4 graph operators", ""]
    lines += [f"- {op}: {count}" for op, count in list(record["ops"].items())[:12]]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines += ["", f"Made {record['created']} with {versions}.", ""]
    return "\n".join(lines)
