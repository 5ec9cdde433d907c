"""Auto-tune: the smallest INT4 variant whose perplexity on the user's text rises within a budget.

One export, one PyTorch model with one set of calibration samples, and at most one sensitivity
measurement serve every candidate. Candidates are tried from the smallest (estimated) size up,
each quantized into its own folder and evaluated against the original on the user's text; the
first within the budget is the smallest that meets it, so the larger ones are not needed. When
none meets it, the one that lost least is kept and the record says so. The result is an ordinary
run folder (int4/ is the kept candidate) with a `tune` section in run.json and tune.png.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.quality.evaluate import MIN_TOKENS, QualityResult, evaluate, text_tokens
from workbench.jobs import Cancelled, Progress, Stages, never_cancelled, no_progress
from workbench.run.pipeline import (
    Source,
    finish_run,
    folder_model_bytes,
    method_stages,
    prepare,
    quantize_int4,
    resolve_model,
)
from workbench.quantization.int4_graph import QuantizeResult
from workbench.quantization.sizes import estimate_int4, int4_bytes
from workbench.layout import INT4
from workbench.run.folders import check_output_dir, staged_dir
from workbench.run import stages as stage
from workbench.run.record import RunRecord
from workbench.quantization.sensitivity import (
    LayerSensitivity,
    eight_bit_layers,
    measure_layers,
    with_eight_bit,
)
from workbench.settings import PRESETS, QuantSettings
from workbench.sources import ResolvedModel

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 4096  # of the user's text per candidate: steady enough figures, a few seconds each
CANDIDATE_FOLDER = "candidates"
_BALANCED = PRESETS["balanced"].settings
# From the smallest to the best quality; measured on the off-grid reference these span about
# +14 % to +6 % perplexity at 6.9x to 5.4x smaller.
CANDIDATES: tuple[QuantSettings, ...] = (
    PRESETS["smallest"].settings,
    _BALANCED,
    _BALANCED.replace(sensitive_8bit_pct=5.0),
    PRESETS["quality"].settings,
    _BALANCED.replace(sensitive_8bit_pct=25.0),
)


def candidate_label(settings: QuantSettings) -> str:
    parts = [f"{settings.method.upper()}, blocks of {settings.block_size}"]
    if settings.eight_bit:
        parts.append("8-bit " + ", ".join(settings.eight_bit))
    if settings.sensitive_8bit_pct:
        parts.append(f"most sensitive layers 8-bit (+{settings.sensitive_8bit_pct:g} %)")
    return ", ".join(parts)


@dataclass
class _Tried:
    folder: Path
    result: QuantizeResult
    quality: QualityResult
    sensitivity: dict | None


@dataclass
class _Candidate:
    settings: QuantSettings
    entry: dict = field(default_factory=dict)  # what run.json records
    tried: _Tried | None = None


def tune_run(
    spec: str | ResolvedModel,
    run_dir: Path,
    max_quality_loss_pct: float,
    *,
    text: Path,
    calibration: Path | None = None,
    tokens: int = DEFAULT_TOKENS,
    trust_remote_code: bool = False,
    candidates: tuple[QuantSettings, ...] = CANDIDATES,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> RunRecord:
    """Make the candidates from one export, keep the smallest within the budget in `run_dir`;
    return the run record (also saved as run.json)."""
    text = Path(text)
    _check_inputs(max_quality_loss_pct, text, calibration, tokens, candidates)
    run_dir = Path(run_dir)
    check_output_dir(run_dir, 0)
    stages = Stages(
        progress,
        [(stage.MODEL, 1), (stage.EXPORT, 6), (stage.CALIBRATION, 2),
         *((stage.candidate(i + 1, len(candidates)), 12) for i in range(len(candidates))), (stage.FUSE, 1),
         (stage.MEASURE, 2)],
    )
    calibrated = next((c for c in candidates if c.needs_calibration), candidates[0])
    model = resolve_model(spec, run_dir, stages, trust_remote_code, cancelled, calibrated, streamed=False)
    _check_text_length(model, text)
    with staged_dir(run_dir) as work:
        # Candidates measure their sensitive layers on the PyTorch model: the export path keeps it.
        source = prepare(model, work, stages, calibrated, calibration, trust_remote_code, cancelled, streamed=False)
        tuner = _Tuner(source, work / CANDIDATE_FOLDER, max_quality_loss_pct, text, tokens, cancelled)
        every = [_Candidate(settings) for settings in candidates]
        for candidate in every:
            candidate.entry = {"label": candidate_label(candidate.settings), "settings": candidate.settings.to_dict(),
                               "tried": False}
        for number in range(1, len(every) + 1):
            untried = [c for c in every if c.tried is None]
            for c in untried:  # sizes become exact once the sensitivity is measured
                c.entry["estimated_bytes"] = tuner.estimate(c.settings)
            candidate = min(untried, key=lambda c: c.entry["estimated_bytes"])
            stages.run(f"candidate {number}", lambda p, c=candidate: tuner.try_candidate(c, p))
            if candidate.entry["within_budget"]:
                break
        source.torch_model = None  # the ONNX steps need its memory
        kept = tuner.kept
        kept.tried.folder.rename(work / INT4)
        shutil.rmtree(work / CANDIDATE_FOLDER)
        tune = _tune_section(every, kept, max_quality_loss_pct, text, tokens)
        extra = {"quality": (kept.tried.quality,), "tune": tune}
        if kept.tried.sensitivity:
            extra["sensitivity"] = kept.tried.sensitivity
        preset = next((name for name, p in PRESETS.items() if p.settings == kept.settings), None)
        record = finish_run(work, stages, source, kept.settings, kept.tried.result, cancelled, preset=preset,
                            extra=extra)
    return record.replace(run_dir=str(run_dir.absolute()))


class _Tuner:
    """Tries candidates on one source, keeping on disk only the best tried so far."""

    def __init__(self, source: Source, folder: Path, budget: float, text: Path, tokens: int, cancelled: Cancelled):
        self.source, self.folder, self.budget = source, folder, budget
        self.text, self.tokens, self.cancelled = text, tokens, cancelled
        self.original_bytes = folder_model_bytes(source.original_dir)
        self.measured: dict[tuple[int, bool], LayerSensitivity] = {}
        self.kept: _Candidate | None = None
        self.count = 0

    def _sensitivity(self, settings: QuantSettings) -> LayerSensitivity | None:
        return self.measured.get((settings.block_size, settings.symmetric))

    def estimate(self, settings: QuantSettings) -> int:
        """Bytes from the weight shapes; before the sensitivity is measured, the budget's upper bound."""
        info = self.source.info
        measured = self._sensitivity(settings)
        if not settings.sensitive_8bit_pct or measured is None:
            return int4_bytes(info, settings)
        layers = eight_bit_layers(measured.section(info, settings))
        return sum(estimate_int4(info, with_eight_bit(settings, layers)).values())

    def try_candidate(self, candidate: _Candidate, progress: Progress) -> None:
        settings, source, cancelled = candidate.settings, self.source, self.cancelled
        needs_measuring = bool(settings.sensitive_8bit_pct) and self._sensitivity(settings) is None
        stages = Stages(progress, [(stage.SENSITIVITY, 4 if needs_measuring else 0), *method_stages(settings),
                                   (stage.EVALUATE, 3)])
        sensitivity = None
        if settings.sensitive_8bit_pct:
            if needs_measuring:
                self.measured[(settings.block_size, settings.symmetric)] = stages.run(
                    "sensitivity", lambda p: measure_layers(source.torch_model, source.samples, source.info, settings,
                                                            progress=p, cancelled=cancelled))
            sensitivity = self._sensitivity(settings).section(source.info, settings)
        self.count += 1
        folder = self.folder / str(self.count)
        result = quantize_int4(stages, source, folder, settings, sensitivity, cancelled)
        quality = stages.run("evaluate", lambda p: evaluate(source.original_dir, folder, self.text,
                                                            max_tokens=self.tokens, progress=p, cancelled=cancelled))
        candidate.tried = _Tried(folder, result, quality, sensitivity)
        int4_bytes = folder_model_bytes(folder)
        candidate.entry.update(
            tried=True,
            estimated_bytes=self.estimate(settings),
            int4_bytes=int4_bytes,
            size_ratio=round(self.original_bytes / int4_bytes, 3),
            perplexity_increase_pct=quality.perplexity_increase_pct,
            top1_agreement=quality.top1_agreement,
            mean_kl=quality.mean_kl,
            seconds=round(sum(stages.timings.values()), 1),
            within_budget=quality.perplexity_increase_pct <= self.budget,
            eight_bit_layers=eight_bit_layers(sensitivity),
        )
        log.info("%s: %+.2f %% perplexity, %.2fx smaller", candidate.entry["label"],
                 quality.perplexity_increase_pct, candidate.entry["size_ratio"])
        self._keep_better(candidate)

    def _keep_better(self, candidate: _Candidate) -> None:
        """Keep the candidate within the budget, else the one that lost least; delete the other."""
        kept = self.kept
        loss = candidate.tried.quality.perplexity_increase_pct
        if kept is None or candidate.entry["within_budget"] or loss < kept.tried.quality.perplexity_increase_pct:
            self.kept, dropped = candidate, kept
        else:
            dropped = candidate
        if dropped is not None:
            shutil.rmtree(dropped.tried.folder)


