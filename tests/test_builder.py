"""The streaming graph builder on tiny random models: PyTorch's logits and tokens, the INT4 pass's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import cli
from models import build_extra_model
from onnx import numpy_helper
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    MistralConfig,
    Phi3Config,
    Qwen3Config,
)

from exporters.builder import SUPPORTED_MODEL_TYPES, build_decoder, supports
from exporters.optimize import fuse_folder
from workbench.errors import WorkbenchError
from workbench.generation.engine import CausalLM, GenerationConfig, generate
from workbench.quantization.int4_graph import quantize_onnx, written_op_counts
from workbench.settings import QuantSettings
from workbench.sources import inspect_folder

PROMPT = [5, 17, 42, 8, 99, 120, 33, 64, 7, 250, 31]
NEW_TOKENS = 12
# fp32 graph against PyTorch in fp32: fused kernels sum in another order, nothing more.
LOGITS_ATOL = 1e-4


def _smollm3(path: Path) -> Path:
    from transformers import SmolLM3Config

    return build_extra_model(path, SmolLM3Config, no_rope_layers=[1, 0], tie_word_embeddings=True)


LONGROPE_ORIGINAL = 24


def _phi3_longrope(path: Path) -> Path:
    return build_extra_model(
        path, Phi3Config, tie_word_embeddings=True, num_attention_heads=2, num_key_value_heads=1,
        partial_rotary_factor=0.5, sliding_window=None, original_max_position_embeddings=LONGROPE_ORIGINAL,
        rope_scaling={"type": "su", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                      "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 11.0, 15.0]})


EXTRA = {
    "llama3-rope": lambda p: build_extra_model(p, __import__("transformers").LlamaConfig, tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": lambda p: build_extra_model(p, MistralConfig, tie_word_embeddings=False, sliding_window=None),
    # A window shorter than the prompt, so the masking is exercised.
    "mistral-window": lambda p: build_extra_model(p, MistralConfig, tie_word_embeddings=False, sliding_window=5),
    "qwen3": lambda p: build_extra_model(p, Qwen3Config, head_dim=32, tie_word_embeddings=True),
    "granite": lambda p: build_extra_model(p, GraniteConfig, tie_word_embeddings=True, embedding_multiplier=4.0,
                                      residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0),
    "smollm3": _smollm3,
    # Phi-3-mini-4k has a sliding window (2047) too: one shorter than the prompt here.
    "phi3": lambda p: build_extra_model(p, Phi3Config, tie_word_embeddings=False, sliding_window=5),
    # Phi-4-mini's shape of rotary (half of each 32-wide head) with LongRoPE; the 23 tokens here stay within the
    # original length (the short factors), test_longrope_past_the_original_length goes beyond it.
    "phi3-longrope-partial": lambda p: _phi3_longrope(p),
    # Soft caps small enough to bite on these weights; a window shorter than the prompt on layer 0.
    "gemma2": lambda p: build_extra_model(p, Gemma2Config, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": lambda p: build_extra_model(
        p, Gemma3TextConfig, head_dim=16, query_pre_attn_scalar=24, sliding_window=5, rope_local_base_freq=100.0,
        layer_types=["sliding_attention", "full_attention"], rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="module", params=["llama", "qwen2", *EXTRA])
def hf_model(request, tiny_llama, tiny_qwen, tmp_path_factory) -> Path:
    if request.param == "llama":
        return tiny_llama
    if request.param == "qwen2":
        return tiny_qwen
    return EXTRA[request.param](tmp_path_factory.mktemp(request.param) / "model")


def _torch_greedy(model_dir: Path, prompt: list[int] = PROMPT) -> tuple[np.ndarray, list[int]]:
    # Eager attention: the reference computation (soft-capping included), whatever the default kernel.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=NEW_TOKENS)
    return logits, out[0, len(prompt):].tolist()


def _engine_greedy(folder: Path, prompt: list[int] = PROMPT) -> tuple[np.ndarray, list[int]]:
    model = CausalLM(str(folder / "model.onnx"), context_length=256)
    logits, _ = model.forward(np.asarray([prompt], np.int64))
    return logits, generate(model, prompt, GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens


def test_fp32_graph_matches_pytorch(hf_model, tmp_path):
    """Every supported family: logits within LOGITS_ATOL of transformers and the same greedy tokens,
    through the engine's cached, shared-buffer decoding."""
    result = build_decoder(hf_model, tmp_path / "original", inspect_folder(hf_model), None)
    ops = written_op_counts(tmp_path / "original")
    assert ops["GroupQueryAttention"] == 2 and "MatMulNBits" not in ops
    assert set(result.layer_bits.values()) == {None}
    reference_logits, reference_tokens = _torch_greedy(hf_model)
    logits, tokens = _engine_greedy(tmp_path / "original")
    np.testing.assert_allclose(logits, reference_logits, atol=LOGITS_ATOL, rtol=0)
    assert tokens == reference_tokens
    assert (tmp_path / "original" / "tokenizer.json").is_file()


