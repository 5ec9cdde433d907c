"""Side by side: the original and the INT4 model answer the same prompts; speed, memory, agreement.

Both models write at the same time in this process, each in its own thread (ONNX Runtime lets go
of the GIL while it computes), so the CLI and the GUI stream both answers together. Each
model's peak memory is measured once per run and provider, after the answers, in a fresh child
process (workbench.generation.bench), because one process holding both sessions cannot tell
them apart; the figures are kept in the run's conversations/ folder. Afterwards the original
model rates each INT4 answer (workbench.quality.judgement). In a run whose original was skipped
(too large to run here) the INT4 model answers alone: each row's original and agreement are None.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import statistics
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from workbench.errors import WorkbenchError
from workbench.generation.engine import GenerationConfig, GenerationResult
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.layout import INT4, ORIGINAL
from workbench.quantization.calibration import jsonl_records

log = logging.getLogger(__name__)
MODELS = (ORIGINAL, INT4)
CONVERSATIONS = "conversations"  # in a run folder: saved conversations and the measured memory
MEMORY_FILE = "memory.json"
# (model key, prompt index, token id, text piece) for live display
StreamCallback = Callable[[str, int, int, str], None]
# The token id of a stream's last call for one answer (its piece is ""): that model has finished it, though the
# other may still be writing.
ANSWER_END = -1


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
    judge: bool = True  # the original model rates each INT4 answer

    def to_dict(self) -> dict:
        """The settings an answer was written with, as a conversation file keeps them."""
        return {
            **dataclasses.asdict(self.config), "stop": list(self.config.stop), "provider": self.provider, "system": self.system,
            "json_schema": self.json_schema,
        }


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
                metric: mean(_value(row, key, metric) for row in self.rows)
                for metric in ("tokens", "ttft_s", "tokens_per_s", "total_s")
            }
            for key in MODELS
        }
        summary["agreement"] = {
            metric: mean(_value(row, "agreement", metric) for row in self.rows)
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


def _value(row: dict, key: str, metric: str):
    """A row's figure, None where that side was not run (a run whose original was skipped)."""
    return row[key][metric] if row[key] is not None else None


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
    history: Sequence[dict] = (),
    on_token: StreamCallback | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> CompareResult:
    """Both models answer each prompt; `history` holds the earlier rows of a conversation, whose
    answers each model reads back as its own (one prompt only). The INT4 model answers alone where the
    run's original was skipped."""
    from workbench.generation.runtime import ChatModel, choose_provider
    from workbench.run.folders import load_run

    run_dir = Path(run_dir)
    if not prompts:
        raise WorkbenchError("Give at least one prompt.")
    blank = [number for number, prompt in enumerate(prompts, 1) if not prompt.strip()]
    if blank:
        which = "The prompt" if len(prompts) == 1 else f"Prompt {blank[0]}"
        raise WorkbenchError(f"{which} is empty; write a question or an instruction for both models to answer.")
    if history and (len(prompts) > 1 or options.batch_size > 1):
        raise WorkbenchError("A conversation goes on with one prompt at a time.")
    if options.batch_size < 1:
        raise WorkbenchError(f"batch size must be at least 1, not {options.batch_size}.")
    if options.batch_size > 1 and (options.json_schema or options.speculative):
        raise WorkbenchError("Batch mode cannot be combined with a JSON schema or speculative decoding.")
    skipped = load_run(run_dir).original.skipped
    if skipped and options.speculative:
        raise WorkbenchError(f"Speculative decoding needs the original model, which this run does not have ({skipped}).")
    keys = (INT4,) if skipped else MODELS
    for key in keys:
        if not (run_dir / key).is_dir():
            raise WorkbenchError(f"{run_dir} has no {key}/ folder; is it a run folder made by `quantize`?")
    choice = choose_provider(options.provider)
    progress(0.0, f"loading {'both models' if len(keys) == 2 else 'the INT4 model'} on {choice.name}")
    # Both sessions compute at once: each takes half of the processor's cores rather than all of them.
    threads = max(1, (psutil.cpu_count(logical=False) or 2) // len(keys)) \
        if choice.name == "cpu" and options.batch_size == 1 else None
    models = {key: ChatModel(run_dir / key, choice.name, threads) for key in keys}
    turns = {key: [(row["prompt"], row[key]["text"]) for row in history] for key in keys}
    encoded = {key: [_fitted(models[key], f"Prompt {number}: " if len(prompts) > 1 else "", p, options, turns[key])
                     for number, p in enumerate(prompts, 1)] for key in keys}
    result = CompareResult(choice.name, choice.reason)
    if options.batch_size > 1:
        answers = _batched(models, encoded, options, result, progress, cancelled)
    else:
        answers = _both_at_once(models, encoded, options, on_token, progress, cancelled)
    memory = memory_figures(run_dir, choice.name, encoded[INT4][0], keys, options, progress, cancelled) \
        if options.measure_memory else {}
    for index, prompt in enumerate(prompts):
        int4 = answers[INT4][index]
        original = answers[ORIGINAL][index] if ORIGINAL in answers else None
        row = {
            "prompt": prompt,
            ORIGINAL: _model_entry(original, memory.get(ORIGINAL)) if original else None,
            INT4: _model_entry(int4, memory.get(INT4)),
            "agreement": agreement(original.tokens, int4.tokens, original.text, int4.text) if original else None,
            "settings": options.to_dict(),
        }
        if options.judge and original:
            check(cancelled)
            progress(0.99, "the original model rates the 4-bit answer")
            row["judgement"] = _judge(models, encoded, index, original, int4)
        if "speculative" in answers:
            row["speculative"] = answers["speculative"][index]
        result.rows.append(row)
    progress(1.0, "done")
    return result


def _fitted(model, label: str, prompt: str, options: CompareOptions, history) -> list[int]:
    """The prompt's tokens after the conversation so far, cut to the model's context with `truncate`,
    before anything (memory too) runs."""
    from workbench.generation.engine import GenerationError, fit_prompt

    try:
        return fit_prompt(model.lm, model.encode(prompt, options.system, history=history), options.truncate)[0]
    except GenerationError as error:
        raise WorkbenchError(f"{label}{error} On the command line: compare --truncate.") from error


def _judge(models, encoded, index: int, original: GenerationResult, int4: GenerationResult) -> dict:
    from workbench.quality.judgement import judge

    return judge(
        models[ORIGINAL].lm, models[ORIGINAL].text_tokenizer,
        encoded[ORIGINAL][index][original.truncated_prompt_tokens:], original.tokens,
        encoded[INT4][index][int4.truncated_prompt_tokens:], int4.tokens, int4.text,
    )


def _both_at_once(models, encoded, options: CompareOptions, on_token, progress, cancelled) -> dict:
    """Each prompt answered by both models at the same time, one thread each, streaming as they go."""
    keys = list(models)
    answers: dict[str, list] = {key: [] for key in keys}
    if options.speculative:
        answers["speculative"] = []
    count = len(encoded[INT4])
    lock = threading.Lock()  # both threads count into one progress report
    for index in range(count):
        check(cancelled)
        written = dict.fromkeys(keys, 0)
        failed = threading.Event()  # one model's error stops the other one too

        def stop(failed: threading.Event = failed) -> bool:
            return failed.is_set() or cancelled()

        def answer(key: str, index: int = index, written: dict = written, failed: threading.Event = failed):
            def stream(token: int, piece: str) -> None:
                with lock:
                    written[key] += 1
                    done = sum(written.values()) / (len(keys) * options.config.max_new_tokens)
                    so_far = (f"original {written[ORIGINAL]}, " if ORIGINAL in written else "") + f"4-bit {written[INT4]}"
                    progress(
                        0.9 * (index + min(done, 1.0)) / count,  # the rest: memory, once per run
                        f"prompt {index + 1}/{count}: writing ({so_far} tokens)",
                    )
                if on_token is not None:  # outside the lock: a slow reader of one model holds up only that one
                    on_token(key, index, token, piece)

            try:
                result = models[key].generate(
                    encoded[key][index], options.config, on_token=stream, cancelled=stop,
                    json_schema=options.json_schema, truncate=options.truncate,
                )
            except BaseException:
                failed.set()
                raise
            if on_token is not None:
                on_token(key, index, ANSWER_END, "")
            return result

        with ThreadPoolExecutor(len(keys), thread_name_prefix="compare") as pool:
            running = {key: pool.submit(answer, key) for key in keys}
            done = {key: future.exception() for key, future in running.items()}
        for error in done.values():
            if error is not None:
                raise error
        check(cancelled)  # a cancelled answer is incomplete: nothing to compare
        for key in keys:
            answers[key].append(running[key].result())
        if options.speculative:
            answers["speculative"].append(
                _speculative(models, encoded[ORIGINAL][index], options, answers[ORIGINAL][-1], cancelled)
            )
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
    answers: dict[str, list] = {key: [] for key in models}
    for key in models:
        seconds = tokens = 0.0
        prompts = encoded[key]
        for start in range(0, len(prompts), options.batch_size):
            check(cancelled)
            progress(start / len(prompts), f"{key}: prompts {start + 1}-{min(start + options.batch_size, len(prompts))}")
            chunk = models[key].generate_batch(
                prompts[start:start + options.batch_size], options.config, cancelled=cancelled, truncate=options.truncate
            )
            check(cancelled)
            answers[key].extend(chunk)
            seconds += chunk[0].total_s
            tokens += sum(len(a.tokens) for a in chunk)
        result.throughput[key] = {"tokens": int(tokens), "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)}
    result.throughput["batch_size"] = options.batch_size
    return answers


def memory_figures(run_dir: Path, provider: str, prompt_ids: list[int], keys: Sequence[str], options: CompareOptions,
                   progress, cancelled):
    """Each model's peak memory on `provider`: measured once per run (on its first comparison), then
    read back from conversations/memory.json, so later answers need not wait for it."""
    path = Path(run_dir) / CONVERSATIONS / MEMORY_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        log.warning("%s cannot be read (%s); measuring memory again", path, error)
        known = {}
    if provider not in known:
        known[provider] = _measure_memory(run_dir, provider, prompt_ids, keys, options, progress, cancelled)
        try:
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(known, indent=2), encoding="utf-8")
        except OSError as error:  # a read-only run folder: the figures are still shown this time
            log.warning("cannot keep the memory figures in %s: %s", path, error)
    return known[provider]


def _measure_memory(run_dir: Path, provider: str, prompt_ids: list[int], keys: Sequence[str], options: CompareOptions,
                    progress, cancelled):
    from workbench.subprocess_job import run_in_subprocess

    measured = {}
    for index, key in enumerate(keys):
        measured[key] = run_in_subprocess(
            "workbench.generation.bench:measure_in_process",
            {
                "model_dir": str(run_dir / key), "provider": provider, "threads": None,
                "new_tokens": options.config.max_new_tokens, "prompt_tokens": len(prompt_ids), "prompt_ids": prompt_ids,
            },
            progress=lambda f, m, i=index, k=key: progress(0.9 + 0.045 * (i + f), f"{k}: measuring memory once ({m})"),
            cancelled=cancelled,
            expected_seconds=15.0,
            message="measuring memory",
        )
    return measured


# -- tables ---------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("#", lambda i, r: i),
    ("prompt", lambda i, r: _short(r["prompt"])),
    ("original tokens", lambda i, r: _value(r, ORIGINAL, "tokens")),
    ("int4 tokens", lambda i, r: r[INT4]["tokens"]),
    ("original tok/s", lambda i, r: _value(r, ORIGINAL, "tokens_per_s")),
    ("int4 tok/s", lambda i, r: r[INT4]["tokens_per_s"]),
    ("original TTFT s", lambda i, r: _value(r, ORIGINAL, "ttft_s")),
    ("int4 TTFT s", lambda i, r: r[INT4]["ttft_s"]),
    ("first divergence", lambda i, r: _value(r, "agreement", "first_divergence")),
    ("token agreement", lambda i, r: _value(r, "agreement", "token_agreement")),
    ("similarity (chrF)", lambda i, r: _value(r, "agreement", "similarity")),
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
