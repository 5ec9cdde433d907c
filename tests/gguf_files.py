"""Tiny GGUF files written with the gguf package's writer, from the tiny HF models of models.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file

# HF tensor name pieces -> GGUF block tensor names (llama.cpp's naming)
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
}


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary layout; transformers undoes this."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


# Architectures llama.cpp's converter writes with LlamaModel (GraniteModel and SmolLM3Model subclass it): q/k rows
# interleaved for its rotary kernel.
LLAMA_CONVERTED = ("llama", "granite", "smollm3")


def write_llama_gguf(hf_dir: Path, path: Path, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
                     rope_freqs: np.ndarray | None = None, add_bos_token: bool | None = None) -> Path:
    """A GGUF of a tiny Llama, Qwen2, Granite or SmolLM3 HF folder (tokenizer included), as llama.cpp's converter
    writes it: the matrices in `qtype`, the norms and biases in fp32, a Llama 3 rope scaling as the rope_freqs
    tensor (or `rope_freqs` given), Granite's multipliers as its four scales (GraniteModel.set_gguf_parameters),
    `add_bos_token` when given (the converter writes it when the model's tokenizer says)."""
    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    architecture = config["model_type"]
    writer = gguf.GGUFWriter(str(path), architecture)
    _add_shape(writer, config)
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if architecture == "granite":  # each only when set, as the converter does
        for add, value in ((writer.add_attention_scale, config.get("attention_multiplier")),
                           (writer.add_embedding_scale, config.get("embedding_multiplier")),
                           (writer.add_residual_scale, config.get("residual_multiplier")),
                           (writer.add_logit_scale, config.get("logits_scaling"))):
            if value:
                add(value)
    _add_tokenizer(writer, hf_dir, config, "gpt2")
    if add_bos_token is not None:
        writer.add_add_bos_token(add_bos_token)
    if rope_freqs is None and (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        rope_freqs = converter_rope_freqs(config)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    _add(writer, "token_embd.weight", weights["model.embed_tokens.weight"], qtype)
    for layer in range(config["num_hidden_layers"]):
        for hf_name, gguf_name in BLOCK_TENSORS.items():
            tensor = weights.get(f"model.layers.{layer}.{hf_name}")
            if tensor is None:
                continue
            if architecture in LLAMA_CONVERTED and gguf_name == "attn_q.weight":
                tensor = _permute(tensor, config["num_attention_heads"])
            elif architecture in LLAMA_CONVERTED and gguf_name == "attn_k.weight":
                tensor = _permute(tensor, config["num_key_value_heads"])
            _add(writer, f"blk.{layer}.{gguf_name}", tensor, qtype)
    _add(writer, "output_norm.weight", weights["model.norm.weight"], qtype)
    if "lm_head.weight" in weights:
        _add(writer, "output.weight", weights["lm_head.weight"], qtype)
    _finish(writer)
    return path


def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, config: dict, model: str) -> None:
    """The tiny byte-level BPE as tokenizer `model` ("gpt2"; "llama", SentencePiece's, with scores)."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    specials = {t["content"] for t in tokenizer["added_tokens"]}
    writer.add_tokenizer_model(model)
    writer.add_token_list([token for token, _ in vocab])
    if model == "llama":
        writer.add_token_scores([-float(index) for index in range(len(vocab))])
    writer.add_token_types([3 if token in specials else 1 for token, _ in vocab])  # 3: control
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])


# GGUF architecture of a model type where they differ: llama.cpp's converter writes Mistral with LlamaModel.
GGUF_ARCHITECTURES = {"mistral": "llama", "gemma3_text": "gemma3"}
SENTENCEPIECE = ("phi3", "gemma2", "gemma3")  # written with SentencePiece's tokenizer keys (set_vocab)


def write_gguf(hf_dir: Path, path: Path, qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """A GGUF of a tiny Phi-3, Qwen2, Qwen3, Gemma 2, Gemma 3 or Mistral HF folder as llama.cpp's converter
    (convert_hf_to_gguf.py) writes it: each family's metadata as its model class writes it (a rotary scaling of
    another type than linear or yarn as only the type), tensor names from
    gguf-py's TensorNameMap, Llama's q/k rows interleaved (Mistral), Gemma's norms stored as 1 + w, Gemma 2's
    lm_head left out, Phi-3's LongRoPE factors as tensors."""
    config = json.loads((hf_dir / "config.json").read_text())
    architecture = GGUF_ARCHITECTURES.get(config["model_type"], config["model_type"])
    writer = gguf.GGUFWriter(str(path), architecture)
    {"phi3": _phi3_parameters, "gemma2": _gemma2_parameters}.get(architecture, _text_parameters)(writer, config)
    if architecture == "llama":  # LlamaModel.set_gguf_parameters, after TextModel's
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    elif architecture == "gemma3":  # Gemma3Model.set_gguf_parameters, after TextModel's
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    _add_tokenizer(writer, hf_dir, config, "llama" if architecture in SENTENCEPIECE else "gpt2")
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, tensor in load_file(hf_dir / "model.safetensors").items():
        if architecture == "gemma2" and hf_name == "lm_head.weight":  # Gemma2Model.filter_tensors
            continue
        if architecture == "llama" and hf_name.endswith("q_proj.weight"):  # LlamaModel.modify_tensors
            tensor = _permute(tensor, config["num_attention_heads"])
        elif architecture == "llama" and hf_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, config["num_key_value_heads"])
        elif architecture.startswith("gemma") and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        _add(writer, names.get_name(hf_name, try_suffixes=(".weight", ".bias")), tensor, qtype)
    if architecture == "phi3":
        _phi3_tensors(writer, config)
    _finish(writer)
    return path


