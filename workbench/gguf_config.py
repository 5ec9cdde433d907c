"""What a GGUF says of its model's config that transformers' GGUF config reader (4.57) drops.

llama.cpp's converter (convert_hf_to_gguf.py) writes these, and llama.cpp runs the model with them;
transformers' table of config keys (integrations/ggml.py, GGUF_CONFIG_MAPPING) has none of them, so
the config it makes of such a file gives other outputs than the original model:
- rotary scaling, written by TextModel.set_gguf_parameters as `rope.scaling.type` "linear" or "yarn"
  with `.factor` and, for yarn, `.original_context_length` and the optional `.yarn_beta_fast`,
  `.yarn_beta_slow`, `.yarn_attn_factor` (Qwen2.5/Qwen3 with YaRN, Gemma 3's linear scaling of its
  global layers; Gemma 3's local layers' own base is `rope.freq_base_swa` where written);
- Phi-3's (Phi3MiniModel, which writes none of the above): `rope.scaling.original_context_length`
  (Phi3Config's own original_max_position_embeddings), `rope.dimension_count` (the rotary dimensions
  of a partial rotary embedding, Phi-4-mini's), `attention.sliding_window` (0: none), and for LongRoPE
  the factors as the tensors `rope_factors_long.weight` and `rope_factors_short.weight`, with
  `rope.scaling.attn_factor` the attention factor transformers computes itself from the lengths;
- `attention.key_length`, the head size, which transformers reads for Gemma but not for Qwen3;
- Gemma 2's soft caps (`attn_logit_softcapping`, `final_logit_softcapping`). Gemma's
  query_pre_attn_scalar is in no key: llama.cpp takes it as the head size, or hidden size / heads for
  a 27B (src/llama-model.cpp, which tells a 27B by its layer count), so that is what is set here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

ROPE_FACTORS_LONG = "rope_factors_long.weight"  # LongRoPE's factors beyond the original length
ROPE_FACTORS_SHORT = "rope_factors_short.weight"  # and within it
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp's test for a 27B Gemma, whose query scale differs
# The `rope.scaling.` keys read here; "finetuned" changes nothing. Any other one is a scaling not reproduced.
ROPE_SCALING_KEYS = {"type", "factor", "original_context_length", "attn_factor", "yarn_attn_factor",
                     "yarn_beta_fast", "yarn_beta_slow", "yarn_ext_factor", "finetuned"}
ATTN_FACTOR_RTOL = 1e-6  # the file's attention factor is the converter's float, stored in float32


def gguf_config(architecture: str, metadata: dict, tensor: Callable[[str], list[float] | None], config) -> dict:
    """The config attributes to set on transformers' config of a GGUF of `architecture`. `metadata`: the file's
    `{architecture}.` keys, without that prefix; `tensor(name)`: a tensor's values, None where the file has none;
    `config`: transformers' config of the file. ValueError for what no config here reproduces."""
    updates = {}
    if "attention.key_length" in metadata and hasattr(config, "head_dim"):
        updates["head_dim"] = int(metadata["attention.key_length"])
    if "attention.sliding_window" in metadata:
        updates["sliding_window"] = int(metadata["attention.sliding_window"]) or None
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if key in metadata:
            updates[key] = _decimal(metadata[key])
    if architecture in GEMMA_27B_LAYERS:
        head_dim = updates.get("head_dim", config.head_dim)
        updates["query_pre_attn_scalar"] = (config.hidden_size // config.num_attention_heads
                                            if config.num_hidden_layers == GEMMA_27B_LAYERS[architecture] else head_dim)
    if "rope.freq_base_swa" in metadata:
        updates["rope_local_base_freq"] = _decimal(metadata["rope.freq_base_swa"])
    scaling = _rope_scaling(metadata)
    if scaling is not None:
        updates["rope_scaling"] = scaling
    if architecture == "phi3":
        phi3 = _phi3(metadata, tensor, config)
        if "rope_scaling" in phi3 and scaling is not None:
            raise ValueError(f"it has both LongRoPE's factor tensors and a {scaling['rope_type']} rotary scaling")
        updates |= phi3
    return updates


def _rope_scaling(metadata: dict) -> dict | None:
    """The rope_scaling of the generic `rope.scaling.` keys; None where there is none."""
    scaling = {key.removeprefix("rope.scaling."): value for key, value in metadata.items()
               if key.startswith("rope.scaling.")}
    if set(scaling) - ROPE_SCALING_KEYS:
        raise ValueError(f"its rotary scaling has keys the workbench does not reproduce: "
                         f"{', '.join(sorted(set(scaling) - ROPE_SCALING_KEYS))}")
    kind = scaling.get("type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _decimal(scaling["factor"])}
    if kind != "yarn":
        raise ValueError(f"its rotary scaling is {kind!r}, which the workbench does not reproduce")
    if _decimal(scaling.get("yarn_ext_factor", 1.0)) != 1.0:  # transformers' YaRN extrapolates fully: 1
        raise ValueError(f"its YaRN extrapolation factor is {scaling['yarn_ext_factor']}, which transformers' YaRN "
                         "does not have")
    yarn = {"rope_type": "yarn", "factor": _decimal(scaling["factor"]),
            "original_max_position_embeddings": int(scaling["original_context_length"])}
    for key, ours in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                      ("attn_factor", "attention_factor"), ("yarn_attn_factor", "attention_factor")):
        if key in scaling:
            yarn[ours] = _decimal(scaling[key])
    return yarn


def _phi3(metadata: dict, tensor: Callable[[str], list[float] | None], config) -> dict:
    """Phi-3's original length, partial rotary embedding and LongRoPE factors."""
    updates = {}
    original = metadata.get("rope.scaling.original_context_length")
    if original is not None:
        updates["original_max_position_embeddings"] = int(original)
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = int(metadata.get("rope.dimension_count", head_dim))
    if rotary != head_dim:
        updates["partial_rotary_factor"] = rotary / head_dim
    long, short = tensor(ROPE_FACTORS_LONG), tensor(ROPE_FACTORS_SHORT)
    if long is None and short is None:
        return updates
    if long is None or short is None:
        raise ValueError("it has only one of LongRoPE's two factor tensors")
    # Phi3Config holds just these three; transformers computes the attention factor from the lengths.
    updates["rope_scaling"] = {"type": "longrope", "long_factor": [_decimal(v) for v in long],
                               "short_factor": [_decimal(v) for v in short]}
    original = original or config.max_position_embeddings
    scale = config.max_position_embeddings / original
    expected = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
    stored = metadata.get("rope.scaling.attn_factor", expected)
    if not math.isclose(stored, expected, rel_tol=ATTN_FACTOR_RTOL):
        raise ValueError(f"its LongRoPE attention factor is {stored}, not the {expected} transformers computes for "
                         "its lengths")
    return updates


def _decimal(value: float) -> float:
    """The shortest decimal that rounds to this float32: the value the converter was given."""
    import numpy as np

    return float(str(np.float32(value)))