def test_longrope_past_the_original_length(tmp_path):
    """A sequence longer than original_max_position_embeddings rotates with the long factors throughout.

    At the step that first crosses that length, transformers' generate() drops its cache and recomputes the
    sequence with the long factors; the graph, like vLLM and ONNX Runtime GenAI, keeps the cached keys (rotated
    with the short factors) and rotates the new ones with the long factors. So this prompt starts past the
    original length, where the two agree exactly."""
    model_dir = _phi3_longrope(tmp_path / "model")
    prompt = (PROMPT * 3)[:LONGROPE_ORIGINAL + 5]
    build_decoder(model_dir, tmp_path / "original", inspect_folder(model_dir), None)
    reference_logits, reference_tokens = _torch_greedy(model_dir, prompt)
    logits, tokens = _engine_greedy(tmp_path / "original", prompt)
    np.testing.assert_allclose(logits, reference_logits, atol=LOGITS_ATOL, rtol=0)
    assert tokens == reference_tokens
    short_logits = _engine_greedy(tmp_path / "original", prompt[:LONGROPE_ORIGINAL])[0]
    assert np.abs(short_logits[0, -1] - logits[0, LONGROPE_ORIGINAL - 1]).max() > 1e-3  # the factors differ


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("settings", [
    QuantSettings(),
    QuantSettings(symmetric=False, block_size=64, eight_bit=("*.down_proj",), accuracy_level=0),
    QuantSettings(method="hqq", exclude=("lm_head",)),
], ids=["rtn-symmetric", "rtn-asymmetric-8bit", "hqq-fp32-lm-head"])
def test_int4_graph_equals_the_int4_pass(tiny_pair, settings, tmp_path):
    """The builder's INT4 graph holds the very tensors the current pipeline (optimum export, INT4 pass,
    fusion) writes, bit for bit, and gives the same logits and tokens."""
    hf_dir, onnx_dir = tiny_pair
    info = inspect_folder(hf_dir)
    pipeline = tmp_path / "pipeline"
    expected = quantize_onnx(onnx_dir, pipeline, info, settings)
    assert fuse_folder(pipeline).fused
    built = build_decoder(hf_dir, tmp_path / "built", info, settings)
    assert built.layer_bits == expected.layer_bits
    assert built.shared_embeddings == expected.shared_embeddings
    assert written_op_counts(tmp_path / "built")["MatMulNBits"] == written_op_counts(pipeline)["MatMulNBits"]
    theirs, ours = _initializers(pipeline), _initializers(tmp_path / "built")
    quantized = [name for name in theirs if "_Q4" in name or "_Q8" in name]
    assert quantized and all(name in ours for name in quantized)
    for name in quantized:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    pipeline_logits, pipeline_tokens = _engine_greedy(pipeline)
    logits, tokens = _engine_greedy(tmp_path / "built")
    np.testing.assert_allclose(logits, pipeline_logits, atol=LOGITS_ATOL, rtol=0)
    assert tokens == pipeline_tokens and len(tokens) == NEW_TOKENS


