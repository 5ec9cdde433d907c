"""A run record in words: the one place that says what a run saved and what it cost.

The CLI, report.md, a bundle's model card (README.md) and the app's Report step all take their
sentences, table rows and sizes from here, so a figure reads the same wherever it is shown.
"""

from __future__ import annotations

from workbench.layout import CHART_FILE, TUNE_CHART_FILE
from workbench.quality.verdict import quality_sentence, scale_words
from workbench.run.record import QualityResult, RunRecord, Speed
from workbench.settings import PRESETS
from workbench.sources import DEMO
from workbench.units import format_size

NOT_RUN = "not run"


def ram_text(value: int | None) -> str:
    """A measured peak RAM, or that the model was not run."""
    return format_size(value) if value is not None else NOT_RUN


def machine_text(machine: dict) -> str:
    return f"{machine['processor']}, {machine['cpu_count']} cores, {format_size(machine['ram_bytes'])} RAM"


def verdict(record: RunRecord) -> str:
    """One plain sentence on what was saved and what it cost, on the one verdict scale."""
    if record.original.skipped:
        return _alone_verdict(record)
    saved = f"The INT4 model is {record.size_ratio:.1f}x smaller on disk and needs {record.ram_ratio:.1f}x less RAM"
    if record.speed:
        saved += f", and writes {record.speed.speedup:.1f}x as fast"
    if not record.quality:
        return saved + "; its quality is not measured yet: measure it on a text of yours."
    quality = record.quality[-1]
    preset = PRESETS.get(record.preset or "")
    # The preset's benchmark speaks for this run only if the run kept the preset's settings.
    benchmark = preset.benchmark if preset and record.kept(preset.settings) else None
    cost = quality_sentence(quality.perplexity_increase_pct, quality.text, quality.top1_agreement * 100, benchmark,
                            rounded_before=record.source.kind == DEMO)
    return f"{saved}; {cost}."


def _alone_verdict(record: RunRecord) -> str:
    """The verdict of a run whose original was skipped: what the INT4 model measured by itself, and why
    nothing is compared."""
    lines = [f"The INT4 model is {record.size_ratio:.1f}x smaller on disk than the fp32 original would be "
             f"and needs {format_size(record.int4.peak_rss_bytes)} of RAM"]
    if record.speed:
        lines[0] += f", writing {record.speed.int4['tokens_per_s']:.1f} tokens per second"
    if record.quality:
        q = record.quality[-1]
        lines[0] += f"; its perplexity on {q.text} is {q.int4_perplexity:.2f}"
    lines.append(f"Nothing is compared with the original, which was not run here: {original_reason(record)}.")
    return ". ".join(lines)


def original_reason(record: RunRecord) -> str:
    """Why a run has no original (its `skipped` reason), for a sentence."""
    return record.original.skipped or ""


def quantized_line(record: RunRecord) -> str:
    """The CLI's one line after `quantize`."""
    return (
        f"{record.run_dir}: {format_size(record.original.bytes)} -> {format_size(record.int4.bytes)} "
        f"({record.size_ratio:.2f}x smaller, {record.bits_per_weight:.2f} bits/weight), "
        + (f"RAM {record.ram_ratio:.2f}x less; " if record.ram_ratio else "original not run; ") + "stages: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in record.timings_s.items())
    )


def tune_lines(record: RunRecord) -> list[str]:
    """The CLI's lines after `tune`: the choice, then each candidate (* = kept)."""
    tune = record.tune
    lines = [f"{record.run_dir}: {tune['explanation']}"]
    for c in tune["candidates"]:
        figures = (f"{format_size(c['int4_bytes'])}, {c['perplexity_increase_pct']:+.1f} %, {c['seconds']:.0f} s"
                   if c["tried"] else "not needed")
        lines.append(f"  {'*' if c['label'] == tune['chosen'] else ' '} {c['label']}: {figures}")
    return lines


# The parts of a model as memory.png and report.md name them (run.json keeps the short keys).
PART_WORDS = {"lm_head": "output layer (lm_head)", "other": "norms and the rest", "runtime": "working memory",
              "python + onnxruntime": "Python and ONNX Runtime"}


