"""GGUFs of Phi-3, Qwen3, Gemma 2 and Gemma 3 as llama.cpp writes them read as their originals: what
transformers' GGUF config reader drops (rotary scaling, partial rotary, LongRoPE's factor tensors, head size,
soft caps, Gemma's query scale) is in the source's config, and the builder's graph gives the original's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import write_gguf
from models import build_extra_model
from safetensors.numpy import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    Phi3Config,
    Qwen3Config,
)

from exporters.builder import build_decoder
from exporters.builder.tensors import open_weights
from workbench.errors import WorkbenchError
from workbench.generation.engine import CausalLM, GenerationConfig, generate
from workbench.gguf_config import gguf_config
from workbench.sources import inspect_folder, resolve, weights_folder

# Past each model's original length (32 or 64), where LongRoPE takes its long factors and YaRN's and linear
# scaling's slower frequencies have turned far enough to show.
PROMPT = np.random.default_rng(5).integers(3, 380, (1, 120))
LOGITS_ATOL = 1e-4  # an fp32 graph against PyTorch in fp32: as tests/test_builder.py
NEW_TOKENS = 8
ORIGINAL = 32


def _phi3_longrope(path: Path) -> Path:
    """Phi-4-mini's shape of rotary: LongRoPE over three quarters of each head, a longer context than trained."""
    rotary = int(0.75 * 64) // 2  # heads of 64: 48 rotary dimensions, 24 frequencies
    return build_extra_model(
        path, Phi3Config, hidden_size=128, num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.75,
        tie_word_embeddings=False, sliding_window=None, original_max_position_embeddings=ORIGINAL,
        rope_scaling={"type": "longrope", "short_factor": np.linspace(1.0, 2.5, rotary).round(3).tolist(),
                      "long_factor": np.linspace(1.0, 12.0, rotary).round(3).tolist()})


