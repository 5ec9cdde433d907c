"""Quality of the INT4 model against the original on the user's text.

Both models read the same windows of tokens; per position we compare the next-token
distributions: perplexity of each, top-1 agreement, and KL(original || int4). Where the run's
original was skipped (too large to run here) the INT4 model's perplexity is measured alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workbench.quantization.calibration import read_texts
from workbench.errors import NotSaved, WorkbenchError
from workbench.quality.judgement import log_softmax
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.generation.runtime import OnnxCausalLM
from workbench.run.record import QualityResult

DEFAULT_WINDOW = 512
DEFAULT_MAX_TOKENS = 8192
MIN_TOKENS = 32


@dataclass
class _Totals:
    positions: int = 0
    original_nll: float = 0.0
    int4_nll: float = 0.0
    agree: int = 0
    kl: float = 0.0

    def add(self, original_logits: np.ndarray | None, int4_logits: np.ndarray, targets: np.ndarray) -> None:
        """Logits (positions, vocab) predicting `targets` (positions,); no original's: the INT4 figures alone."""
        log_q = log_softmax(int4_logits.astype(np.float64))
        rows = np.arange(len(targets))
        self.positions += len(targets)
        self.int4_nll -= float(log_q[rows, targets].sum())
        if original_logits is None:
            return
        log_p = log_softmax(original_logits.astype(np.float64))
        self.original_nll -= float(log_p[rows, targets].sum())
        self.agree += int((original_logits.argmax(-1) == int4_logits.argmax(-1)).sum())
        self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())


def check_sizes(window: int, max_tokens: int) -> None:
    """Refuse, before any work, a window or a token budget that cannot give figures."""
    if window < 1:
        raise WorkbenchError(f"The window must be at least 1 token (--window), not {window}; {DEFAULT_WINDOW} is usual.")
    if max_tokens < MIN_TOKENS:
        raise WorkbenchError(
            f"Quality needs at least {MIN_TOKENS} tokens of text (--max-tokens), not {max_tokens}; "
            f"{DEFAULT_MAX_TOKENS} gives steady figures."
        )


def text_tokens(text_path: Path, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """The tokens of a text file (any format the calibration reader takes): all, or with `max_tokens`
    at least that many from its start (a large file is not read whole)."""
    text = "\n\n".join(read_texts(text_path, tokens=max_tokens, across=False))
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)


def evaluate(
    original_dir: Path | None,
    int4_dir: Path,
    text_path: Path,
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    provider: str = "cpu",
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> QualityResult:
    from transformers import AutoTokenizer

    check_sizes(window, max_tokens)
    progress(0.0, "reading the text")
    tokenizer = AutoTokenizer.from_pretrained(int4_dir)  # the same tokenizer in both folders
    tokens = text_tokens(Path(text_path), tokenizer, max_tokens)[:max_tokens]
    if len(tokens) < MIN_TOKENS:
        raise WorkbenchError(
            f"{Path(text_path).name} has only {len(tokens)} tokens; quality needs at least {MIN_TOKENS} "
            "(a few paragraphs; a few thousand tokens give steadier figures)."
        )
    progress(0.02, "loading both models" if original_dir else "loading the INT4 model")
    original = OnnxCausalLM(original_dir, provider) if original_dir else None
    int4 = OnnxCausalLM(int4_dir, provider)
    context = int4.context_length
    if context and window > context:  # fused attention refuses inputs longer than its rotary tables
        window = context
    starts = range(0, len(tokens) - 1, window)
    totals = _Totals()
    for index, start in enumerate(starts):
        check(cancelled)
        chunk = tokens[start : start + window + 1]
        if len(chunk) < 2:
            break
        inputs = chunk[:-1][None, :]
        original_logits = original.forward(inputs)[0][0] if original else None
        totals.add(original_logits, int4.forward(inputs)[0][0], chunk[1:])
        progress(0.05 + 0.95 * (index + 1) / len(starts), f"window {index + 1}/{len(starts)}")
    int4_ppl = math.exp(totals.int4_nll / totals.positions)
    if original is None:
        return QualityResult(text=Path(text_path).name, tokens=totals.positions, window=window,
                             original_perplexity=None, int4_perplexity=round(int4_ppl, 4),
                             perplexity_increase_pct=None, top1_agreement=None, mean_kl=None)
    original_ppl = math.exp(totals.original_nll / totals.positions)
    return QualityResult(
        text=Path(text_path).name,
        tokens=totals.positions,
        window=window,
        original_perplexity=round(original_ppl, 4),
        int4_perplexity=round(int4_ppl, 4),
        perplexity_increase_pct=round(100.0 * (int4_ppl / original_ppl - 1.0), 2),
        top1_agreement=round(totals.agree / totals.positions, 4),
        mean_kl=round(totals.kl / totals.positions, 5),
    )


def evaluate_run(
    run_dir: Path,
    text_path: Path,
    *,
    window: int = DEFAULT_WINDOW,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    provider: str = "cpu",
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> QualityResult:
    """Evaluate a run folder's two models (the INT4 one alone where the original was skipped) and keep the
    result (one entry per text) in run.json and the report."""
    from workbench.run.report import update_run
    from workbench.layout import INT4, ORIGINAL
    from workbench.run.folders import load_run

    run_dir = Path(run_dir)
    skipped = load_run(run_dir).original.skipped  # and refuse a folder that is not a run before minutes of work
    check_sizes(window, max_tokens)
    result = evaluate(
        None if skipped else run_dir / ORIGINAL, run_dir / INT4, text_path, window=window, max_tokens=max_tokens, provider=provider,
        progress=progress, cancelled=cancelled,
    )
    try:
        update_run(run_dir, lambda record: record.with_quality(result))
    except WorkbenchError as error:
        raise NotSaved(f"The figures were measured but could not be saved in the run folder. {error}", result) from error
    return result