def _tune_section(candidates: list[_Candidate], kept: _Candidate, budget: float, text: Path, tokens: int) -> dict:
    entry = kept.entry
    within = entry["within_budget"]
    figures = f"{entry['perplexity_increase_pct']:+.1f} %, {entry['size_ratio']:.1f}\u00d7 smaller"
    if within:
        explanation = (
            f"Kept {entry['label']}: the smallest of {len(candidates)} candidates whose perplexity rose no more "
            f"than {budget:g} % on your text ({figures})."
        )
    else:
        explanation = (
            f"No candidate stayed within {budget:g} % on your text: kept {entry['label']}, the one that lost "
            f"least ({figures}). Allow a larger loss, or keep using the original model."
        )
    for candidate in candidates:
        candidate.entry.setdefault("within_budget", None)
    ordered = sorted(candidates, key=lambda c: c.entry["estimated_bytes"])
    return {
        "budget_pct": budget,
        "text": text.name,
        "tokens": kept.tried.quality.tokens,
        "max_tokens": tokens,
        "candidates": [c.entry for c in ordered],
        "chosen": entry["label"],
        "within_budget": within,
        "explanation": explanation,
    }


def _check_inputs(budget: float, text: Path, calibration: Path | None, tokens: int,
                  candidates: tuple[QuantSettings, ...]) -> None:
    """Refuse bad inputs before minutes of export."""
    from workbench.quantization.calibration import read_texts

    if not budget >= 0:  # also refuses NaN
        raise WorkbenchError(
            f"The quality budget must be 0 % or more, not {budget}: give the largest perplexity increase you "
            "accept, e.g. --max-quality-loss 5."
        )
    if tokens < MIN_TOKENS:
        raise WorkbenchError(f"Quality needs at least {MIN_TOKENS} tokens of text per candidate, not {tokens}.")
    if not candidates:
        raise WorkbenchError("Auto-tune needs at least one candidate setting.")
    for path in (text, calibration):
        if path is not None and not Path(path).is_file():
            raise WorkbenchError(f"{path} does not exist or is not a file; give a text file (.txt, .jsonl, .csv, .json).")
        if path is not None:
            read_texts(Path(path), tokens=tokens)


def _check_text_length(model: ResolvedModel, text: Path) -> None:
    from transformers import AutoTokenizer

    count = len(text_tokens(text, AutoTokenizer.from_pretrained(model.path), MIN_TOKENS))
    if count < MIN_TOKENS:
        raise WorkbenchError(
            f"{text.name} has only {count} tokens; judging quality needs at least {MIN_TOKENS} (a few pages of "
            "text like yours give steadier figures)."
        )