# Each family with what transformers' GGUF reader alone leaves out of its config (the keys compared), beyond
# the default: Phi-3-mini-4k's sliding window too; a Qwen3 head size other than hidden / heads (transformers
# takes Qwen3's 128); Gemma's query scale as llama.cpp takes it (the head size, not transformers' 256), soft caps
# small enough to bite, windows shorter than the prompt, Gemma 3's linear scaling of its global layer (the
# sixth: llama.cpp's fixed pattern).
FAMILIES = {
    "phi3-longrope": (_phi3_longrope, ("rope_scaling", "partial_rotary_factor", "original_max_position_embeddings",
                                       "sliding_window")),
    "phi3-window": (lambda p: build_extra_model(p, Phi3Config, tie_word_embeddings=False, sliding_window=5,
                                                original_max_position_embeddings=256),
                    ("sliding_window", "original_max_position_embeddings")),
    "qwen3-yarn": (lambda p: build_extra_model(
        p, Qwen3Config, head_dim=32, tie_word_embeddings=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2 * ORIGINAL}),
        ("rope_scaling", "head_dim")),
    "gemma2": (lambda p: build_extra_model(p, Gemma2Config, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                           attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
               ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window")),
    "gemma3": (lambda p: build_extra_model(p, Gemma3TextConfig, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                                           num_hidden_layers=6, rope_scaling={"rope_type": "linear", "factor": 8.0}),
               ("rope_scaling", "query_pre_attn_scalar", "rope_local_base_freq", "sliding_window")),
    # Written as Llama, read as Llama: nothing dropped (llama.cpp has no sliding window for it either).
    "mistral": (lambda p: build_extra_model(p, MistralConfig, tie_word_embeddings=False, sliding_window=None), ()),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """A family's name, its tiny HF folder and its fp32 GGUF as llama.cpp's converter writes it."""
    hf_dir = FAMILIES[request.param][0](tmp_path_factory.mktemp(request.param) / "model")
    return request.param, hf_dir, write_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf")


def _approx(value):
    """`value` to compare with what a GGUF stored in float32: numbers within float32, a rope_scaling's too."""
    if isinstance(value, dict):
        return {key: _approx(item) for key, item in value.items()}
    return pytest.approx(value, rel=1e-7) if isinstance(value, (int, float, list)) else value


def _reference(hf_dir: Path, **config) -> tuple[np.ndarray, list[int]]:
    """transformers' logits and greedy tokens on the original (eager attention: soft caps applied)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager",
                                                 **config).eval()
    ids = torch.as_tensor(PROMPT)
    with torch.no_grad():
        logits = model(ids).logits.numpy()
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, PROMPT.shape[1]:]
    return logits, tokens.tolist()


def test_a_gguf_of_each_family_reads_as_its_original(family, tmp_path):
    """The source's config has the original's values where transformers' reader drops them (without them the
    original's logits are far off), its tensors are the original's, and the builder's fp32 graph gives the
    original's logits and greedy tokens."""
    name, hf_dir, path = family
    source = resolve(str(path)).path
    config, original = AutoConfig.from_pretrained(source), AutoConfig.from_pretrained(hf_dir)
    kept = FAMILIES[name][1]
    for key in kept:
        assert getattr(config, key) == _approx(getattr(original, key)), key

    weights, expected = open_weights(source), load_file(hf_dir / "model.safetensors")
    assert set(weights.shapes) == set(expected)
    for tensor, values in expected.items():  # Gemma's norms, stored as 1 + w in float32, less 1 again
        atol = 2e-7 if name.startswith("gemma") and tensor.endswith("norm.weight") else 0
        np.testing.assert_allclose(weights.read(tensor), values, rtol=0, atol=atol, err_msg=tensor)

    reference, reference_tokens = _reference(hf_dir)
    alone = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if kept:
        dropped, _ = _reference(hf_dir, **{key: getattr(alone, key, None) for key in kept if key != "head_dim"})
        assert np.abs(dropped - reference).max() > 100 * LOGITS_ATOL  # what the reader drops shows in the logits

    build_decoder(source, tmp_path / "built", inspect_folder(source), None)
    model = CausalLM(str(tmp_path / "built" / "model.onnx"), context_length=PROMPT.shape[1] + NEW_TOKENS)
    np.testing.assert_allclose(model.forward(PROMPT)[0], reference, atol=LOGITS_ATOL, rtol=0)
    assert generate(model, PROMPT[0].tolist(), GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens == reference_tokens


def test_the_fp32_conversion_of_each_family_is_its_original(family):
    """transformers' conversion (AWQ, the sensitivity search, the off-grid reference) with the source's config:
    Phi-3's fused q/k/v and gate/up matrices named as its own, the LongRoPE factor tensors no weight."""
    _, hf_dir, path = family
    ids = torch.as_tensor(PROMPT)
    with torch.no_grad():
        converted = AutoModelForCausalLM.from_pretrained(weights_folder(resolve(str(path)).path), dtype=torch.float32,
                                                         attn_implementation="eager").eval()(ids).logits.numpy()
    np.testing.assert_allclose(converted, _reference(hf_dir)[0], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("scaling, refused", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "extrapolation_factor": 0.5},
     "YaRN extrapolation factor is 0.5"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 16, "long_factor": [2.0] * 16},
     "rotary scaling is 'longrope'"),
], ids=["yarn-extrapolation", "longrope-without-factors"])
def test_a_rotary_scaling_the_workbench_cannot_reproduce_is_refused(scaling, refused, tmp_path):
    """A scaling llama.cpp's converter writes that no config here reproduces: refused, never dropped."""
    hf_dir = build_extra_model(tmp_path / "model", Qwen3Config, head_dim=32, rope_scaling=scaling)
    path = write_gguf(hf_dir, tmp_path / "refused.gguf")
    with pytest.raises(WorkbenchError, match=f"refused.gguf describes .* {refused}.* Hugging Face folder"):
        resolve(str(path))


# Gemma 2 2B, 9B, 27B and Gemma 3 1B, 27B: (GGUF architecture, layers, hidden size, heads, head size) and the
# query_pre_attn_scalar of their config.json, which no GGUF key holds.
GEMMAS = [(("gemma2", 26, 2304, 8, 256), 256), (("gemma2", 42, 3584, 16, 256), 256),
          (("gemma2", 46, 4608, 32, 128), 144), (("gemma3", 26, 1152, 4, 256), 256),
          (("gemma3", 62, 5376, 32, 128), 168)]


@pytest.mark.parametrize("shape, scalar", GEMMAS)
def test_gemmas_query_scale_is_llama_cpps(shape, scalar):
    architecture, layers, hidden, heads, head_dim = shape
    config = (Gemma2Config if architecture == "gemma2" else Gemma3TextConfig)(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim)
    updates = gguf_config(architecture, {"attention.key_length": head_dim}, lambda name: None, config)
    assert updates["query_pre_attn_scalar"] == scalar