def part_words(parts: dict[str, int]) -> dict[str, int]:
    """`parts` with plain names."""
    return {PART_WORDS.get(name, name): size for name, size in parts.items()}


def figure_rows(record: RunRecord) -> dict[str, tuple[str, str, str]]:
    """The Report step's table: original, INT4 and the change, for disk, RAM and bits per weight."""
    original, int4 = record.original, record.int4
    return {
        "disk": (format_size(original.bytes), format_size(int4.bytes), f"{record.size_ratio:.1f}x smaller"),
        "ram": (ram_text(original.peak_rss_bytes), format_size(int4.peak_rss_bytes),
                f"{record.ram_ratio:.1f}x less" if record.ram_ratio else "original not run"),
        "bits": ("32", f"{record.bits_per_weight:.1f}", _bits_note(record)),
    }


def _bits_note(record: RunRecord) -> str:
    """Why an INT4 model averages more than 4 bits per number."""
    kept = set(record.int4_layers.values())
    larger = " or ".join(words for bits, words in ((8, "at 8 bits"), (None, "unshrunk")) if bits in kept)
    return f"4 bits each, plus a scale per {record.settings.block_size} numbers" + (
        f", and some layers kept {larger}" if larger else "")


def quality_cells(quality: QualityResult) -> tuple[str, ...]:
    """One text's row in the Report step: text, tokens, perplexity, increase, agreement, KL."""
    if not quality.compared:
        return (quality.text, f"{quality.tokens:,}", f"{quality.int4_perplexity:.2f} (INT4 alone)", NOT_RUN,
                NOT_RUN, NOT_RUN)
    return (
        quality.text,
        f"{quality.tokens:,}",
        f"{quality.original_perplexity:.2f} → {quality.int4_perplexity:.2f}",
        f"{quality.perplexity_increase_pct:+.1f} %",
        f"{quality.top1_agreement * 100:.1f} %",
        f"{quality.mean_kl:.4f}",
    )


def speed_rows(speed: Speed) -> dict[str, tuple[str, str, str]]:
    """The Report step's speed table: original, INT4 and the change."""
    original, int4 = speed.original, speed.int4
    if original is None:
        return {
            "tokens_per_s": (NOT_RUN, f"{int4['tokens_per_s']:.1f} tokens/s", ""),
            "ttft_s": (NOT_RUN, f"{int4['ttft_s']:.2f} s", ""),
            "peak_rss_bytes": (NOT_RUN, format_size(int4["peak_rss_bytes"]), ""),
        }
    return {
        "tokens_per_s": (f"{original['tokens_per_s']:.1f} tokens/s", f"{int4['tokens_per_s']:.1f} tokens/s",
                         f"{speed.speedup:.1f}x as fast"),
        "ttft_s": (f"{original['ttft_s']:.2f} s", f"{int4['ttft_s']:.2f} s", ""),
        "peak_rss_bytes": (format_size(original["peak_rss_bytes"]), format_size(int4["peak_rss_bytes"]),
                           f"{speed.memory_ratio:.1f}x less"),
    }


SPEED_TITLES = {"tokens_per_s": "decode tokens/s", "ttft_s": "time to first token", "peak_rss_bytes": "peak RAM"}


def speed_note(speed: Speed) -> str:
    return (
        f"After a {speed.prompt_tokens}-token prompt, {speed.new_tokens} new tokens, on "
        f"{speed.provider.upper()} ({speed.provider_reason}); the middle of {speed.rounds} rounds."
    )


# -- a bundle's model card -------------------------------------------------------------------------


