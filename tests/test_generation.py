"""The portable decoding engine on real ONNX Runtime sessions of the tiny exported models."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from onnx import TensorProto, helper, numpy_helper
from transformers import AutoConfig

from workbench.layout import save_model

from exporters.optimize import fuse_attention, is_fused
from workbench.generation.engine import (
    Batch,
    CausalLM,
    GenerationConfig,
    GenerationError,
    Sampler,
    generate,
    generate_batch,
    generate_speculative,
)

PROMPT = [5, 17, 42, 8, 99, 120, 33, 64, 7, 250, 31]
CONTEXT = 256  # the tiny models' max_position_embeddings


def load(folder: Path) -> CausalLM:
    return CausalLM(str(folder / "model.onnx"), context_length=CONTEXT)


def tokenizer_of(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def fused_pair(tiny_pair, tmp_path_factory):
    """(plain ONNX folder, the same with fused attention) for each tiny architecture."""
    hf_dir, onnx_dir = tiny_pair
    fused_dir = tmp_path_factory.mktemp("fused") / "model"
    shutil.copytree(onnx_dir, fused_dir)
    result = fuse_attention(fused_dir, AutoConfig.from_pretrained(hf_dir))
    assert result.fused, result.reason
    assert result.nodes_after < result.nodes_before / 2
    return onnx_dir, fused_dir


def greedy_by_forward(model: CausalLM, prompt: list[int], count: int) -> list[int]:
    """Reference: the numpy forward pass, one argmax at a time."""
    logits, past = model.forward(np.asarray([prompt], np.int64))
    tokens = []
    for _ in range(count):
        tokens.append(int(logits[0, -1].argmax()))
        logits, past = model.forward(np.asarray([[tokens[-1]]], np.int64), past)
    return tokens


def test_engine_greedy_matches_numpy_forward(tiny_pair):
    model = load(tiny_pair[1])
    result = generate(model, PROMPT, GenerationConfig(max_new_tokens=20))
    assert result.tokens == greedy_by_forward(model, PROMPT, 20)
    assert result.finish_reason == "length" and result.prompt_tokens == len(PROMPT)
    assert 0 < result.ttft_s <= result.total_s


def test_fused_attention_keeps_logits_and_text(fused_pair):
    plain, fused = (load(folder) for folder in fused_pair)
    assert is_fused(fused_pair[1] / "model.onnx") and not is_fused(fused_pair[0] / "model.onnx")
    ids = np.asarray([PROMPT], np.int64)
    plain_logits, plain_past = plain.forward(ids)
    fused_logits, fused_past = fused.forward(ids)
    np.testing.assert_allclose(fused_logits, plain_logits, atol=1e-4)
    for name, value in plain_past.items():
        np.testing.assert_allclose(fused_past[name], value, atol=1e-4)
    config = GenerationConfig(max_new_tokens=24)
    assert generate(fused, PROMPT, config).tokens == generate(plain, PROMPT, config).tokens


def test_fusion_leaves_an_unknown_architecture_untouched(tiny_pair, tmp_path):
    hf_dir, onnx_dir = tiny_pair
    shutil.copytree(onnx_dir, tmp_path / "model")
    config = AutoConfig.from_pretrained(hf_dir)
    config.model_type = "gpt_neox"
    before = (tmp_path / "model" / "model.onnx").read_bytes()
    result = fuse_attention(tmp_path / "model", config)
    assert not result.fused and "gpt_neox" in result.reason
    assert (tmp_path / "model" / "model.onnx").read_bytes() == before


def test_streaming_gives_every_token_in_order(tiny_pair):
    folder = tiny_pair[1]
    seen = []
    result = generate(load(folder), PROMPT, GenerationConfig(max_new_tokens=16), tokenizer=tokenizer_of(folder),
                      on_token=lambda token, piece: seen.append((token, piece)))
    assert [token for token, _ in seen] == result.tokens
    assert "".join(piece for _, piece in seen) == result.text
    assert result.text == tokenizer_of(folder).decode(result.tokens)


def test_stop_string_cuts_the_answer_and_is_never_streamed(tiny_pair):
    folder = tiny_pair[1]
    tokenizer = tokenizer_of(folder)
    full = generate(load(folder), PROMPT, GenerationConfig(max_new_tokens=40), tokenizer=tokenizer).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3 and full.find(stop) < len(full) - 3
    pieces = []
    result = generate(load(folder), PROMPT, GenerationConfig(max_new_tokens=40, stop=(stop,)), tokenizer=tokenizer,
                      on_token=lambda token, piece: pieces.append(piece))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.find(stop)]
    assert "".join(pieces) == result.text


def test_end_of_sequence_ends_the_answer(tiny_pair):
    model = load(tiny_pair[1])
    greedy = generate(model, PROMPT, GenerationConfig(max_new_tokens=10)).tokens
    result = generate(model, PROMPT, GenerationConfig(max_new_tokens=10), eos_token_ids=[greedy[3]])
    assert result.finish_reason == "eos"
    assert result.tokens == greedy[: greedy.index(greedy[3])]


def test_same_seed_same_text_other_seed_other_text(tiny_pair):
    model = load(tiny_pair[1])

    def sample(seed):
        config = GenerationConfig(max_new_tokens=24, temperature=1.5, top_k=100, top_p=0.95, seed=seed)
        return generate(model, PROMPT, config).tokens

    assert sample(7) == sample(7)
    assert any(sample(seed) != sample(7) for seed in (8, 9, 10))


def test_cancel_between_tokens(tiny_pair):
    asked = []

    def cancelled():
        asked.append(True)
        return len(asked) >= 3

    result = generate(load(tiny_pair[1]), PROMPT, GenerationConfig(max_new_tokens=50), cancelled=cancelled)
    assert result.finish_reason == "cancelled"
    assert len(result.tokens) == 3


def test_speculative_output_is_the_greedy_output(tiny_llama_onnx, tiny_qwen_onnx):
    """A different (uncorrelated) draft model: most proposals are wrong, the text must not change."""
    target, draft = load(tiny_llama_onnx), load(tiny_qwen_onnx)
    config = GenerationConfig(max_new_tokens=30)
    greedy = generate(target, PROMPT, config)
    for draft_model, rate in ((draft, None), (target, 1.0)):
        result = generate_speculative(target, draft_model, PROMPT, config, draft_tokens=3)
        assert result.tokens == greedy.tokens
        assert result.draft["proposed"] > 0
        if rate is not None:  # the model drafting for itself is always right
            assert result.draft["acceptance_rate"] == rate


def test_speculative_on_shared_kv_buffers_is_the_greedy_output(fused_pair):
    """Verifying several tokens in one pass and dropping rejected ones, in place in the buffers."""
    plain, fused = (load(folder) for folder in fused_pair)
    config = GenerationConfig(max_new_tokens=30)
    greedy = generate(plain, PROMPT, config).tokens
    for draft in (plain, fused):
        assert generate_speculative(fused, draft, PROMPT, config, draft_tokens=3).tokens == greedy


def test_fused_graph_writes_the_kv_cache_in_place_and_grows_it(fused_pair):
    plain, fused = (load(folder) for folder in fused_pair)
    assert fused.shares_kv and not plain.shares_kv
    shared, grown = fused.new_cache(1, capacity=len(PROMPT) + 1), plain.new_cache(1)
    assert shared.capacity == len(PROMPT) + 1 and grown.capacity == 0
    buffer = shared.values[0].data_ptr()
    feeds = [PROMPT, [7], [9], [11]]
    for step, ids in enumerate(feeds):
        ids = np.asarray([ids], np.int64)
        np.testing.assert_allclose(fused.step(shared, ids), plain.step(grown, ids), atol=1e-4)
        if step < 2:  # the first two steps fit the room given
            assert shared.values[0].data_ptr() == buffer
    assert shared.length == grown.length == len(PROMPT) + 3
    assert shared.capacity >= shared.length


def test_last_only_logits_are_the_last_row_of_all_logits(fused_pair):
    fused = load(fused_pair[1])
    assert fused.keeps_logits
    assert "logits_to_keep" not in {i.name for i in fused.session.get_inputs()}  # other runners never see it
    ids = np.asarray([PROMPT], np.int64)
    every, _ = fused.forward(ids)
    last = fused.step(fused.new_cache(1, len(PROMPT)), ids, last_only=True)
    assert every.shape[1] == len(PROMPT) and last.shape == (1, 1, every.shape[2])
    np.testing.assert_allclose(last[0, 0], every[0, -1], atol=1e-5)


def tied_model(folder: Path, size: int = 1024) -> Path:
    """input_ids -> embedding -> the same matrix as the output projection -> logits (4 MiB, external)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((size, size), np.float32), "tied")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["tied", "input_ids"], ["hidden"]),
         helper.make_node("MatMul", ["hidden", "tied"], ["logits"])],
        "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", size])], [weight],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), folder)
    return folder


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_mapped_weights_are_not_kept_resident_after_loading(tmp_path):
    """ONNX Runtime reads a tied weight whole to prepack it for the MatMul, and keeps the mapping for
    the Gather, which reads a few rows: those pages go back, and come back when read."""
    folder = tied_model(tmp_path / "model")
    model = load(folder)
    prefix = str(folder.resolve()) + "/"
    sizes = {"Rss:": 0, "Size:": 0}
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            current = fields[5] if len(fields) == 6 else None
        elif current and current.startswith(prefix) and fields[0] in sizes:
            sizes[fields[0]] += int(fields[1]) * 1024
    assert sizes["Size:"] >= 4 * 2**20  # the weight is mapped, not copied
    assert sizes["Rss:"] < 0.1 * sizes["Size:"]
    weight = np.random.default_rng(0).standard_normal((1024, 1024), np.float32)
    (logits,) = model.session.run(None, {"input_ids": np.asarray([[3, 4]], np.int64)})  # pages read come back
    np.testing.assert_allclose(logits[0], weight[[3, 4]] @ weight, rtol=1e-4, atol=1e-3)


