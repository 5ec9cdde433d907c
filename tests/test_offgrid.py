"""The off-grid reference keeps the function and moves the weights, on tiny random models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from models import build_model
from workbench.quantization.blockquant import rtn_quantize
from workbench.errors import JobCancelled, WorkbenchError
from workbench.quality.offgrid import build_offgrid_reference, max_logit_difference, random_orthogonal, rotate_residual_stream


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    path = build_model(tmp_path_factory.mktemp(request.param), request.param)
    # Norm gains start at 1, which would leave their folding untested.
    model = AutoModelForCausalLM.from_pretrained(path)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def original(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def random_ids(model, length=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, length), generator=generator)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(32, seed=3)
    assert torch.allclose(q.T @ q, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, random_orthogonal(32, seed=3))
    assert not torch.equal(q, random_orthogonal(32, seed=4))


def test_rotation_keeps_logits(original):
    rotated = rotate_residual_stream(original, seed=0)
    assert max_logit_difference(original, rotated, random_ids(original)) < 1e-4


def test_rotation_moves_weights_and_leaves_source_alone(original):
    before = {name: p.clone() for name, p in original.named_parameters()}
    rotated = rotate_residual_stream(original, seed=0)
    for name, p in original.named_parameters():
        assert torch.equal(p, before[name]), f"{name} of the source changed"

    source = dict(original.named_parameters(remove_duplicate=False))
    for name, p in rotated.named_parameters():
        if p.dim() == 2:
            assert not torch.allclose(p, source[name], atol=1e-3), f"{name} did not move"
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p))
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    assert rotated.config.tie_word_embeddings is False


def rtn_error(weight: torch.Tensor) -> float:
    """Relative error of a symmetric 4-bit block-32 round trip."""
    values = weight.detach().numpy()
    restored = rtn_quantize(values, bits=4, block_size=32, symmetric=True).dequantize()
    return float(np.linalg.norm(restored - values) / np.linalg.norm(values))


def test_weights_on_a_4bit_grid_leave_it(original):
    on_grid = copy.deepcopy(original)
    with torch.no_grad():
        for layer in on_grid.model.layers:
            for linear in (layer.self_attn.q_proj, layer.mlp.down_proj):
                restored = rtn_quantize(linear.weight.numpy(), bits=4, block_size=32, symmetric=True).dequantize()
                linear.weight.copy_(torch.from_numpy(restored))
    rotated = rotate_residual_stream(on_grid, seed=0)
    for before, after in zip(on_grid.model.layers, rotated.model.layers, strict=True):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            assert rtn_error(before.get_submodule(name).weight) < 1e-6
            assert rtn_error(after.get_submodule(name).weight) > 0.05


def test_biases_keep_logits(original):
    """Qwen2's q/k/v biases (readers) stay; writers' biases (Llama's attention_bias, mlp_bias) rotate."""
    with_bias = copy.deepcopy(original)
    hidden = original.config.hidden_size
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in with_bias.model.layers:
            layer.self_attn.o_proj.bias = nn.Parameter(0.1 * torch.randn(hidden, generator=generator))
            layer.mlp.down_proj.bias = nn.Parameter(0.1 * torch.randn(hidden, generator=generator))
    rotated = rotate_residual_stream(with_bias, seed=0)
    assert max_logit_difference(with_bias, rotated, random_ids(with_bias)) < 1e-4
    for before, after in zip(with_bias.model.layers, rotated.model.layers, strict=True):
        assert not torch.allclose(before.mlp.down_proj.bias, after.mlp.down_proj.bias, atol=1e-3)
        if before.self_attn.q_proj.bias is not None:
            assert torch.equal(before.self_attn.q_proj.bias, after.self_attn.q_proj.bias)


def test_build_saves_a_loadable_untied_folder(model_dir, original, tmp_path):
    reported = []
    dest = build_offgrid_reference(model_dir, tmp_path / "offgrid", progress=lambda f, m: reported.append(f))
    assert reported[-1] == 1.0 and reported == sorted(reported)
    assert (dest / "tokenizer.json").is_file() and (dest / "model.safetensors").is_file()
    assert (dest / "chat_template.jinja").is_file() or "chat_template" in (dest / "tokenizer_config.json").read_text()

    loaded = AutoModelForCausalLM.from_pretrained(dest)
    assert loaded.config.tie_word_embeddings is False
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert max_logit_difference(original, loaded, random_ids(original)) < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["offgrid"]


def test_build_refuses_existing_destination(model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(WorkbenchError, match="already exists"):
        build_offgrid_reference(model_dir, tmp_path / "taken")


def test_cancel_leaves_no_folder(model_dir, tmp_path):
    with pytest.raises(JobCancelled):
        build_offgrid_reference(model_dir, tmp_path / "offgrid", cancelled=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_cancel_after_saving_removes_the_partial_folder(model_dir, tmp_path):
    messages = []
    with pytest.raises(JobCancelled):
        build_offgrid_reference(
            model_dir,
            tmp_path / "offgrid",
            progress=lambda fraction, message: messages.append(message),
            cancelled=lambda: "saving" in messages,
        )
    assert list(tmp_path.iterdir()) == []


def test_layer_norm_is_refused(original):
    broken = original.__class__(original.config)
    broken.model.norm = nn.LayerNorm(original.config.hidden_size)
    with pytest.raises(WorkbenchError, match="LayerNorm"):
        rotate_residual_stream(broken)


def test_gemma_style_norm_is_refused(original):
    class OnePlusGainNorm(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(size))

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    broken = original.__class__(original.config)
    broken.model.layers[0].input_layernorm = OnePlusGainNorm(original.config.hidden_size)
    with pytest.raises(WorkbenchError, match="rms"):
        rotate_residual_stream(broken)
