"""One scale for what INT4 cost in quality, in plain words: the CLI report, the GUI and the bundle's
model card all read their verdict from here.

The measure is the rise of perplexity (how unsure the model is of the right next word) from the
original to the INT4 model on the same text. The bands were set against the measured presets
(docs/quality.md: +6 to +14 % on held-out text for the presets, +49 to +63 % for plain rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

# "%" never starts a line on its own: a no-break space before it.


@dataclass(frozen=True)
class Band:
    most_pct: float  # the band holds rises up to this (inclusive)
    words: str  # how the INT4 model writes, compared with the original
    advice: str = ""  # what to try, where the loss is worth acting on


SCALE = (
    Band(8.0, "writes almost like the original"),
    Band(15.0, "writes slightly less well than the original"),
    Band(30.0, "writes noticeably less well than the original",
         "try the Best quality preset, or calibrate on a text like yours"),
    Band(float("inf"), "writes much worse than the original",
         "try the Best quality preset, or calibrate on a text like yours"),
)


def band(increase_pct: float) -> Band:
    return next(b for b in SCALE if increase_pct <= b.most_pct)


def scale_words() -> str:
    """The thresholds in plain words, for a table's caption or a card."""
    parts, low = [], 0.0
    for item in SCALE:
        limit = f"up to +{item.most_pct:g}\u00a0%" if item.most_pct != float("inf") else f"above +{low:g}\u00a0%"
        parts.append(f"{limit}: {item.words.replace(' than the original', '')}")
        low = item.most_pct
    return "How the perplexity rise reads: " + "; ".join(parts) + "."


def quality_sentence(increase_pct: float, text: str, agreement_pct: float, benchmark: PresetBenchmark | None = None,
                     *, rounded_before: bool = False) -> str:
    """The verdict on one measurement: the band in words with the number beside it, and, where the
    run fares worse than the preset's benchmark, that said plainly, with why where it is known:
    `rounded_before`, the demo, whose file holds the benchmark model's weights rounded to 4 bits already
    (balanced lost +18-21 % on the essays there, +9-11 % on the benchmark's model: docs/quality.md)."""
    measured = band(increase_pct)
    sentence = (
        f"it {measured.words} (perplexity +{increase_pct:.1f}\u00a0% on {text}, same next word "
        f"{agreement_pct:.0f}\u00a0% of the time)"
    )
    if benchmark is not None and measured.most_pct > band(benchmark.increase_pct).most_pct:
        sentence += f". That is more than this preset's benchmark ({benchmark.words()}): " + (
            "this model's file holds the same weights already rounded to 4 bits, and rounding them again loses more"
            if rounded_before else
            "it was measured on another model and text, and this model or your kind of text loses more"
        )
    if measured.advice:
        sentence += f"; {measured.advice}"
    return sentence


@dataclass(frozen=True)
class PresetBenchmark:
    """What a preset cost when it was measured: where, on which model and text."""

    increase_pct: float
    model: str
    text: str

    def words(self) -> str:
        return f"+{self.increase_pct:.1f}\u00a0% perplexity on {self.model}, {self.text}"

    def promise(self) -> str:
        """The preset card's line: the band, and what was measured on which model."""
        return f"{band(self.increase_pct).words.capitalize()}: measured {self.words()}."
