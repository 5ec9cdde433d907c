"""The fused decoder graph written straight from the weights: one base class, small overrides per family.

Like ONNX Runtime GenAI's model builder, each architecture's decoder is written as ONNX ops
(SimplifiedLayerNormalization, MatMul or MatMulNBits, GroupQueryAttention with rotary), already
fused, with the interface the workbench's engine and optimum's fused graphs share (input_ids,
attention_mask, position_ids, past_key_values.N.*, logits_to_keep; logits, present.N.*). Unlike
it, the weights stream: each tensor is read from the safetensors shards (or the GGUF) in row chunks, quantized
(or transposed) and appended to model.onnx.data before the next one is read, so peak memory
follows the largest tensor, not the model.

Node and tensor names are those of the optimum export and the INT4 pass (`/model/layers.0/mlp/
down_proj/MatMul`, `model.layers.0.mlp.down_proj.weight_Q4`), so name-based layer mapping (sizes
per component, sensitivity, reports) reads both alike.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters.builder.tensors import ExternalData, TensorSource, has_weights, open_weights
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
    activations: ClassVar[tuple[str, ...]] = ("silu",)
    rope_types: ClassVar[tuple[str, ...]] = STATIC_ROPE_TYPES
    norm_offset: ClassVar[float] = 0.0  # Gemma's RMSNorm multiplies by (1 + w): folded into the weight
    pre_mlp_norm: ClassVar[str] = "post_attention_layernorm"
    post_norms: ClassVar[tuple[str, str] | None] = None  # norms of the attention and MLP outputs (Gemma 2/3)

    def __init__(self, config, weights: TensorSource, data: ExternalData, info: ModelInfo,
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
        if self.activation() not in self.activations:
            raise self.unsupported(f"activation {self.activation()!r}")
        if rope_type_of(config) not in self.rope_types:
            raise self.unsupported(f"rotary scaling {rope_type_of(config)!r}")
        rotary_dim = int(self.head_dim * getattr(config, "partial_rotary_factor", 1.0))
        if rotary_dim != self.head_dim and rotary_dim % 16:
            # GroupQueryAttention's cos/sin tables must be a multiple of 8 wide (half the rotated dimensions).
            raise self.unsupported(f"partial rotary embedding over {rotary_dim} of {self.head_dim} dimensions per head "
                                   "(GroupQueryAttention rotates a multiple of 16)")
        if getattr(config, "mlp_bias", False):
            raise self.unsupported("MLP biases")

    def activation(self) -> str:
        return getattr(self.config, "hidden_act", "silu")

    def embedding_scale(self) -> float:
        return 1.0

    def residual_scale(self) -> float:
        return 1.0

    def attention_scale(self) -> float:
        return float(self.head_dim) ** -0.5

    def logits_scale(self) -> float:
        """Folded into the final norm's weight: norm(x) * w / s projects to logits / s exactly."""
        return 1.0

    def sliding_window(self, layer: int) -> int | None:
        """The window of `layer`, as transformers' attention reads it: `layer_types` where the config has
        them (Qwen, SmolLM3, Gemma), otherwise every layer (Mistral, Phi-3)."""
        config = self.config
        window = getattr(config, "sliding_window", None)
        if not window or not getattr(config, "use_sliding_window", True):
            return None
        layer_types = getattr(config, "layer_types", None)
        return int(window) if layer_types is None or layer_types[layer] == "sliding_attention" else None

    def rotary_tables(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The cos/sin tables by name prefix (one unless layers rotate differently)."""
        return {"gqa": rotary_caches(self.config)}

    def rotary_table(self, layer: int) -> str:
        return "gqa"

    def positions(self, shared: dict) -> str:
        """GroupQueryAttention's position_ids: none, so rotary positions count from the mask's first column."""
        return ""

    def final_softcap(self) -> float | None:
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
        for table, (cos, sin) in self.rotary_tables().items():
            self.initializers += [self.data.tensor(f"{table}_cos_cache", cos), self.data.tensor(f"{table}_sin_cache", sin)]
        shared["positions"] = self.positions(shared)
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
        head_output = self.lm_head(hidden)
        graph.ClearField("node")
        graph.node.extend(self.nodes)
        graph.ClearField("initializer")
        graph.initializer.extend(self.initializers)
        keep_last_logits(graph, head_output)
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
        weight = (self.weights.read(f"{module}.weight") + np.float32(self.norm_offset)) * np.float32(scale)
        name = "/" + module.replace(".", "/") + "/SimplifiedLayerNormalization"
        return self.node("SimplifiedLayerNormalization", [x, self.constant(f"{module}.weight", weight)], name,
                         axis=-1, epsilon=float(self.config.rms_norm_eps), stash_type=1)

    def decoder_layer(self, layer: int, hidden: str, shared: dict) -> str:
        prefix = f"model.layers.{layer}"
        scope = f"/model/layers.{layer}"
        x = self.norm(f"{prefix}.input_layernorm", hidden)
        attention = self.linear(f"{prefix}.self_attn.o_proj", self.attention(layer, x, shared))
        if self.post_norms:
            attention = self.norm(f"{prefix}.{self.post_norms[0]}", attention)
        hidden = self.residual(f"{scope}/Add", hidden, attention)
        x = self.norm(f"{prefix}.{self.pre_mlp_norm}", hidden)
        mlp = self.mlp(f"{prefix}.mlp", x)
        if self.post_norms:
            mlp = self.norm(f"{prefix}.{self.post_norms[1]}", mlp)
        return self.residual(f"{scope}/Add_1", hidden, mlp)

    def qkv(self, layer: int, x: str) -> tuple[str, str, str]:
        """GroupQueryAttention's query, key and value inputs (key and value empty for a packed query)."""
        prefix = f"model.layers.{layer}.self_attn"
        q, k, v = (self.linear(f"{prefix}.{name}", x) for name in ("q_proj", "k_proj", "v_proj"))
        q, k = self.qk_norm(layer, q, k)
        return q, k, v

    def attention(self, layer: int, x: str, shared: dict) -> str:
        window = self.sliding_window(layer)
        table = self.rotary_table(layer)
        softcap = getattr(self.config, "attn_logit_softcapping", None)
        return self.node(
            "GroupQueryAttention",
            [*self.qkv(layer, x), f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
             shared["seqlens_k"], shared["total_length"], f"{table}_cos_cache", f"{table}_sin_cache",
             *([shared["positions"]] if shared["positions"] else [])],
            f"/model/layers.{layer}/self_attn/GroupQueryAttention",
            outputs=(f"present.{layer}.key", f"present.{layer}.value"),
            domain=MS_DOMAIN, num_heads=self.heads,
            kv_num_heads=self.kv_heads, do_rotary=int(self.rotary(layer)), rotary_interleaved=0,
            scale=self.attention_scale(),
            # Sliding window: the last `window` positions, the current one included (checked against transformers).
            **({"local_window_size": window} if window else {}),
            # Scores soft-capped before the mask and softmax: cap * tanh(scores / cap), as Gemma 2 trains them.
            **({"softcap": float(softcap)} if softcap else {}),
        )

    def per_head_norms(self, layer: int, q: str, k: str) -> tuple[str, str]:
        """RMSNorm over each head of q and k (Qwen3's and Gemma 3's q_norm / k_norm): ONNX Runtime's CPU
        GroupQueryAttention does not take the norm weights, so reshape to heads, normalise, reshape back."""
        normed = []
        for name, heads, x in (("q_norm", self.heads, q), ("k_norm", self.kv_heads, k)):
            module = f"model.layers.{layer}.self_attn.{name}"
            scope = "/" + module.replace(".", "/")
            split = self.node("Reshape", [x, self.constant(f"{scope}/heads", np.array([0, 0, heads, self.head_dim],
                                                                                      np.int64))], f"{scope}/Reshape")
            merged = self.constant(f"{scope}/merged", np.array([0, 0, heads * self.head_dim], np.int64))
            normed.append(self.node("Reshape", [self.norm(module, split), merged], f"{scope}/Reshape_1"))
        return normed[0], normed[1]

    def residual(self, name: str, hidden: str, update: str) -> str:
        if self.residual_scale() != 1.0:
            update = self.scale(f"{name}/scale", update, self.residual_scale())
        return self.node("Add", [hidden, update], name)

    def mlp(self, prefix: str, x: str) -> str:
        scope = "/" + prefix.replace(".", "/")
        gate, up = self.gate_up(prefix, x)
        product = self.node("Mul", [self.activate(scope, gate), up], f"{scope}/Mul")
        return self.linear(f"{prefix}.down_proj", product)

    def gate_up(self, prefix: str, x: str) -> tuple[str, str]:
        return self.linear(f"{prefix}.gate_proj", x), self.linear(f"{prefix}.up_proj", x)

    def activate(self, scope: str, gate: str) -> str:
        if self.activation() == "gelu_pytorch_tanh":  # ONNX Runtime's FastGelu is GELU's tanh approximation
            return self.node("FastGelu", [gate], f"{scope}/act_fn/FastGelu", domain=MS_DOMAIN)
        return self.node("Mul", [gate, self.node("Sigmoid", [gate], f"{scope}/act_fn/Sigmoid")], f"{scope}/act_fn/Mul")

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

    def lm_head(self, hidden: str) -> str:
        """Project onto the vocabulary; the name of the projection's output (the logits unless capped)."""
        source = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        bits = self.plan.get("lm_head") if self.settings else None
        cap = self.final_softcap()
        output = "/lm_head/logits" if cap else "logits"
        if self.tied and not bits and not self.layer_bits.get("model.embed_tokens"):
            # Both fp32: read the embeddings through a Transpose, as the optimum export does.
            self.layer_bits["lm_head"] = None
            transposed = self.node("Transpose", ["model.embed_tokens.weight"], "/lm_head/Transpose", perm=[1, 0])
            self.nodes.append(helper.make_node("MatMul", [hidden, transposed], [output], name="/lm_head/MatMul"))
        else:
            self.linear("lm_head", hidden, source=source, output=output)
        if cap:  # cap * tanh(logits / cap), on the kept positions only
            tanh = self.node("Tanh", [self.scale("/lm_head/softcap/Div", output, 1.0 / cap)], "/lm_head/softcap/Tanh")
            self.nodes.append(helper.make_node("Mul", [tanh, self.constant("/lm_head/softcap/cap", np.array(
                cap, np.float32))], ["logits"], name="/lm_head/softcap/Mul"))
        return output


class Llama(DecoderBuilder):
    model_types = ("llama", "mistral")


class Qwen2(DecoderBuilder):
    """q/k/v biases (read from the weights); sliding windows on the layers `layer_types` marks."""

    model_types = ("qwen2",)


class Qwen3(Qwen2):
    """RMSNorm over each head of q and k before the rotary embedding."""

    model_types = ("qwen3",)

    def qk_norm(self, layer: int, q: str, k: str) -> tuple[str, str]:
        return self.per_head_norms(layer, q, k)


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


class Phi3(DecoderBuilder):
    """Llama with fused projections: qkv_proj feeds GroupQueryAttention packed, as it is; gate_up_proj is
    one MatMul split in two (one larger MatMul per step instead of two). LongRoPE ("su"): short factors while
    the sequence is within original_max_position_embeddings, long ones beyond, as transformers switches;
    partial rotary embedding (Phi-4-mini) rotates the first dimensions of each head."""

    model_types = ("phi3",)
    rope_types = (*STATIC_ROPE_TYPES, "longrope")

    def qkv(self, layer: int, x: str) -> tuple[str, str, str]:
        return self.linear(f"model.layers.{layer}.self_attn.qkv_proj", x), "", ""

    def gate_up(self, prefix: str, x: str) -> tuple[str, str]:
        fused = self.linear(f"{prefix}.gate_up_proj", x)
        scope = "/" + prefix.replace(".", "/")
        gate, up = f"{scope}/Split_output_0", f"{scope}/Split_output_1"
        self.nodes.append(helper.make_node("Split", [fused], [gate, up], name=f"{scope}/Split", axis=-1,
                                           num_outputs=2))
        return gate, up

    def longrope(self) -> int | None:
        """original_max_position_embeddings where the rotary frequencies switch with the length, else None."""
        if rope_type_of(self.config) != "longrope":
            return None
        return int(getattr(self.config, "original_max_position_embeddings", None)
                   or self.config.max_position_embeddings)

    def rotary_tables(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        original = self.longrope()
        if original is None:
            return super().rotary_tables()
        # One table: the short factors' first `original` positions, then the long factors' positions from 0;
        # a step whose sequence is longer than `original` reads the second part (positions shifted by it).
        short, long = rotary_caches(self.config), rotary_caches(self.config, seq_len=original + 1)
        return {"gqa": tuple(np.concatenate([s[:original], l_]) for s, l_ in zip(short, long))}

    def positions(self, shared: dict) -> str:
        original = self.longrope()
        if original is None:
            return ""
        scope = "/model/longrope/"
        # Rows are right-padded at their real positions: a first prompt counts from 0 in every row, a
        # later step from each row's own length (as GroupQueryAttention does without position_ids).
        one = self.constant(f"{scope}one", np.array(1, np.int64))
        zero = self.constant(f"{scope}zero", np.array(0, np.int64))
        sequence = self.node("Gather", [self.node("Shape", ["input_ids"], f"{scope}Shape"), one], f"{scope}Gather",
                             axis=0)
        steps = self.node("Range", [zero, sequence, one], f"{scope}Range")
        first = self.node("Equal", [shared["total"], sequence], f"{scope}Equal")
        later = self.node("Sub", [shared["lengths"], sequence], f"{scope}Sub")
        start = self.node("Where", [first, zero, later], f"{scope}Where")
        rows = self.node("Unsqueeze", [start, self.constant(f"{scope}axis", np.array([1], np.int64))],
                         f"{scope}Unsqueeze")
        limit = self.constant(f"{scope}original", np.array(original, np.int64))
        is_long = self.node("Cast", [self.node("Greater", [shared["total"], limit], f"{scope}Greater")],
                            f"{scope}Cast", to=TensorProto.INT64)
        offset = self.node("Mul", [is_long, limit], f"{scope}Mul")
        return self.node("Add", [self.node("Add", [rows, steps], f"{scope}Add"), offset], f"{scope}Add_1")


class Gemma2(DecoderBuilder):
    """Gemma 2: RMSNorm by (1 + w), norms on the attention and MLP outputs too, embeddings scaled by
    sqrt(hidden) (a tied lm_head reads them unscaled), GELU (tanh) MLP, query_pre_attn_scalar, attention
    scores and logits soft-capped, sliding windows on the layers `layer_types` marks."""

    model_types = ("gemma2",)
    activations = ("gelu_pytorch_tanh",)
    norm_offset = 1.0
    pre_mlp_norm = "pre_feedforward_layernorm"
    post_norms = ("post_attention_layernorm", "post_feedforward_layernorm")

    def activation(self) -> str:
        return self.config.hidden_activation

    def embedding_scale(self) -> float:
        return float(np.float32(self.config.hidden_size**0.5))

    def attention_scale(self) -> float:
        return float(self.config.query_pre_attn_scalar) ** -0.5

    def final_softcap(self) -> float | None:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return float(cap) if cap else None


class Gemma3(Gemma2):
    """Gemma 3's text model: Gemma 2 with q/k norms, and its own rotary base (rope_local_base_freq, no scaling)
    on the sliding-window layers."""

    model_types = ("gemma3_text",)

    def qk_norm(self, layer: int, q: str, k: str) -> tuple[str, str]:
        return self.per_head_norms(layer, q, k)

    def rotary_tables(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        local = copy.deepcopy(self.config)
        local.rope_theta = self.config.rope_local_base_freq
        local.rope_scaling = {"rope_type": "default"}
        return {**super().rotary_tables(), "gqa_local": rotary_caches(local)}

    def rotary_table(self, layer: int) -> str:
        return "gqa_local" if self.config.layer_types[layer] == "sliding_attention" else "gqa"


FAMILIES: dict[str, type[DecoderBuilder]] = {
    model_type: family for family in (Llama, Qwen2, Qwen3, Granite, SmolLM3, Phi3, Gemma2, Gemma3)
    for model_type in family.model_types
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


def supports(model_dir: Path, model_type: str) -> str | None:
    """None when the builder can write this model, else why not (for the fallback's log line)."""
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    return has_weights(model_dir)


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
    """Write `dest`/model.onnx (+ model.onnx.data) from the weights of `model_dir`, with the side files.

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
        builder = FAMILIES[config.model_type](config, open_weights(model_dir), data, info, settings,
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
