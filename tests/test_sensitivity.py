"""Sensitivity of each linear to 4 bits: model untouched, sensible ranking, choice within budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import calibration_ids, leftovers
from models import build_model
from workbench.quantization.blockquant import rtn_quantize
from workbench.errors import JobCancelled
from workbench.quantization.sizes import estimate_int4
from workbench.run.pipeline import quantize_run
from workbench.quantization.int4_graph import module_name
from workbench.run.folders import load_run
from workbench.quantization.sensitivity import choose_eight_bit, measure_sensitivity, with_eight_bit
from workbench.settings import QuantSettings
from workbench.sources import inspect_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("sensitivity") / "model", "qwen2")


@pytest.fixture
def model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def linears(model):
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def exact_kl(model, ids, name, block_size=32):
    """The KL the estimate stands for: rerun the whole model with only `name` rounded."""
    module = dict(model.named_modules())[name]
    original = module.weight.detach().clone()
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits, -1)
        module.weight.copy_(torch.from_numpy(rtn_quantize(original.numpy(), 4, block_size, True).dequantize()))
        log_q = torch.log_softmax(model(input_ids=ids).logits, -1)
        module.weight.copy_(original)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_estimate_matches_the_measured_kl_and_leaves_the_model_alone(model):
    ids = calibration_ids(model, samples=4, tokens=32)
    before = snapshot(model)
    names = linears(model)
    kl = measure_sensitivity(model, ids, names, block_size=32, symmetric=True, probes=32)
    assert_unchanged(model, before)
    assert set(kl) == set(names) and all(v >= 0 for v in kl.values())
    for name in sorted(kl, key=kl.get)[-3:]:  # second order: close for the layers that matter
        assert kl[name] == pytest.approx(exact_kl(model, ids, name), rel=0.5), name


def test_a_layer_made_sensitive_ranks_first(model):
    name = "model.layers.1.mlp.up_proj"
    layer = model.model.layers[1]
    with torch.no_grad():
        # Input channels 0 and 32 are switched off, so huge weights there change nothing until
        # rounding: then every other weight of their blocks rounds to zero.
        layer.post_attention_layernorm.weight[[0, 32]] = 0
        layer.mlp.up_proj.weight[:, [0, 32]] = 100
    kl = measure_sensitivity(model, calibration_ids(model), linears(model), block_size=32, symmetric=True)
    assert max(kl, key=kl.get) == name


@pytest.mark.parametrize("stop_after", [1, 5, 20, 40])
def test_cancel_at_any_point_leaves_the_model_alone(model, stop_after):
    before = snapshot(model)
    calls = []

    def cancelled():
        calls.append(1)
        return len(calls) >= stop_after

    with pytest.raises(JobCancelled):
        measure_sensitivity(model, calibration_ids(model), linears(model), block_size=32, symmetric=True,
                            cancelled=cancelled)
    assert_unchanged(model, before)


@pytest.mark.parametrize("pct", [0.0, 3.0, 20.0])
def test_the_choice_respects_the_byte_budget(folder, pct):
    info = inspect_folder(folder)
    settings = QuantSettings(sensitive_8bit_pct=pct)
    kl = {w.name: float(i + 1) for i, w in enumerate(info.weights) if w.role != "embeddings"}
    section = choose_eight_bit(info, settings, kl)
    base = sum(estimate_int4(info, settings).values())
    chosen = [entry["layer"] for entry in section["chosen"]]
    grown = sum(estimate_int4(info, with_eight_bit(settings, chosen)).values())
    assert grown - base == section["extra_bytes"] <= section["budget_bytes"] == int(base * pct / 100)
    assert bool(chosen) == (pct > 0)
    assert [e["rank"] for e in section["top"]] == list(range(1, len(section["top"]) + 1))


def test_quantize_keeps_the_sensitive_layers_at_8_bits(folder, tmp_path):
    import onnx

    settings = QuantSettings(method="rtn", sensitive_8bit_pct=30, calibration_samples=4, calibration_tokens=32)
    record = quantize_run(str(folder), tmp_path / "run", settings)
    section = load_run(tmp_path / "run").sensitivity
    chosen = [entry["layer"] for entry in section["chosen"]]
    assert chosen and section["tokens"] == 128 and section["layers"] == 15
    assert "sensitivity" in record.timings_s and record.calibration == "self-written (data-free)"
    graph = onnx.load(str(tmp_path / "run" / "int4" / "model.onnx"), load_external_data=False).graph
    bits = {module_name(n.name): next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}
    assert {name for name, b in bits.items() if b == 8} == set(chosen)
    report = (tmp_path / "run" / "report.md").read_text()
    for entry in section["chosen"]:
        assert f"`{entry['layer']}`: changing only this layer to INT4" in report
        assert f"largest of {section['layers']}" in report
    assert leftovers(tmp_path) == []
