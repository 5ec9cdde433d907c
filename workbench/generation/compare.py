"""Side by side: the original and the INT4 model answer the same prompts; speed, memory, agreement.

Both models generate in this process (so the CLI and the GUI can stream their tokens); each
model's peak memory is measured once, in a fresh child process running the first prompt
(workbench.generation.bench), because one process holding both sessions cannot tell them apart.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.generation.engine import GenerationConfig, GenerationResult
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.layout import INT4, ORIGINAL
from workbench.quantization.calibration import jsonl_records

log = logging.getLogger(__name__)
MODELS = (ORIGINAL, INT4)
# (model key, prompt index, token id, text piece) for live display
StreamCallback = Callable[[str, int, int, str], None]


@dataclass(frozen=True)
class CompareOptions:
    config: GenerationConfig = field(default_factory=GenerationConfig)
    provider: str = "auto"
    system: str | None = None
    json_schema: dict | None = None
    speculative: bool = False  # also run the original with the INT4 model drafting
    draft_tokens: int = 4
    batch_size: int = 1  # >1: prompts batched for throughput (no streaming)
    truncate: bool = False
    measure_memory: bool = True


@dataclass
class CompareResult:
    provider: str
    provider_reason: str
    rows: list[dict] = field(default_factory=list)
    throughput: dict = field(default_factory=dict)  # batch mode: total tokens/s per model

    def averages(self) -> dict:
        def mean(values):
            values = [v for v in values if v is not None]
            return round(statistics.fmean(values), 4) if values else None

        summary = {
            key: {
                metric: mean(row[key][metric] for row in self.rows)
                for metric in ("tokens", "ttft_s", "tokens_per_s", "total_s")
            }
            for key in MODELS
        }
        summary["agreement"] = {
            metric: mean(row["agreement"][metric] for row in self.rows)
            for metric in ("first_divergence", "token_agreement", "similarity")
        }
        return summary

    def to_dict(self) -> dict:
        data = {"provider": self.provider, "provider_reason": self.provider_reason, "prompts": self.rows}
        if len(self.rows) > 1:
            data["averages"] = self.averages()
        if self.throughput:
            data["throughput"] = self.throughput
        return data


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl file ("prompt" or "text" per line)."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"Prompt file not found: {path}. Check the path.")
    content = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".txt":
        prompts = [line.strip() for line in content.splitlines() if line.strip()]
    elif path.suffix.lower() == ".jsonl":
        prompts = []
        for number, entry in jsonl_records(content, path.name, 'an object with a "prompt" or "text" string'):
            text = entry.get("prompt") or entry.get("text") if isinstance(entry, dict) else None
            if not isinstance(text, str):
                raise WorkbenchError(f'{path.name} line {number} has no "prompt" or "text" string.')
            prompts.append(text)
    else:
        raise WorkbenchError(f"{path.name}: prompt files must be .txt (one prompt per line) or .jsonl.")
    if not prompts:
        raise WorkbenchError(f"{path.name} holds no prompts.")
    return prompts


def agreement(original: Sequence[int], int4: Sequence[int], original_text: str, int4_text: str) -> dict:
    """first_divergence: index of the first differing token (None when the answers are identical);
    token_agreement: share of positions, over the longer answer, holding the same token;
    similarity: chrF of the INT4 text against the original's, 0..1."""
    from sacrebleu.metrics import CHRF

    longest = max(len(original), len(int4))
    same = [a == b for a, b in zip(original, int4)]
    first = next((i for i, equal in enumerate(same) if not equal), len(same))
    identical = list(original) == list(int4)
    if original_text == int4_text:
        similarity = 1.0
    else:
        similarity = CHRF().sentence_score(int4_text, [original_text]).score / 100.0
    return {
        "first_divergence": None if identical else first,
        "token_agreement": round(sum(same) / longest, 4) if longest else 1.0,
        "similarity": round(similarity, 4),
    }


def _model_entry(result: GenerationResult, memory: dict | None) -> dict:
    return {
        "text": result.text,
        "tokens": len(result.tokens),
        "token_ids": result.tokens,
        "finish_reason": result.finish_reason,
        "ttft_s": round(result.ttft_s, 4),
        "tokens_per_s": round(result.decode_tokens_per_s, 2),
        "total_s": round(result.total_s, 4),
        "peak_rss_bytes": memory["peak_rss_bytes"] if memory else None,
        "gpu_bytes": memory["gpu_bytes"] if memory else None,
    }


