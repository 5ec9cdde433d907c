"""The INT4 graph: real ONNX Runtime sessions on tiny exported models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM

from workbench.quantization.blockquant import rtn_quantize
from workbench.quantization.sizes import estimate_int4
from workbench.run.memory import graph_sizes
from workbench.quantization.int4_graph import layer_plan, quantize_onnx
from workbench.generation.runtime import OnnxCausalLM
from workbench.settings import QuantSettings
from workbench.sources import inspect_folder

TOKENS = np.array([[3, 17, 42, 8, 99, 120, 5, 64, 7, 250, 31, 2]], np.int64)


def ort_logits(folder):
    return OnnxCausalLM(folder).forward(TOKENS)[0]


def op_counts(folder):
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    counts = {}
    for node in model.graph.node:
        key = node.op_type
        if key == "MatMul" and node.input[1] in initializers:
            key = "MatMul(weight)"
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("bits_of", [lambda name: 4, lambda name: 8 if "mlp" in name or name == "lm_head" else 4])
def test_graph_computes_the_dequantized_model(tiny_pair, tmp_path, bits_of):
    """With our own rounding handed in, ORT's INT4 graph equals PyTorch with dequantized weights."""
    hf_dir, onnx_dir = tiny_pair
    info = inspect_folder(hf_dir)
    torch_model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    modules = dict(torch_model.named_modules())
    eight_bit = tuple(w.name for w in info.weights if bits_of(w.name) == 8)
    settings = QuantSettings(method="rtn", block_size=16, symmetric=False, accuracy_level=0, eight_bit=eight_bit)
    plan = layer_plan(info, settings)
    precomputed = {}
    with torch.no_grad():
        for weight in info.weights:
            module = modules[weight.name]
            quantized = rtn_quantize(module.weight.numpy(), plan[weight.name], 16, symmetric=False)
            precomputed[weight.name] = quantized
            module.weight.copy_(torch.from_numpy(quantized.dequantize()))  # a tied pair: same values twice
        expected = torch_model(torch.from_numpy(TOKENS)).logits.numpy()
    quantize_onnx(onnx_dir, tmp_path / "int4", info, settings, precomputed=precomputed)
    np.testing.assert_allclose(ort_logits(tmp_path / "int4"), expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "settings",
    [
        QuantSettings(method="rtn", block_size=32, symmetric=True),
        QuantSettings(method="rtn", block_size=16, symmetric=False, eight_bit=("lm_head",)),
        QuantSettings(method="hqq", block_size=32),
        QuantSettings(method="rtn", block_size=128, exclude=("model.layers.0.*",), quantize_embeddings=False),
        QuantSettings(method="rtn", block_size=32, quantize_lm_head=False),
    ],
    ids=["rtn-sym", "rtn-asym-8bit-head", "hqq", "block128-exclude-layer0", "fp32-head"],
)
def test_every_planned_weight_is_quantized_and_sizes_match_the_estimate(tiny_pair, tmp_path, settings):
    hf_dir, onnx_dir = tiny_pair
    info = inspect_folder(hf_dir)
    result = quantize_onnx(onnx_dir, tmp_path / "int4", info, settings)
    plan = layer_plan(info, settings)
    assert result.layer_bits == {name: plan[name] for name in result.layer_bits}
    assert set(result.layer_bits) == {w.name for w in info.weights}

    counts = op_counts(tmp_path / "int4")
    matmul_weights = [w for w in info.weights if w.role != "embeddings"]
    quantized = sum(1 for w in matmul_weights if plan[w.name])
    assert counts.get("MatMulNBits", 0) == quantized
    kept_fp32 = sum(1 for w in matmul_weights if not plan[w.name])
    tied_fp32_head = info.tied_embeddings and not plan["lm_head"]  # reads the embedding via Transpose
    assert counts.get("MatMul(weight)", 0) == kept_fp32 - tied_fp32_head
    assert counts.get("GatherBlockQuantized", 0) == (1 if plan["model.embed_tokens"] else 0)

    measured, estimated = graph_sizes(tmp_path / "int4", info), estimate_int4(info, settings)
    for component in ("embeddings", "lm_head"):
        assert abs(measured[component] - estimated[component]) <= 0.03 * estimated[component] + 64
    biases = sum(w.rows for w in info.weights) * 4  # q/k/v biases of qwen2 count as layers in the graph
    assert estimated["layers"] <= measured["layers"] <= estimated["layers"] + biases

    original, int4 = ort_logits(onnx_dir), ort_logits(tmp_path / "int4")
    relative_error = np.linalg.norm(int4 - original) / np.linalg.norm(original)
    assert relative_error < 0.5, relative_error


def test_tied_lm_head_shares_the_embedding_tensor(tiny_llama, tiny_llama_onnx, tmp_path):
    info = inspect_folder(tiny_llama)
    assert info.tied_embeddings
    result = quantize_onnx(tiny_llama_onnx, tmp_path / "int4", info, QuantSettings())
    assert result.shared_embeddings
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/"))
    assert gather.input[0] == head.input[1]
    assert not any(i.name == "model.embed_tokens.weight" for i in model.graph.initializer)


def test_layer_plan_gives_a_tied_pair_one_width(tiny_llama):
    info = inspect_folder(tiny_llama)
    plan = layer_plan(info, QuantSettings(eight_bit=("lm_head",)))
    assert plan["lm_head"] == plan["model.embed_tokens"] == 8
    assert plan["model.layers.1.mlp.down_proj"] == 4
    plan = layer_plan(info, QuantSettings(quantize_lm_head=False))
    assert plan["lm_head"] is None and plan["model.embed_tokens"] == 4
