"""The fused decoder graph written straight from the weights: one base class, small overrides per family.

Like ONNX Runtime GenAI's model builder, each architecture's decoder is written as ONNX ops
(SimplifiedLayerNormalization, MatMul or MatMulNBits, GroupQueryAttention with rotary), already
fused, with the interface the workbench's engine and optimum's fused graphs share (input_ids,
attention_mask, position_ids, past_key_values.N.*, logits_to_keep; logits, present.N.*). Unlike
it, the weights stream: each tensor is read from the safetensors shards in row chunks, quantized
(or transposed) and appended to model.onnx.data before the next one is read, so peak memory
follows the largest tensor, not the model.

Node and tensor names are those of the optimum export and the INT4 pass (`/model/layers.0/mlp/
down_proj/MatMul`, `model.layers.0.mlp.down_proj.weight_Q4`), so name-based layer mapping (sizes
per component, sensitivity, reports) reads both alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.builder.tensors import ExternalData, SafetensorsWeights
from exporters.optimize import (
    STATIC_ROPE_TYPES,
    keep_last_logits,
    rope_type_of,
    shared_inputs,
    rotary_caches,
)
from workbench.errors import WorkbenchError
from workbench.generation.engine import FUSED_KEY, FUSED_VALUE
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.layout import MODEL_FILE, MS_DOMAIN, folder_bytes
from workbench.quantization.blockquant import QuantizedWeight, rtn_quantize
from workbench.quantization.int4_graph import (
    QuantizeResult,
    gather_nodes,
    matmul_nodes,
    layer_plan,
    quantize_weight,
    zero_point_kind,
)
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo

log = logging.getLogger(__name__)
OPSET = 18
IR_VERSION = 8  # what optimum's exports carry; every runtime the bundles target reads it


@dataclass(frozen=True)
class WrittenWeight(QuantizedWeight):
    """A quantized weight whose packed values are already in the data file: only scales and zero points
    stay in memory (what the MatMulNBits / GatherBlockQuantized nodes need besides the values)."""

    rows: int = 0

    @property
    def n(self) -> int:
        return self.rows


class DecoderBuilder:
    """The common pre-norm decoder (Llama): RMSNorm, q/k/v projections (biases when the weights have
    them), rotary GroupQueryAttention, o_proj, RMSNorm, SiLU-gated MLP, final RMSNorm, lm_head."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, weights: SafetensorsWeights, data: ExternalData, info: ModelInfo,
                 settings: QuantSettings | None, precomputed: Mapping[str, QuantizedWeight] | None = None):
        self.config = config
        self.precomputed = precomputed or {}
        self.weights = weights
        self.data = data
        self.settings = settings
        self.plan = layer_plan(info, settings) if settings else {}
        self.tied = info.tied_embeddings
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.written: dict[tuple[str, int], tuple[WrittenWeight, str]] = {}  # the tied embeddings, once quantized
        self.layer_bits: dict[str, int | None] = {}
        self.shared = False

    # -- what families override ----------------------------------------------------------------

    def check(self) -> None:
        """Refuse a configuration the graph would compute wrongly, naming what is not supported."""
        config = self.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise self.unsupported(f"activation {config.hidden_act!r}")
        if rope_type_of(config) not in STATIC_ROPE_TYPES:
            raise self.unsupported(f"rotary scaling {rope_type_of(config)!r}")
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            raise self.unsupported("partial rotary embedding")
        if getattr(config, "mlp_bias", False):
            raise self.unsupported("MLP biases")

    def embedding_scale(self) -> float:
        return 1.0

    def residual_scale(self) -> float:
        return 1.0

    def attention_scale(self) -> float:
        return float(self.head_dim) ** -0.5

    def logits_scale(self) -> float:
        """Folded into the final norm's weight: norm(x) * w / s projects to logits / s exactly."""
        return 1.0

    def sliding_window(self) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        if window and getattr(self.config, "use_sliding_window", True):
            return int(window)
        return None

    def rotary(self, layer: int) -> bool:
        return True

    def qk_norm(self, layer: int, q: str, k: str) -> tuple[str, str]:
        return q, k

    # -- the graph -------------------------------------------------------------------------------

    def unsupported(self, what: str) -> WorkbenchError:
        return WorkbenchError(f"The graph builder does not support {what} ({self.config.model_type}).")

    def build(self, progress: Progress, cancelled: Cancelled) -> onnx.ModelProto:
        self.check()
        config = self.config
        graph = helper.make_graph([], "decoder", self.graph_inputs(), self.graph_outputs())
        shared = shared_inputs(graph)  # seqlens_k and total length, from attention_mask
        self.nodes.extend(shared["nodes"])
        self.add(graph.initializer)
        cos, sin = rotary_caches(config)
        self.initializers += [self.data.tensor("gqa_cos_cache", cos), self.data.tensor("gqa_sin_cache", sin)]
        hidden = self.embedding()
        if self.embedding_scale() != 1.0:
            hidden = self.scale("/model/embed_tokens/scale", hidden, self.embedding_scale())
        layers = config.num_hidden_layers
        for layer in range(layers):
            check(cancelled)
            progress(0.05 + 0.85 * layer / layers, f"layer {layer + 1} of {layers}")
            hidden = self.decoder_layer(layer, hidden, shared)
        progress(0.9, "lm_head")
        hidden = self.norm("model.norm", hidden, scale=1.0 / self.logits_scale())
        self.lm_head(hidden)
        graph.ClearField("node")
        graph.node.extend(self.nodes)
        graph.ClearField("initializer")
        graph.initializer.extend(self.initializers)
        keep_last_logits(graph)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="int4-workbench graph builder",
        )
        model.ir_version = IR_VERSION
        model.metadata_props.add(key=FUSED_KEY, value=FUSED_VALUE)
        return model

    def graph_inputs(self) -> list[onnx.ValueInfoProto]:
        ints = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", length]) for name, length in (
            ("input_ids", "sequence_length"), ("attention_mask", "past_sequence_length + sequence_length"),
            ("position_ids", "sequence_length"))]  # position_ids: the usual interface; rotary counts from the mask
        return ints + [
            helper.make_tensor_value_info(f"past_key_values.{layer}.{kind}", TensorProto.FLOAT,
                                          ["batch_size", self.kv_heads, "past_sequence_length", self.head_dim])
            for layer in range(self.config.num_hidden_layers) for kind in ("key", "value")
        ]

    def graph_outputs(self) -> list[onnx.ValueInfoProto]:
        logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                               ["batch_size", "sequence_length", self.config.vocab_size])
        return [logits] + [
            helper.make_tensor_value_info(f"present.{layer}.{kind}", TensorProto.FLOAT,
                                          ["batch_size", self.kv_heads, "past_sequence_length + sequence_length",
                                           self.head_dim])
            for layer in range(self.config.num_hidden_layers) for kind in ("key", "value")
        ]

    def node(self, op: str, inputs: list[str], name: str, *, outputs: tuple[str, ...] = (), domain: str = "",
             **attrs) -> str:
        out = [f"{name}_output_0", *outputs]
        self.nodes.append(helper.make_node(op, inputs, out, name=name, domain=domain, **attrs))
        return out[0]

    def add(self, initializers: list[TensorProto]) -> None:
        """Keep initializers made in memory (scales, zero points) as references to the data file."""
        self.initializers.extend(self.data.externalize(t) for t in initializers)

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.data.tensor(name, value))
        return name

    def scale(self, name: str, x: str, factor: float) -> str:
        return self.node("Mul", [x, self.constant(f"{name}/factor", np.array(factor, np.float32))], name)

    def norm(self, module: str, x: str, scale: float = 1.0) -> str:
        weight = self.weights.read(f"{module}.weight") * np.float32(scale)
        name = "/" + module.replace(".", "/") + "/SimplifiedLayerNormalization"
        return self.node("SimplifiedLayerNormalization", [x, self.constant(f"{module}.weight", weight)], name,
                         axis=-1, epsilon=float(self.config.rms_norm_eps), stash_type=1)

    def decoder_layer(self, layer: int, hidden: str, shared: dict) -> str:
        prefix = f"model.layers.{layer}"
        scope = f"/model/layers.{layer}"
        x = self.norm(f"{prefix}.input_layernorm", hidden)
        q, k, v = (self.linear(f"{prefix}.self_attn.{name}", x) for name in ("q_proj", "k_proj", "v_proj"))
        q, k = self.qk_norm(layer, q, k)
        window = self.sliding_window()
        attention = self.node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", shared["seqlens_k"],
             shared["total_length"], "gqa_cos_cache", "gqa_sin_cache"],
            f"{scope}/self_attn/GroupQueryAttention", outputs=(f"present.{layer}.key", f"present.{layer}.value"),
            domain=MS_DOMAIN, num_heads=self.heads,
            kv_num_heads=self.kv_heads, do_rotary=int(self.rotary(layer)), rotary_interleaved=0,
            scale=self.attention_scale(),
            # Sliding window: the last `window` positions, the current one included (checked against transformers).
            **({"local_window_size": window} if window else {}),
        )
        hidden = self.residual(f"{scope}/Add", hidden, self.linear(f"{prefix}.self_attn.o_proj", attention))
        x = self.norm(f"{prefix}.post_attention_layernorm", hidden)
        return self.residual(f"{scope}/Add_1", hidden, self.mlp(f"{prefix}.mlp", x))

    def residual(self, name: str, hidden: str, update: str) -> str:
        if self.residual_scale() != 1.0:
            update = self.scale(f"{name}/scale", update, self.residual_scale())
        return self.node("Add", [hidden, update], name)

    def mlp(self, prefix: str, x: str) -> str:
        scope = "/" + prefix.replace(".", "/")
        gate = self.linear(f"{prefix}.gate_proj", x)
        activated = self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{scope}/act_fn/Sigmoid")],
                              f"{scope}/act_fn/Mul")
        product = self.node("Mul", [activated, self.linear(f"{prefix}.up_proj", x)], f"{scope}/Mul")
        return self.linear(f"{prefix}.down_proj", product)

    # -- weights ---------------------------------------------------------------------------------

    def bits(self, module: str) -> int | None:
        bits = self.plan.get(module) if self.settings else None
        self.layer_bits[module] = bits
        return bits

    def linear(self, module: str, x: str, source: str | None = None, output: str | None = None) -> str:
        """x @ W.T (+ b) for the (N, K) weight `source` (default `module`.weight)."""
        source = source or f"{module}.weight"
        name = "/" + module.replace(".", "/") + "/MatMul"
        out = output or f"{name}_output_0"
        bits = self.bits(module)
        bias = f"{module}.bias" in self.weights
        matmul_out = f"{name}_matmul" if bias else out
        if bits:
            weight, packed = self.quantized(module, source, bits, for_gather=False)
            fp32 = helper.make_node("MatMul", [x, ""], [matmul_out], name=name)
            nodes, initializers = matmul_nodes(fp32, weight, packed, module, self.settings.accuracy_level)
            self.nodes.extend(nodes)
            self.add(initializers)
        else:
            n, k = self.weights.shape(source)
            transposed = self.data.chunked(f"{module}.weight_transposed", np.float32, (k, n),
                                           self.weights.transposed_chunks(source))
            self.initializers.append(transposed)
            self.nodes.append(helper.make_node("MatMul", [x, transposed.name], [matmul_out], name=name))
        if bias:
            bias_name = self.constant(f"{module}.bias", self.weights.read(f"{module}.bias"))
            self.nodes.append(helper.make_node("Add", [matmul_out, bias_name], [out],
                                               name="/" + module.replace(".", "/") + "/Add"))
        return out

    def quantized(self, module: str, source: str, bits: int, *, for_gather: bool) -> tuple[WrittenWeight, str]:
        """Quantize `source` row chunk by row chunk into the data file (once, however many nodes read it)."""
        if (source, bits) in self.written:
            self.shared = True
            return self.written[(source, bits)]
        settings = self.settings
        rows, cols = self.weights.shape(source)
        kind = zero_point_kind(settings, for_gather=for_gather)
        if module in self.precomputed:  # GPTQ's
            chunks = iter([self.precomputed[module]])
        elif kind == "float":  # HQQ's solver stops on the error of the whole tensor: quantize it at once
            chunks = iter([quantize_weight(self.weights.read(source), bits, settings, for_gather=for_gather)])
        else:  # round-to-nearest works row by row, so chunks of rows give the same values
            chunks = (rtn_quantize(chunk, bits, settings.block_size, symmetric=kind == "none")
                      for chunk in self.weights.row_chunks(source))
        scales, zero_points = [], []

        def packed_chunks():
            for chunk in chunks:
                scales.append(chunk.scales)
                zero_points.append(chunk.zero_points)
                yield chunk.packed()

        blocks = -(-cols // settings.block_size)
        packed_name = f"{module}.weight_Q{bits}"
        self.initializers.append(self.data.chunked(
            packed_name, np.uint8, (rows, blocks, settings.block_size * bits // 8), packed_chunks()))
        weight = WrittenWeight(
            q=None, scales=np.concatenate(scales), bits=bits, block_size=settings.block_size, k=cols, rows=rows,
            zero_points=None if zero_points[0] is None else np.concatenate(zero_points),
        )
        if self.tied and source == "model.embed_tokens.weight":  # the lm_head reads it again
            self.written[(source, bits)] = (weight, packed_name)
        return weight, packed_name

    def embedding(self) -> str:
        module = "model.embed_tokens"
        name = "/model/embed_tokens/Gather"
        bits = self.bits(module)
        if bits:
            weight, packed = self.quantized(module, f"{module}.weight", bits, for_gather=True)
            gather = helper.make_node("Gather", ["", "input_ids"], [f"{name}_output_0"], name=name)
            nodes, initializers = gather_nodes(gather, weight, packed, module)
            self.nodes.extend(nodes)
            self.add(initializers)
            return f"{name}_output_0"
        rows, cols = self.weights.shape(f"{module}.weight")
        self.initializers.append(self.data.chunked(f"{module}.weight", np.float32, (rows, cols),
                                                   self.weights.row_chunks(f"{module}.weight")))
        return self.node("Gather", [f"{module}.weight", "input_ids"], name, axis=0)

    def lm_head(self, hidden: str) -> None:
        source = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        bits = self.plan.get("lm_head") if self.settings else None
        if self.tied and not bits and not self.layer_bits.get("model.embed_tokens"):
            # Both fp32: read the embeddings through a Transpose, as the optimum export does.
            self.layer_bits["lm_head"] = None
            transposed = self.node("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])
            self.nodes.append(helper.make_node("MatMul", [hidden, transposed], ["logits"], name="/lm_head/MatMul"))
            return
        self.linear("lm_head", hidden, source=source, output="logits")


class Llama(DecoderBuilder):
    model_types = ("llama", "mistral")


class Qwen2(DecoderBuilder):
    """q/k/v biases (read from the weights); a sliding window only where use_sliding_window says so."""

    model_types = ("qwen2",)

    def sliding_window(self) -> int | None:
        return super().sliding_window() if getattr(self.config, "use_sliding_window", False) else None


class Qwen3(Qwen2):
    """RMSNorm over each head of q and k before the rotary embedding."""

    model_types = ("qwen3",)

    def qk_norm(self, layer: int, q: str, k: str) -> tuple[str, str]:
        normed = []
        for name, heads, x in (("q_norm", self.heads, q), ("k_norm", self.kv_heads, k)):
            module = f"model.layers.{layer}.self_attn.{name}"
            scope = "/" + module.replace(".", "/")
            split = self.node("Reshape", [x, self.constant(f"{scope}/heads", np.array([0, 0, heads, self.head_dim], np.int64))],
                              f"{scope}/Reshape")
            merged = self.constant(f"{scope}/merged", np.array([0, 0, heads * self.head_dim], np.int64))
            normed.append(self.node("Reshape", [self.norm(module, split), merged], f"{scope}/Reshape_1"))
        return normed[0], normed[1]


class Granite(DecoderBuilder):
    """Llama with multipliers on the embeddings, the residual updates, attention scores and logits."""

    model_types = ("granite",)

    def embedding_scale(self) -> float:
        return float(self.config.embedding_multiplier)

    def residual_scale(self) -> float:
        return float(self.config.residual_multiplier)

    def attention_scale(self) -> float:
        return float(self.config.attention_multiplier)

    def logits_scale(self) -> float:
        return float(self.config.logits_scaling)


class SmolLM3(DecoderBuilder):
    """Llama where the layers `no_rope_layers` marks 0 attend without the rotary embedding."""

    model_types = ("smollm3",)

    def rotary(self, layer: int) -> bool:
        return bool(self.config.no_rope_layers[layer])

    def sliding_window(self) -> int | None:
        return super().sliding_window() if getattr(self.config, "use_sliding_window", False) else None


FAMILIES: dict[str, type[DecoderBuilder]] = {
    model_type: family for family in (Llama, Qwen2, Qwen3, Granite, SmolLM3) for model_type in family.model_types
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def supports(model_dir: Path, model_type: str) -> str | None:
    """None when the builder can write this model, else why not (for the fallback's log line)."""
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if not any(Path(model_dir).glob("*.safetensors")):
        return "the weights are not in safetensors files"
    return None


def build_decoder(
    model_dir: Path,
    dest: Path,
    info: ModelInfo,
    settings: QuantSettings | None,
    *,
    precomputed: Mapping[str, QuantizedWeight] | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> QuantizeResult:
    """Write `dest`/model.onnx (+ model.onnx.data) from the safetensors in `model_dir`, with the side files.

    `settings` None writes the unquantized float32 graph (the original); otherwise the INT4 graph
    as the INT4 pass would write it from an fp32 export: `precomputed` quantized weights by module
    name (GPTQ), data-free rounding (RTN or HQQ) for the rest.
    """
    from transformers import AutoConfig

    from workbench.quantization.int4_graph import copy_side_files

    config = AutoConfig.from_pretrained(model_dir)
    why_not = supports(model_dir, config.model_type)
    if why_not:
        raise WorkbenchError(f"The graph builder cannot write this model: {why_not}.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    data = ExternalData(dest, f"{MODEL_FILE}.data")
    try:
        builder = FAMILIES[config.model_type](config, SafetensorsWeights(model_dir), data, info, settings,
                                              precomputed)
        model = builder.build(progress, cancelled)
    finally:
        data.close()
    progress(0.95, "saving")
    onnx.save_model(model, str(dest / MODEL_FILE))
    copy_side_files(Path(model_dir), dest)
    return QuantizeResult(
        bytes=folder_bytes(dest),
        layer_bits=builder.layer_bits,
        shared_embeddings=builder.shared,
    )