def test_speculative_needs_greedy_settings(tiny_llama_onnx):
    model = load(tiny_llama_onnx)
    with pytest.raises(GenerationError, match="greedy"):
        generate_speculative(model, model, PROMPT, GenerationConfig(temperature=0.7))


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_batch_rows_equal_single_answers(fused_pair, fused):
    """Left padding must not change any row's answer, on the plain and the fused graph."""
    model = load(fused_pair[1] if fused else fused_pair[0])
    prompts = [PROMPT, PROMPT[:4], PROMPT[3:] + PROMPT]
    config = GenerationConfig(max_new_tokens=12)
    batch = generate_batch(model, prompts, config)
    assert [row.tokens for row in batch] == [generate(model, p, config).tokens for p in prompts]


def test_prompt_longer_than_the_context_is_refused_or_truncated(tiny_llama_onnx):
    model = load(tiny_llama_onnx)
    long_prompt = (PROMPT * 40)[:300]
    with pytest.raises(GenerationError, match="at most 256"):
        generate(model, long_prompt, GenerationConfig(max_new_tokens=4))
    result = generate(model, long_prompt, GenerationConfig(max_new_tokens=4), truncate=True)
    assert result.truncated_prompt_tokens == 300 - result.prompt_tokens > 0
    assert len(result.tokens) == 4