def compare(
    run_dir: Path,
    prompts: Sequence[str],
    options: CompareOptions = CompareOptions(),
    *,
    on_token: StreamCallback | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> CompareResult:
    from workbench.generation.runtime import ChatModel, choose_provider

    run_dir = Path(run_dir)
    if not prompts:
        raise WorkbenchError("Give at least one prompt.")
    blank = [number for number, prompt in enumerate(prompts, 1) if not prompt.strip()]
    if blank:
        which = "The prompt" if len(prompts) == 1 else f"Prompt {blank[0]}"
        raise WorkbenchError(f"{which} is empty; write a question or an instruction for both models to answer.")
    if options.batch_size < 1:
        raise WorkbenchError(f"batch size must be at least 1, not {options.batch_size}.")
    if options.batch_size > 1 and (options.json_schema or options.speculative):
        raise WorkbenchError("Batch mode cannot be combined with a JSON schema or speculative decoding.")
    for key in MODELS:
        if not (run_dir / key).is_dir():
            raise WorkbenchError(f"{run_dir} has no {key}/ folder; is it a run folder made by `quantize`?")
    choice = choose_provider(options.provider)
    progress(0.0, f"loading both models on {choice.name}")
    models = {key: ChatModel(run_dir / key, choice.name) for key in MODELS}
    encoded = [_fitted(models[ORIGINAL], f"Prompt {number}: " if len(prompts) > 1 else "", p, options)
               for number, p in enumerate(prompts, 1)]
    memory = _measure_memory(run_dir, choice.name, encoded[0], options, progress, cancelled) if options.measure_memory else {}
    result = CompareResult(choice.name, choice.reason)
    if options.batch_size > 1:
        answers = _batched(models, encoded, options, result, progress, cancelled)
    else:
        answers = _one_by_one(models, encoded, options, on_token, progress, cancelled)
    for index, prompt in enumerate(prompts):
        original, int4 = answers[ORIGINAL][index], answers[INT4][index]
        row = {
            "prompt": prompt,
            ORIGINAL: _model_entry(original, memory.get(ORIGINAL)),
            INT4: _model_entry(int4, memory.get(INT4)),
            "agreement": agreement(original.tokens, int4.tokens, original.text, int4.text),
        }
        if "speculative" in answers:
            row["speculative"] = answers["speculative"][index]
        result.rows.append(row)
    progress(1.0, "done")
    return result


def _fitted(model, label: str, prompt: str, options: CompareOptions) -> list[int]:
    """The prompt's tokens, cut to the model's context with `truncate`, before anything (memory too) runs."""
    from workbench.generation.engine import GenerationError, fit_prompt

    try:
        return fit_prompt(model.lm, model.encode(prompt, options.system), options.truncate)[0]
    except GenerationError as error:
        raise WorkbenchError(f"{label}{error} On the command line: compare --truncate.") from error


def _one_by_one(models, encoded, options: CompareOptions, on_token, progress, cancelled) -> dict:
    answers: dict[str, list] = {key: [] for key in MODELS}
    if options.speculative:
        answers["speculative"] = []
    for index, ids in enumerate(encoded):
        for key in MODELS:
            check(cancelled)
            progress(index / len(encoded), f"prompt {index + 1}/{len(encoded)}: {key}")
            stream = (lambda token, piece, k=key, i=index: on_token(k, i, token, piece)) if on_token else None
            answer = models[key].generate(
                ids, options.config, on_token=stream, cancelled=cancelled, json_schema=options.json_schema,
                truncate=options.truncate,
            )
            check(cancelled)  # a cancelled answer is incomplete: nothing to compare
            answers[key].append(answer)
        if options.speculative:
            answers["speculative"].append(_speculative(models, ids, options, answers[ORIGINAL][-1], cancelled))
    return answers


def _speculative(models, ids, options: CompareOptions, greedy: GenerationResult, cancelled) -> dict:
    answer = models[ORIGINAL].generate_speculative(
        models[INT4], ids, options.config, draft_tokens=options.draft_tokens, cancelled=cancelled,
        truncate=options.truncate,
    )
    check(cancelled)
    return {
        "identical_to_original": answer.tokens == greedy.tokens,
        "acceptance_rate": round(answer.draft["acceptance_rate"], 4),
        "draft_tokens": options.draft_tokens,
        "total_s": round(answer.total_s, 4),
        "speedup": round(greedy.total_s / answer.total_s, 3) if answer.total_s else None,
    }


def _batched(models, encoded, options: CompareOptions, result: CompareResult, progress, cancelled) -> dict:
    answers: dict[str, list] = {key: [] for key in MODELS}
    for key in MODELS:
        seconds = tokens = 0.0
        for start in range(0, len(encoded), options.batch_size):
            check(cancelled)
            progress(start / len(encoded), f"{key}: prompts {start + 1}-{min(start + options.batch_size, len(encoded))}")
            chunk = models[key].generate_batch(
                encoded[start:start + options.batch_size], options.config, cancelled=cancelled, truncate=options.truncate
            )
            check(cancelled)
            answers[key].extend(chunk)
            seconds += chunk[0].total_s
            tokens += sum(len(a.tokens) for a in chunk)
        result.throughput[key] = {"tokens": int(tokens), "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}
    result.throughput["batch_size"] = options.batch_size
    return answers


def _measure_memory(run_dir: Path, provider: str, prompt_ids: list[int], options: CompareOptions, progress, cancelled):
    from workbench.subprocess_job import run_in_subprocess

    measured = {}
    for index, key in enumerate(MODELS):
        measured[key] = run_in_subprocess(
            "workbench.generation.bench:measure_in_process",
            {
                "model_dir": str(run_dir / key), "provider": provider, "threads": None,
                "new_tokens": options.config.max_new_tokens, "prompt_tokens": len(prompt_ids), "prompt_ids": prompt_ids,
            },
            progress=lambda f, m, i=index, k=key: progress(0.02 * (i + f), f"{k}: measuring memory ({m})"),
            cancelled=cancelled,
            expected_seconds=15.0,
            message="measuring memory",
        )
    return measured


# -- tables ---------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("#", lambda i, r: i),
    ("prompt", lambda i, r: _short(r["prompt"])),
    ("original tokens", lambda i, r: r[ORIGINAL]["tokens"]),
    ("int4 tokens", lambda i, r: r[INT4]["tokens"]),
    ("original tok/s", lambda i, r: r[ORIGINAL]["tokens_per_s"]),
    ("int4 tok/s", lambda i, r: r[INT4]["tokens_per_s"]),
    ("original TTFT s", lambda i, r: r[ORIGINAL]["ttft_s"]),
    ("int4 TTFT s", lambda i, r: r[INT4]["ttft_s"]),
    ("first divergence", lambda i, r: r["agreement"]["first_divergence"]),
    ("token agreement", lambda i, r: r["agreement"]["token_agreement"]),
    ("similarity (chrF)", lambda i, r: r["agreement"]["similarity"]),
)


def _short(text: str, width: int = 48) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table_rows(result: CompareResult) -> list[list]:
    rows = [[get(i + 1, row) for _, get in TABLE_COLUMNS] for i, row in enumerate(result.rows)]
    if len(result.rows) > 1:
        averages = result.averages()
        average_row = {"prompt": "average", **{k: averages[k] for k in (*MODELS, "agreement")}}
        rows.append([get("", average_row) for _, get in TABLE_COLUMNS])
    return [["" if value is None else value for value in row] for row in rows]


def to_csv(result: CompareResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([name for name, _ in TABLE_COLUMNS])
    writer.writerows(table_rows(result))
    return buffer.getvalue()


def to_markdown(result: CompareResult) -> str:
    header = [name for name, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows(result):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(result: CompareResult, path: Path) -> None:
    writers = {".csv": to_csv, ".md": to_markdown}
    writer = writers.get(Path(path).suffix.lower())
    if writer is None:
        raise WorkbenchError(f"{Path(path).name}: the table can be written as .csv or .md.")
    Path(path).write_text(writer(result), encoding="utf-8")
