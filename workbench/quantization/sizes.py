"""The INT4 model's size per component, estimated from the weight shapes before anything is written."""

from __future__ import annotations

from workbench.quantization.int4_graph import layer_plan, quantized_bytes, zero_point_kind
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo

COMPONENTS = ("layers", "embeddings", "lm_head", "other")


def estimate_int4(info: ModelInfo, settings: QuantSettings) -> dict[str, int]:
    """Bytes per component the INT4 model will have with these settings, from the weight shapes.

    Layers chosen by sensitivity are not in it: they are known only once measured (see int4_bytes).
    """
    plan = layer_plan(info, settings)
    sizes = dict.fromkeys(COMPONENTS, 0)
    sizes["other"] = info.other_parameters * 4
    pair = [w for w in info.weights if w.role in ("embeddings", "lm_head")]
    shared = info.tied_embeddings and len({plan[w.name] for w in pair}) == 1
    for weight in info.weights:
        bits = plan[weight.name]
        if bits is None:
            fp32 = weight.rows * weight.cols * 4
            sizes[weight.role] += 0 if shared and weight.role == "lm_head" else fp32
            continue
        gathered = weight.role == "embeddings" or (shared and weight.role == "lm_head")
        zero_points = zero_point_kind(settings, for_gather=gathered)
        if weight.role == "embeddings" and zero_points == "packed":
            zero_points = "byte"
        packed, overhead = quantized_bytes(weight.rows, weight.cols, bits, settings.block_size, zero_points)
        # A tied lm_head reads the embeddings' packed values; only its scales are its own.
        sizes[weight.role] += overhead + (0 if shared and weight.role == "lm_head" else packed)
    return sizes


def int4_bytes(info: ModelInfo, settings: QuantSettings) -> int:
    """The INT4 model's total size, counting the whole budget of sensitive 8-bit layers: the greedy
    choice fills it to within one layer."""
    return int(sum(estimate_int4(info, settings).values()) * (1 + settings.sensitive_8bit_pct / 100))
