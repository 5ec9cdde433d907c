"""Side-by-side comparison and the bench on a tiny run folder (original + INT4), through the CLI too."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from workbench.generation.compare import (
    ANSWER_END,
    CompareOptions,
    agreement,
    compare,
    read_prompts,
    to_csv,
    to_markdown,
)
from workbench.errors import JobCancelled, WorkbenchError
from workbench.generation.engine import GenerationConfig
from workbench.run.pipeline import quantize_run
from workbench.settings import QuantSettings

PROMPTS = ["Hello, who are you?", "Write one word.", "Count to three."]


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "run"
    quantize_run(str(tiny_llama), run, QuantSettings(method="rtn", block_size=16, symmetric=False))
    return run


def test_agreement_measures():
    assert agreement([1, 2, 3], [1, 2, 3], "abc", "abc") == {
        "first_divergence": None, "token_agreement": 1.0, "similarity": 1.0}
    diverging = agreement([1, 2, 3, 4], [1, 2, 9, 4], "the cat sat", "the cat sits")
    assert diverging["first_divergence"] == 2 and diverging["token_agreement"] == 0.75
    assert 0.3 < diverging["similarity"] < 1.0
    shorter = agreement([1, 2, 3, 4], [1, 2], "a b c d", "a b")
    assert shorter["first_divergence"] == 2 and shorter["token_agreement"] == 0.5
    assert agreement([1], [2], "alpha", "zzzz")["similarity"] < 0.1


def test_one_prompt_side_by_side(tiny_run):
    streamed = {"original": [], "int4": []}
    result = compare(
        tiny_run, PROMPTS[:1], CompareOptions(config=GenerationConfig(max_new_tokens=12), provider="cpu"),
        on_token=lambda model, index, token, piece: streamed[model].append((token, piece)),
    )
    row = result.to_dict()["prompts"][0]
    for key in ("original", "int4"):
        entry = row[key]
        *tokens, last = streamed[key]
        assert last == (ANSWER_END, "")  # the model has finished: its figures are final while the other writes
        assert entry["text"] == "".join(piece for _, piece in tokens) and entry["tokens"] == len(entry["token_ids"])
        # One call per token of the answer; the end token only where it releases held-back text.
        assert [token for token, _ in tokens][:entry["tokens"]] == entry["token_ids"]
        extra = len(tokens) - entry["tokens"]
        assert extra == 0 or (extra == 1 and entry["finish_reason"] == "eos" and tokens[-1][1])
        assert entry["ttft_s"] > 0 and entry["tokens_per_s"] > 0 and entry["total_s"] >= entry["ttft_s"]
        assert entry["peak_rss_bytes"] > 50 * 2**20  # python + onnxruntime + the model, in its own process
    assert set(row["agreement"]) == {"first_divergence", "token_agreement", "similarity"}
    assert result.provider == "cpu"


def test_prompt_file_table_with_averages(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(PROMPTS)))
    assert read_prompts(prompts) == PROMPTS
    options = CompareOptions(config=GenerationConfig(max_new_tokens=8), provider="cpu", measure_memory=False)
    result = compare(tiny_run, read_prompts(prompts), options)
    table = list(csv.reader(io.StringIO(to_csv(result))))
    assert len(table) == 1 + len(PROMPTS) + 1 and table[-1][1] == "average"
    averages = result.averages()
    expected = sum(row["agreement"]["token_agreement"] for row in result.rows) / len(PROMPTS)
    assert averages["agreement"]["token_agreement"] == pytest.approx(expected, abs=1e-4)
    markdown = to_markdown(result)
    assert markdown.count("\n") == 2 + len(PROMPTS) + 1 and "| average |" in markdown


def test_batch_mode_reports_throughput_and_same_greedy_answers(tiny_run):
    config = GenerationConfig(max_new_tokens=8)
    one = compare(tiny_run, PROMPTS, CompareOptions(config=config, provider="cpu", measure_memory=False))
    batched = compare(tiny_run, PROMPTS, CompareOptions(config=config, provider="cpu", measure_memory=False, batch_size=2))
    for key in ("original", "int4"):
        assert [r[key]["token_ids"] for r in batched.rows] == [r[key]["token_ids"] for r in one.rows]
        assert batched.throughput[key]["tokens_per_s"] > 0
    assert batched.throughput["batch_size"] == 2


def test_speculative_row(tiny_run):
    options = CompareOptions(config=GenerationConfig(max_new_tokens=10), provider="cpu", measure_memory=False,
                             speculative=True, draft_tokens=3)
    row = compare(tiny_run, PROMPTS[:1], options).rows[0]
    assert row["speculative"]["identical_to_original"] is True
    assert 0.0 <= row["speculative"]["acceptance_rate"] <= 1.0 and row["speculative"]["speedup"] > 0


def test_cancel_stops_the_comparison(tiny_run):
    options = CompareOptions(config=GenerationConfig(max_new_tokens=50), provider="cpu", measure_memory=False)
    calls = []
    with pytest.raises(JobCancelled):
        compare(tiny_run, PROMPTS, options, cancelled=lambda: calls.append(1) or len(calls) > 5)


def test_bad_inputs(tiny_run, tmp_path):
    with pytest.raises(WorkbenchError, match="not a run folder"):
        compare(tmp_path, PROMPTS, CompareOptions(provider="cpu"))
    (tmp_path / "p.csv").write_text("x")
    with pytest.raises(WorkbenchError, match=".txt"):
        read_prompts(tmp_path / "p.csv")
    with pytest.raises(WorkbenchError, match="JSON schema or speculative"):
        compare(tiny_run, PROMPTS, CompareOptions(provider="cpu", batch_size=2, speculative=True))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_compare_json_and_table(tiny_run, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    done = cli("compare", str(tiny_run), "--prompt", "Answer in JSON.", "--provider", "cpu", "--json-schema",
               str(schema), "--max-new-tokens", "20", "--out", str(tmp_path / "table.md"), "--json", "-q")
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)["prompts"][0]
    for key in ("original", "int4"):
        assert isinstance(json.loads(row[key]["text"])["ok"], bool)
        assert {"text", "tokens", "ttft_s", "tokens_per_s", "peak_rss_bytes"} <= set(row[key])
    assert (tmp_path / "table.md").read_text().startswith("| # | prompt |")


@pytest.mark.skipif(__import__("workbench.generation.runtime").generation.runtime.cuda_status()[0], reason="CUDA works here")
def test_cli_cuda_without_cuda(tiny_run):
    done = cli("compare", str(tiny_run), "--prompt", "hi", "--provider", "cuda")
    assert done.returncode == 2 and "CUDA was asked for" in done.stderr and "Traceback" not in done.stderr


def test_cli_bench_json(tiny_run):
    done = cli("bench", str(tiny_run), "--rounds", "1", "--prompt-tokens", "64", "--new-tokens", "32", "--json", "-q")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for key in ("original", "int4"):
        assert data[key]["tokens_per_s"] > 0 and data[key]["ttft_s"] > 0
        assert data[key]["peak_rss_bytes"] >= data[key]["load_rss_bytes"] > data[key]["baseline_rss_bytes"]
    assert data["speedup"] == pytest.approx(data["int4"]["tokens_per_s"] / data["original"]["tokens_per_s"], rel=0.01)
    assert data["memory_ratio"] > 0
    too_long = cli("bench", str(tiny_run), "--rounds", "1", "--prompt-tokens", "200", "--new-tokens", "100")
    assert too_long.returncode == 2 and "do not fit this model's context of 256" in too_long.stderr
