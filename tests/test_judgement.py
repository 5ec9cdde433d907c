"""The original model's rating of an INT4 answer equals a direct computation with ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from transformers import AutoTokenizer

from workbench.generation.compare import CompareOptions, compare
from workbench.generation.engine import GenerationConfig
from workbench.quality.judgement import UNLIKELY_PROBABILITY, sentence

PROMPT = "Hello, who are you?"



def original_logprobs(run, context: list[int], answer: list[int]) -> np.ndarray:
    """The original model's log-probability of each answer token, computed here from scratch: the
    exported graph run once on prompt + answer with an empty cache, softmax in float64."""
    session = ort.InferenceSession(str(run / "original" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.asarray([context + answer], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for graph_input in session.get_inputs():
        if graph_input.name == "position_ids":
            feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif graph_input.name.startswith("past_key_values"):
            _, heads, _, size = graph_input.shape
            feeds[graph_input.name] = np.zeros((1, heads, 0, size), np.float32)
    logits = session.run(["logits"], feeds)[0][0].astype(np.float64)
    rows = logits[len(context) - 1 : len(context) - 1 + len(answer)]
    probabilities = np.exp(rows - rows.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    return np.log(probabilities[np.arange(len(answer)), answer])


def test_rating_equals_a_direct_computation(tiny_run):
    options = CompareOptions(config=GenerationConfig(max_new_tokens=24), provider="cpu", measure_memory=False)
    row = compare(tiny_run, [PROMPT], options).rows[0]
    judgement = row["judgement"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "original")
    context = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))

    int4 = original_logprobs(tiny_run, context, row["int4"]["token_ids"])
    own = original_logprobs(tiny_run, context, row["original"]["token_ids"])
    assert len(int4) == row["int4"]["tokens"] > 0
    assert judgement["int4_token_probabilities"] == pytest.approx(np.exp(int4), abs=1e-4)
    assert judgement["int4_mean_logprob"] == pytest.approx(int4.mean(), abs=1e-3)
    assert judgement["original_mean_logprob"] == pytest.approx(own.mean(), abs=1e-3)

    unlikely = [i for i, p in enumerate(np.exp(int4)) if p < UNLIKELY_PROBABILITY]
    assert [u["position"] for u in judgement["unlikely"]] == unlikely
    text = row["int4"]["text"]
    for place in judgement["unlikely"]:
        assert place["probability"] == pytest.approx(np.exp(int4[place["position"]]), abs=1e-4)
        assert place["text"] == tokenizer.decode([row["int4"]["token_ids"][place["position"]]], skip_special_tokens=True)
        assert 0 <= place["start"] <= place["end"] <= len(text)
    assert judgement["threshold"] == UNLIKELY_PROBABILITY
    assert judgement["sentence"] == sentence(
        row["original"]["token_ids"] == row["int4"]["token_ids"], len(int4), len(unlikely))


def test_sentences_are_plain():
    assert sentence(True, 10, 0) == "Both models wrote exactly the same answer."
    # Plausible word by word is not "the same answer": two answers can differ in length and facts.
    assert sentence(False, 10, 0) == "The original model would readily have written every word of the 4-bit answer."
    assert sentence(False, 10, 1) == "The 4-bit model chose words the original would rarely choose at 1 place."
    assert sentence(False, 10, 3) == "The 4-bit model chose words the original would rarely choose at 3 places."


def test_cli_compare_json_has_the_judgement_and_saves_the_conversation(tiny_run):
    done = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "compare", str(tiny_run), "--prompt", PROMPT, "--provider", "cpu",
         "--max-new-tokens", "12", "--json", "-q"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    judgement = data["prompts"][0]["judgement"]
    assert {"original_mean_logprob", "int4_mean_logprob", "unlikely", "sentence", "threshold"} <= set(judgement)
    saved = json.loads(open(data["conversation"], encoding="utf-8").read())
    assert saved["turns"][0]["prompt"] == PROMPT and saved["turns"][0]["judgement"] == judgement
    assert saved["turns"][0]["settings"]["max_new_tokens"] == 12
