"""Speed and memory of both models of a run: decode tokens/s, time to first token, peak RSS.

Every measurement is a fresh child process (one model each, so the peak RSS is that model's
alone), warmed up before it is timed; the two models alternate, so a busy machine slows both alike.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from workbench.errors import NotSaved, WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.run.record import Speed
from workbench.run.report import update_run
from workbench.layout import INT4, ORIGINAL
from workbench.run.folders import load_run, machine

log = logging.getLogger(__name__)
NEW_TOKENS = 128
PROMPT_TOKENS = 256
WARMUP_TOKENS = 8
# Plain prose, repeated to any length: a fixed prompt keeps runs comparable.
BENCH_TEXT = (
    "The lighthouse stood on a rock a mile from the shore, and every evening the keeper climbed the "
    "hundred and twelve steps to light the lamp. Ships passed in the dark, and none of them knew his name. "
)


def bench_prompt(tokenizer, length: int) -> list[int]:
    """`length` token ids of plain prose (a `tokenizers.Tokenizer`)."""
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(BENCH_TEXT, add_special_tokens=False).ids
    return ids[:length]


def bench_run(
    run_dir: Path,
    *,
    provider: str = "cpu",
    rounds: int = 3,
    threads: int | None = None,
    new_tokens: int = NEW_TOKENS,
    prompt_tokens: int = PROMPT_TOKENS,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> dict:
    """Median decode speed and TTFT over `rounds`, and the highest RSS seen, per model (the INT4 one alone
    where the run's original was skipped: then `original`, `speedup` and `memory_ratio` are None).

    The result is also kept in the run's record (`speed`) with the machine it was measured on,
    so the report and a bundle's manifest can quote it.
    """
    from workbench.generation.runtime import choose_provider
    from workbench.subprocess_job import run_in_subprocess

    if rounds < 1:
        raise WorkbenchError(f"rounds must be at least 1, not {rounds}.")
    choice = choose_provider(provider)
    run_dir = Path(run_dir)
    # A run whose original was not kept (too large to run here) measures the INT4 model alone.
    keys = (INT4,) if load_run(run_dir).original.skipped else (ORIGINAL, INT4)
    for key in keys:
        if not (run_dir / key).is_dir():
            raise WorkbenchError(f"{run_dir} has no {key}/ folder; is it a run folder made by `quantize`?")
    samples: dict[str, list[dict]] = {key: [] for key in keys}
    steps = rounds * len(keys)
    for index in range(steps):
        check(cancelled)
        key = keys[index % len(keys)]
        samples[key].append(
            run_in_subprocess(
                "workbench.generation.bench:measure_in_process",
                {
                    "model_dir": str(run_dir / key), "provider": choice.name, "threads": threads,
                    "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                },
                progress=lambda f, m, i=index, k=key: progress(
                    (i + f) / steps, f"{k} round {i // len(keys) + 1}/{rounds}: {m}"),
                cancelled=cancelled,
                expected_seconds=20.0,
                message="measuring speed",
            )
        )
    summary = {key: _summary(values) for key, values in samples.items()}
    original, int4 = summary.get(ORIGINAL), summary[INT4]
    speed = {
        "provider": choice.name,
        "provider_reason": choice.reason,
        "rounds": rounds,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        ORIGINAL: original,
        INT4: int4,
        "speedup": round(int4["tokens_per_s"] / original["tokens_per_s"], 3) if original else None,
        "memory_ratio": round(original["peak_rss_bytes"] / int4["peak_rss_bytes"], 3) if original else None,
        "machine": machine(),
    }
    try:
        update_run(run_dir, lambda record: record.replace(speed=Speed.from_dict(speed)))
    except WorkbenchError as error:
        raise NotSaved(f"The figures were measured but could not be saved in the run folder. {error}", speed) from error
    return speed


def _summary(values: list[dict]) -> dict:
    gpu = [v["gpu_bytes"] for v in values if v["gpu_bytes"] is not None]
    return {
        "tokens_per_s": round(statistics.median(v["tokens_per_s"] for v in values), 2),
        "ttft_s": round(statistics.median(v["ttft_s"] for v in values), 4),
        "load_rss_bytes": max(v["load_rss_bytes"] for v in values),
        "peak_rss_bytes": max(v["peak_rss_bytes"] for v in values),
        "baseline_rss_bytes": min(v["baseline_rss_bytes"] for v in values),
        "gpu_bytes": max(gpu) if gpu else None,
        "rounds": [{"tokens_per_s": round(v["tokens_per_s"], 2), "ttft_s": round(v["ttft_s"], 4)} for v in values],
    }


def measure_in_process(
    model_dir: str,
    provider: str,
    threads: int | None,
    new_tokens: int,
    prompt_tokens: int,
    prompt_ids: list[int] | None = None,
    progress: Progress = no_progress,
) -> dict:
    """In a fresh process: load, warm up, time a prompt and `new_tokens` greedy tokens, read RSS."""
    from workbench.generation.engine import GenerationConfig, generate
    from workbench.run.memory import peak_rss
    from workbench.generation.runtime import OnnxCausalLM, gpu_memory_bytes, user_errors

    baseline = peak_rss()
    own_prompt = prompt_ids is None
    if own_prompt:  # before the model, as a runner would: loading it trims what tokenizing freed
        from tokenizers import Tokenizer

        prompt_ids = bench_prompt(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")), prompt_tokens)
    progress(0.1, "loading")
    model = OnnxCausalLM(Path(model_dir), provider, threads)
    load_rss = peak_rss()
    room = None if model.context_length is None else model.context_length - prompt_tokens - 1
    if room is not None and new_tokens > room:
        if own_prompt:
            raise WorkbenchError(
                f"{prompt_tokens} prompt and {new_tokens} new tokens do not fit this model's context of "
                f"{model.context_length}; measure with fewer (--prompt-tokens, --new-tokens)."
            )
        new_tokens = max(room, 1)  # a given prompt's answer stops at the context, here as where it is compared
    progress(0.3, "warming up")
    with user_errors():
        generate(model, prompt_ids[:16], GenerationConfig(max_new_tokens=WARMUP_TOKENS))
        progress(0.5, "generating")
        # No end-of-sequence ids: exactly new_tokens after the first, whatever the model says.
        result = generate(model, prompt_ids, GenerationConfig(max_new_tokens=new_tokens + 1))
    return {
        "tokens_per_s": result.decode_tokens_per_s,
        "ttft_s": result.ttft_s,
        "baseline_rss_bytes": baseline,
        "load_rss_bytes": load_rss,
        "peak_rss_bytes": peak_rss(),
        "gpu_bytes": gpu_memory_bytes() if model.device == "cuda" else None,
        "device": model.device,
    }