def test_generation_stops_at_the_context_end(tiny_llama_onnx):
    result = generate(load(tiny_llama_onnx), (PROMPT * 30)[:250], GenerationConfig(max_new_tokens=50))
    assert result.finish_reason == "context"
    assert 250 + len(result.tokens) == CONTEXT


def test_sampler_pieces():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    assert Sampler(GenerationConfig())(logits, []) == 1
    assert Sampler(GenerationConfig(temperature=5.0, top_k=1, seed=0))(logits, []) == 1
    assert Sampler(GenerationConfig(temperature=5.0, top_p=1e-6, seed=0))(logits, []) == 1
    # a strong penalty on the favourite (seen before) hands the choice to the runner-up
    assert Sampler(GenerationConfig(repetition_penalty=2.0))(logits, [1]) == 2


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2),
                                 dict(repetition_penalty=0), dict(stop=("",))])
def test_bad_settings_are_refused(bad):
    with pytest.raises(GenerationError):
        GenerationConfig(**bad)


def test_engine_is_portable():
    """The bundle ships engine.py alone: only numpy, onnxruntime and the standard library."""
    source = (Path(__file__).resolve().parents[1] / "workbench" / "generation" / "engine.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "contextlib", "ctypes", "logging", "os", "re", "sys", "time", "collections", "dataclasses",
                        "numpy", "onnxruntime", "threading"}


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_continuous_batch_rows_equal_single_answers(fused_pair, fused):
    """Sequences joining a running batch late, leaving early and reusing rows still get their own greedy answer."""
    model = load(fused_pair[1] if fused else fused_pair[0])
    prompts = [PROMPT[3:] + PROMPT, PROMPT, PROMPT[:4], PROMPT[5:], PROMPT[:2]]
    budgets = [14, 5, 9, 7, 6]
    expected = [generate(model, p, GenerationConfig(max_new_tokens=n)).tokens for p, n in zip(prompts, budgets)]
    batch = Batch(model, rows=3, capacity=CONTEXT)
    waiting, answers, rows, rounds = list(range(len(prompts))), {i: [] for i in range(len(prompts))}, {}, 0
    while waiting or rows:
        # The second sequence arrives one step late; the others as soon as they fit.
        for i in list(waiting):
            if (i == 1 and not rounds) or not batch.fits(len(prompts[i]), budgets[i]):
                continue
            waiting.remove(i)
            [(row, logits)] = batch.join([prompts[i]])
            rows[row] = i
            answers[i].append(int(np.argmax(logits)))
        for row in [r for r, i in rows.items() if len(answers[i]) == budgets[i]]:
            batch.leave(row)
            del rows[row]
        if rows:
            for row, logits in batch.step({r: answers[i][-1] for r, i in rows.items()}).items():
                answers[rows[row]].append(int(np.argmax(logits)))
        rounds += 1
    assert [answers[i] for i in range(len(prompts))] == expected
    assert not batch.busy and (fused or batch.columns == 0)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_several_prompts_join_an_empty_batch_at_once(fused_pair, fused):
    model = load(fused_pair[1] if fused else fused_pair[0])
    prompts, config = [PROMPT[:4], PROMPT, PROMPT[2:]], GenerationConfig(max_new_tokens=6)
    batch = Batch(model, rows=4, capacity=CONTEXT)
    joined = batch.join(prompts)
    assert [row for row, _ in joined] == [0, 1, 2] and batch.lengths == [4, len(PROMPT), len(PROMPT) - 2, None]
    if fused:  # each row at its own positions: a prompt longer than any before joins a running batch
        assert batch.fits(3 * len(PROMPT), 6)
    else:  # left padding: a running batch takes one at a time, each no longer than the current column
        assert batch.columns == len(PROMPT) and not batch.fits(len(PROMPT) + 1, 6)
        with pytest.raises(GenerationError, match="cannot join"):
            batch.join([PROMPT[:3], PROMPT[:3]])
    answers = {row: [int(np.argmax(logits))] for row, logits in joined}
    for _ in range(5):
        for row, logits in batch.step({row: tokens[-1] for row, tokens in answers.items()}).items():
            answers[row].append(int(np.argmax(logits)))
    assert [answers[row] for row in range(3)] == [generate(model, p, config).tokens for p in prompts]


def test_fused_batch_rows_see_their_real_positions(fused_pair):
    """On the shared buffer a row's logits are its single-stream logits whatever its neighbours' lengths:
    a row is right-padded, not shifted (on these float graphs they are equal to the bit)."""
    model = load(fused_pair[1])
    short, long, tokens = PROMPT[:3], PROMPT * 3, (7, 9, 11)
    cache = model.new_cache(1, CONTEXT)
    expected = [model.step(cache, np.asarray([short], np.int64), last_only=True)[0, -1]]
    for token in tokens:
        expected.append(model.step(cache, np.asarray([[token]], np.int64), last_only=True)[0, -1])
    batch = Batch(model, rows=3, capacity=CONTEXT)
    [(long_row, _)] = batch.join([long])
    [(row, logits)] = batch.join([short])
    got = [logits]
    for token in tokens:
        got.append(batch.step({long_row: 5, row: token})[row])
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    assert batch.lengths[row] == len(short) + len(tokens) and batch.lengths[long_row] == len(long) + len(tokens)