def card_saved_lines(record: RunRecord) -> list[str]:
    """The model card's "What was saved": disk, memory and speed, where they were measured."""
    original, int4 = record.original, record.int4
    lines = [
        f"- On disk: {format_size(original.bytes)} → {format_size(int4.bytes)} ({record.size_ratio:.1f}x smaller, "
        f"{record.bits_per_weight:.1f} bits per weight).",
        (f"- Memory while answering: {format_size(original.peak_rss_bytes)} → {format_size(int4.peak_rss_bytes)} "
         f"peak ({record.ram_ratio:.1f}x less)" if not original.skipped else
         f"- Memory while answering: {format_size(int4.peak_rss_bytes)} peak (the original was not run: "
         f"{original_reason(record)})") + f", on the CPU of {machine_text(record.machine)}.",
    ]
    speed = record.speed
    if speed:
        pace = (f"{speed.int4['tokens_per_s']:.1f} tokens per second (the original was not run)" if not speed.original
                else f"{speed.original['tokens_per_s']:.1f} → {speed.int4['tokens_per_s']:.1f} tokens per "
                f"second ({speed.speedup:.1f}x)")
        lines.append(
            f"- Speed: {pace}, first token after {speed.int4['ttft_s']:.2f} s, on "
            f"{speed.provider.upper()} ({machine_text(speed.machine or record.machine)})."
        )
    else:
        lines.append("- Speed: not measured (`int4-workbench bench RUN_DIR` measures it).")
    return lines


def card_lost_lines(record: RunRecord) -> list[str]:
    """The model card's "What was lost": the quality on each text, explained for a newcomer."""
    if not record.quality:
        return ["- Not measured: the quality cost of this model is unknown."]
    if record.original.skipped:
        return [f"- Not measured against the original, which was not run: {original_reason(record)}."] + [
            f"- On {q.text} ({q.tokens:,} tokens): perplexity (how unsure the model is of the right next word; "
            f"lower is better) {q.int4_perplexity:.2f}." for q in record.quality]
    return [
        f"- On {q.text} ({q.tokens:,} tokens): perplexity (how unsure the model is of the right next "
        f"word; lower is better) {q.original_perplexity:.2f} → {q.int4_perplexity:.2f} "
        f"({q.perplexity_increase_pct:+.1f} %); the INT4 model picks the same next word as the original "
        f"{q.top1_agreement * 100:.0f} % of the time."
        for q in record.quality
    ] + [f"- {scale_words()}"]