@pytest.mark.parametrize("family", ["phi3-longrope-partial", "gemma2", "gemma3"])
def test_int4_end_to_end_through_the_cli(family, tmp_path):
    """quantize (RTN, streamed by the builder) -> compare -> bundle, whose runner must answer as the workbench
    does (the bundle is not written otherwise)."""
    model = EXTRA[family](tmp_path / "model")
    run = tmp_path / "run"
    quantized = cli("quantize", str(model), "-o", str(run), "--method", "rtn", "--json", "-q")
    assert quantized.returncode == 0, quantized.stderr
    ops = json.loads(quantized.stdout)["ops"]
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] >= 6
    assert "built" in json.loads((run / "run.json").read_text())["graph"]
    compared = cli("compare", str(run), "--prompt", "The quick brown fox", "--max-new-tokens", "8", "--json", "-q")
    assert compared.returncode == 0, compared.stderr
    row = json.loads(compared.stdout)["prompts"][0]
    assert 0 < row["original"]["tokens"] <= 8 and 0 < row["int4"]["tokens"] <= 8
    bundled = cli("bundle", str(run), "-o", str(tmp_path / "bundle"), "--json", "-q")
    assert bundled.returncode == 0, bundled.stderr
    assert json.loads(bundled.stdout)["target"] == "runner" and (tmp_path / "bundle").is_dir()