def _add_shape(writer: gguf.GGUFWriter, config: dict) -> None:
    """The model's lengths and counts, which every converter class writes (the key order does not matter)."""
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])


def _text_parameters(writer: gguf.GGUFWriter, config: dict) -> None:
    """TextModel.set_gguf_parameters (Qwen2Model's, Qwen3Model's; LlamaModel and Gemma3Model add to it)."""
    _add_shape(writer, config)
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif kind in ("su", "longrope"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(scaling[key])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _gemma2_parameters(writer: gguf.GGUFWriter, config: dict) -> None:
    """Gemma2Model.set_gguf_parameters: no rotary key (llama.cpp's base of 10000 is Gemma 2's)."""
    _add_shape(writer, config)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def _phi3_rotary(config: dict) -> tuple[int, int, int]:
    """Phi3MiniModel's lengths: max positions, original max positions, rotary dimensions per head."""
    rotary = int(config.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // config["num_attention_heads"]
    return config["max_position_embeddings"], config["original_max_position_embeddings"], rotary


def _phi3_parameters(writer: gguf.GGUFWriter, config: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters (it does not call TextModel's)."""
    longest, original, rotary = _phi3_rotary(config)
    _add_shape(writer, config | {"max_position_embeddings": longest})
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0: none


def _phi3_tensors(writer: gguf.GGUFWriter, config: dict) -> None:
    """Phi3MiniModel.generate_extra_tensors: LongRoPE's attention factor and its two factor tensors."""
    scaling = config.get("rope_scaling") or {}
    if not scaling.get("long_factor"):
        return
    longest, original, _ = _phi3_rotary(config)
    scale = longest / original
    writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0)
    for tensor, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, scaling["long_factor"]),
                            (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, scaling["short_factor"])):
        writer.add_tensor(f"{gguf.TENSOR_NAMES[tensor]}.weight", np.asarray(factors, np.float32))


def converter_rope_freqs(config: dict) -> np.ndarray:
    """What llama.cpp's converter writes for a "llama3" rope_scaling, element by element in float32 as it
    computes it: the divisor of each rotary frequency. Its original length is a top-level
    original_max_position_embeddings or 8192, never rope_scaling's."""
    scaling = config["rope_scaling"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = config.get("original_max_position_embeddings", 8192)
    divisors = []
    for frequency in 1.0 / (config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)):
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            divisors.append(1)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32).numpy()


def _add(writer: gguf.GGUFWriter, name: str, tensor: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    tensor = np.ascontiguousarray(tensor, dtype=np.float32)
    if tensor.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, tensor)
    else:
        writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)


def write_unsupported_gguf(path: Path, architecture: str = "rwkv6") -> Path:
    """A well-formed GGUF of an architecture transformers cannot load."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    _finish(writer)
    return path


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