# -- report.md -------------------------------------------------------------------------------------


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
        f"({format_size(section['budget_bytes'])}); used {format_size(section['extra_bytes'])}. Layers are taken "
        "by KL per extra byte, so small layers with a modest KL come before big ones.",
        "",
    ]
    lines += [
        f"- `{entry['layer']}`: changing only this layer to INT4 moved the next-token distribution by KL "
        f"{entry['kl']:.3g}, the {_ordinal(entry['rank'])} largest of {section['layers']}; 8 bits cost "
        f"{format_size(entry['extra_bytes'])} more."
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
            lines.append(f"| {c['label']} | ~{format_size(c['estimated_bytes'])} (est.) | | | | | | not needed |")
            continue
        result = "kept" if c["label"] == tune["chosen"] else ("within budget" if c["within_budget"] else "over budget")
        lines.append(
            f"| {c['label']} | {format_size(c['int4_bytes'])} | {c['size_ratio']:.2f}x | "
            f"{c['perplexity_increase_pct']:+.1f} % | {c['top1_agreement'] * 100:.1f} % | {c['mean_kl']:.4f} | "
            f"{c['seconds']:.0f} s | {result} |"
        )
    return lines


def render_report(record: RunRecord) -> str:
    """report.md."""
    settings = record.settings
    source = record.source
    model = record.model
    original, int4 = record.original, record.int4
    lines = [
        f"# INT4 report: {source.name}",
        "",
        verdict(record),
        "",
        "## Model",
        "",
        f"- Source: {source.kind} `{source.spec}`",
        f"- Architecture: {model.architecture}, {model.parameters:,} parameters, "
        f"{model.layers} layers, tied embeddings: {model.tied_embeddings}",
        "",
        "## Settings",
        "",
        f"- Preset: {record.preset or 'custom'}; method {settings.method}, block size "
        f"{settings.block_size}, {'symmetric' if settings.symmetric else 'asymmetric'}, accuracy level "
        f"{settings.accuracy_level}",
        f"- Embeddings quantized: {settings.quantize_embeddings}; lm_head quantized: {settings.quantize_lm_head}"
        f"{' (shares the embeddings tensor)' if record.shared_embeddings else ''}",
        f"- Kept at 8 bits: {', '.join(n for n, b in record.int4_layers.items() if b == 8) or 'none'}",
        f"- Kept at fp32: {', '.join(n for n, b in record.int4_layers.items() if b is None) or 'none'}",
        f"- Calibration: {record.calibration or 'not used'}",
        *_sensitivity_lines(record.sensitivity),
        *_tune_lines(record.tune),
        "",
        "## Memory",
        "",
        f"![memory]({CHART_FILE})",
        "",
        "| | original | INT4 |",
        "|---|---:|---:|",
        f"| model on disk | {format_size(original.bytes)} | {format_size(int4.bytes)} |",
    ]
    disk = {"original": original.disk_parts, "int4": int4.disk_parts}
    for component in dict.fromkeys([*disk["original"], *disk["int4"]]):
        lines.append(f"| &nbsp;&nbsp;{PART_WORDS.get(component, component)} | {format_size(disk['original'].get(component, 0))} | "
                     f"{format_size(disk['int4'].get(component, 0))} |")
    lines += [
        f"| peak RAM (measured) | {ram_text(original.peak_rss_bytes)} | {format_size(int4.peak_rss_bytes)} |",
        "",
        f"Size ratio {record.size_ratio:.2f}x, {record.bits_per_weight:.2f} bits per weight overall, "
        + (f"RAM ratio {record.ram_ratio:.2f}x." if record.ram_ratio else f"Original: {original.skipped}."),
        "",
        "## Quality",
        "",
    ]
    if record.quality:
        lines += [
            "| text | tokens | original ppl | INT4 ppl | increase | top-1 agreement | mean KL |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for q in record.quality:
            lines.append(
                f"| {q.text} | {q.tokens:,} | {q.original_perplexity:.2f} | {q.int4_perplexity:.2f} "
                f"| +{q.perplexity_increase_pct:.1f} % | {q.top1_agreement * 100:.1f} % | {q.mean_kl:.4f} |"
                if q.compared else f"| {q.text} | {q.tokens:,} | {NOT_RUN} | {q.int4_perplexity:.2f} | | | |"
            )
        lines += ["", scale_words() if not record.original.skipped else
                  f"The original was not run, so nothing is compared: {original_reason(record)}."]
    else:
        lines.append("Not measured yet: `int4-workbench evaluate RUN_DIR --text FILE`.")
    lines += ["", "## Speed", ""]
    speed = record.speed
    if speed:
        original = speed.original or dict.fromkeys(speed.int4)
        cell = {"tokens_per_s": lambda v: f"{v:.1f}", "ttft_s": lambda v: f"{v:.2f} s", "peak_rss_bytes": format_size}
        lines += [
            f"On {speed.provider}, {speed.new_tokens} new tokens after a {speed.prompt_tokens}-token "
            f"prompt, median of {speed.rounds} {'alternating ' if speed.original else ''}rounds:",
            "",
            "| | original | INT4 |",
            "|---|---:|---:|",
            *(f"| {title} | {NOT_RUN if original[key] is None else cell[key](original[key])} | "
              f"{cell[key](speed.int4[key])} |" for key, title in SPEED_TITLES.items()),
            "",
            f"INT4 decodes {speed.speedup:.2f}x as fast with {speed.memory_ratio:.2f}x less peak RAM."
            if speed.original else f"The original was not run: {original_reason(record)}.",
        ]
    else:
        lines.append("Not measured yet: `int4-workbench bench RUN_DIR`.")
    lines += ["", "## Timings", ""]
    lines += [f"- {stage}: {seconds:.1f} s" for stage, seconds in record.timings_s.items()]
    lines += ["", "## INT4 graph operators", ""]
    lines += [f"- {op}: {count}" for op, count in list(record.ops.items())[:12]]
    versions = ", ".join(f"{k} {v}" for k, v in record.versions.items())
    lines += ["", f"Made {record.created} with {versions}.", ""]
    return "\n".join(lines)
