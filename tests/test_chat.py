"""Conversations with both models: simultaneous streams, turns that remember, kept in the run folder."""

from __future__ import annotations

import json
import time

import pytest

from workbench.errors import JobCancelled, WorkbenchError
from workbench.generation import chat
from workbench.generation.compare import ANSWER_END, CompareOptions, compare
from workbench.generation.engine import GenerationConfig
from workbench.generation.runtime import ChatModel

OPTIONS = CompareOptions(config=GenerationConfig(max_new_tokens=16), provider="cpu", measure_memory=False)



def test_both_models_stream_at_the_same_time(tiny_run):
    arrivals, ended = [], {}

    def on_token(model, index, token, piece):
        if token == ANSWER_END:  # that model has finished; nothing of its answer may follow
            ended[model] = len(arrivals)
            return
        assert model not in ended
        arrivals.append(model)
        time.sleep(0.005)  # a slow reader, as a screen is: the other model must keep writing meanwhile

    row = compare(tiny_run, ["Hello, who are you?"], OPTIONS, on_token=on_token).rows[0]
    assert arrivals.count("original") == row["original"]["tokens"] and arrivals.count("int4") == row["int4"]["tokens"]
    assert set(ended) == {"original", "int4"}
    # Interleaved: each model's first token came before the other model's last one.
    for first, other in (("original", "int4"), ("int4", "original")):
        assert arrivals.index(first) < len(arrivals) - 1 - arrivals[::-1].index(other)
    switches = sum(a != b for a, b in zip(arrivals, arrivals[1:]))
    assert switches >= 4, arrivals


def test_a_conversation_remembers_each_models_own_answers_and_is_kept(tiny_run):
    conversation = chat.ask(tiny_run, chat.Conversation.new(), "Hello, who are you?", OPTIONS)
    conversation = chat.ask(tiny_run, conversation, "Count to three.", OPTIONS)
    first, second = conversation.turns
    # The second answer continues the model's own conversation: the same as generating it directly.
    for key in ("original", "int4"):
        model = ChatModel(tiny_run / key, "cpu")
        ids = model.encode("Count to three.", history=[("Hello, who are you?", first[key]["text"])])
        assert model.generate(ids, OPTIONS.config).tokens == second[key]["token_ids"]
    assert second["judgement"]["sentence"] and second["settings"]["max_new_tokens"] == 16

    saved = chat.list_conversations(tiny_run)
    restored = next(c for c in saved if c.id == conversation.id)
    assert restored == conversation and restored.title == "Hello, who are you?"
    files = {p.name for p in chat.folder(tiny_run).iterdir()}
    assert f"{conversation.id}.json" in files and not any(name.endswith(".partial") for name in files)


def test_a_prompt_file_is_kept_as_one_conversation(tiny_run):
    result, conversation = chat.run_suite(tiny_run, ["Write one word.", "Count to three."], OPTIONS)
    assert conversation.kind == chat.SUITE and [t["prompt"] for t in conversation.turns] == ["Write one word.", "Count to three."]
    restored = next(c for c in chat.list_conversations(tiny_run) if c.id == conversation.id)
    assert chat.as_result(restored).averages() == result.averages()
    with pytest.raises(WorkbenchError, match="cannot be continued"):
        chat.ask(tiny_run, restored, "More?", OPTIONS)


def test_memory_is_measured_once_per_run(tiny_run):
    options = CompareOptions(config=GenerationConfig(max_new_tokens=4), provider="cpu")
    first = compare(tiny_run, ["Hi"], options).rows[0]
    memory = json.loads((chat.folder(tiny_run) / "memory.json").read_text())
    assert memory["cpu"]["int4"]["peak_rss_bytes"] == first["int4"]["peak_rss_bytes"] > 50 * 2**20
    began = time.perf_counter()
    again = compare(tiny_run, ["Hi"], options).rows[0]
    assert again["original"]["peak_rss_bytes"] == first["original"]["peak_rss_bytes"]
    assert time.perf_counter() - began < 10  # read back, not a new child process per model


def test_cancel_stops_both_streams(tiny_run):
    options = CompareOptions(config=GenerationConfig(max_new_tokens=200), provider="cpu", measure_memory=False)
    calls = []
    with pytest.raises(JobCancelled):
        chat.ask(tiny_run, chat.Conversation.new(), "Hello", options, cancelled=lambda: calls.append(1) or len(calls) > 6)
    assert len(calls) < 60


def test_unreadable_conversations_are_skipped(tiny_run):
    chat.folder(tiny_run).mkdir(exist_ok=True)
    (chat.folder(tiny_run) / "broken.json").write_text("{not json")
    (chat.folder(tiny_run) / "future.json").write_text(json.dumps({"schema_version": 99, "id": "x", "turns": []}))
    assert all(c.id not in ("broken", "x") for c in chat.list_conversations(tiny_run))