def test_unknown_architecture_is_named(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    reason = supports(folder, "gpt2")
    assert "gpt2" in reason and all(name in reason for name in SUPPORTED_MODEL_TYPES)
    config = AutoConfig.from_pretrained(folder)
    config.hidden_act = "gelu"
    config.save_pretrained(folder)
    with pytest.raises(WorkbenchError, match="activation 'gelu'"):
        build_decoder(folder, tmp_path / "out", inspect_folder(folder), QuantSettings())
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    assert "safetensors" in supports(folder, "llama")


def test_rtn_run_takes_the_streamed_path(tiny_llama, tmp_path):
    """quantize --method rtn on a supported architecture: both graphs from the builder, both measured."""
    from workbench.run.pipeline import quantize_run

    record = quantize_run(str(tiny_llama), tmp_path / "run", QuantSettings(method="rtn"))
    assert record.graph["attention"] == "GroupQueryAttention" and "built" in record.graph
    assert "fuse" not in record.timings_s and record.original.skipped is None
    # Both sessions measured (on a tiny model their peaks are mostly the runtime's own, so not compared).
    assert record.original.peak_rss_bytes > 0 and record.int4.peak_rss_bytes > 0
    assert record.original.bytes > 3 * record.int4.bytes
    assert record.ops["GatherBlockQuantized"] == 1 and record.shared_embeddings
    tokens = _engine_greedy(tmp_path / "run" / "int4")[1]
    assert len(tokens) == NEW_TOKENS


def test_original_too_large_to_run_is_skipped_with_the_reason(tiny_llama, tmp_path):
    """The reasons an original is not written; a run without one: tests/test_skipped_original.py."""
    import dataclasses

    from workbench.run import streamed

    info = inspect_folder(tiny_llama)
    rtn = QuantSettings(method="rtn")
    huge = dataclasses.replace(info, parameters=10**12)  # 4 TB in fp32: no machine runs it
    reason = streamed.original_skip_reason(huge, tmp_path, rtn)
    assert "RAM to run" in reason and "measured alone" in reason
    assert streamed.original_skip_reason(info, tmp_path, rtn) is None


def test_streamed_gptq_equals_gptq_on_the_whole_model(tiny_qwen, tiny_qwen_onnx, tmp_path):
    """One decoder layer in memory at a time, results spilled to files: the very codes, scales and zero points,
    and the builder writes them as the INT4 pass does."""
    settings = QuantSettings(method="gptq", symmetric=False, act_order=True)
    spilled = _streamed_gptq_equals_gptq(tiny_qwen, settings, tmp_path / "spill")
    info = inspect_folder(tiny_qwen)
    quantize_onnx(tiny_qwen_onnx, tmp_path / "pipeline", info, settings, precomputed=spilled)
    build_decoder(tiny_qwen, tmp_path / "built", info, settings, precomputed=spilled)
    theirs, ours = _initializers(tmp_path / "pipeline"), _initializers(tmp_path / "built")
    for name in [n for n in theirs if "_Q4" in n]:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def _streamed_gptq_equals_gptq(model_dir: Path, settings: QuantSettings, spill: Path):
    """GPTQ layer by layer from the safetensors gives GPTQ on the whole model's codes, scales and zero points."""
    from workbench.quantization.gptq import gptq_quantize
    from workbench.quantization.streamed import SpilledWeights, streamed_gptq
    from workbench.run.pipeline import _torch_plan

    plan = _torch_plan(inspect_folder(model_dir), settings)
    samples = np.random.default_rng(0).integers(3, 380, (6, 48))
    options = {"block_size": settings.block_size, "symmetric": settings.symmetric, "act_order": settings.act_order}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = gptq_quantize(model, torch.as_tensor(samples), plan, **options)
    spilled = streamed_gptq(model_dir, samples, plan, SpilledWeights(spill), progress=lambda f, m: None,
                            cancelled=lambda: False, **options)
    assert sorted(spilled) == sorted(expected) == sorted(plan) and len(list(spill.glob("*.npz"))) == len(plan)
    for name, weight in expected.items():
        ours = spilled[name]
        for field in ("q", "scales", "zero_points"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(weight, field), err_msg=f"{name}.{field}")
    return spilled


@pytest.mark.parametrize("family", ["phi3-longrope-partial", "gemma2", "gemma3"])
def test_streamed_gptq_on_the_other_families(family, tmp_path):
    """The balanced preset's GPTQ streams these too (Gemma 3's computed buffers, the local rotary table and the
    embedding scale, included)."""
    model = EXTRA[family](tmp_path / "model")
    _streamed_gptq_equals_gptq(model, QuantSettings(method="gptq", symmetric=False, act_order=True), tmp_path / "spill")


def test_data_free_gptq_run_is_streamed(tiny_llama, tmp_path, caplog):
    """The balanced preset's method, data-free: calibration text from a round-to-nearest copy on ONNX Runtime (the
    8-bit one, which costs a tiny model little more RAM than GPTQ), GPTQ layer by layer, written by the builder;
    the engine decodes the result and the copy leaves nothing behind."""
    from workbench.run.memory import WRITER_8BIT, calibration_writer
    from workbench.run.pipeline import quantize_run

    settings = QuantSettings(method="gptq", symmetric=False, act_order=True, calibration_samples=4,
                             calibration_tokens=32)
    assert calibration_writer(inspect_folder(tiny_llama), settings) == WRITER_8BIT
    with caplog.at_level("INFO", logger="workbench.run.streamed"):
        record = quantize_run(str(tiny_llama), tmp_path / "run", settings)
    assert "calibration text written by an 8-bit copy" in caplog.text
    assert "built" in record.graph and record.calibration == "self-written (data-free)"
    assert {"export", "calibration", "gptq", "int4", "measure"} <= set(record.timings_s)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["int4", "memory.png", "original", "report.md",
                                                                     "run.json"]
    assert len(_engine_greedy(tmp_path / "run" / "int4")[1]) == NEW_TOKENS


@pytest.mark.parametrize("copy", ["8-bit", "INT4"])
def test_rtn_copy_writes_calibration_text(tiny_llama, tmp_path, copy):
    """Data-free calibration for models too large for PyTorch: a round-to-nearest graph (either copy the run may
    choose) samples the text, with the sampling of the PyTorch writer (BOS, a random ordinary first token,
    top-p), the same tokens for one seed."""
    from transformers import AutoTokenizer

    from workbench.quantization.streamed import onnx_written_samples
    from workbench.run.memory import WRITER_8BIT, WRITER_INT4

    writer = WRITER_8BIT if copy == "8-bit" else WRITER_INT4
    build_decoder(tiny_llama, tmp_path / "rtn", inspect_folder(tiny_llama), writer)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    first, again = (onnx_written_samples(tiny_llama, tmp_path / "rtn", tokenizer, 3, 24, progress=lambda f, m: None,
                                         cancelled=lambda: False) for _ in range(2))
    assert first.shape == (3, 24) and first.dtype == np.int64
    np.testing.assert_array_equal(first, again)
    assert (first[:, 0] == tokenizer.bos_token_id).all() and first.max() < len(tokenizer)
    assert len({tuple(row) for row in first}) == 3
