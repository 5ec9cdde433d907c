"""Graph fusion for optimum's decoder exports: each layer's attention becomes one GroupQueryAttention.

optimum's torchscript graph spells attention out in ~100 nodes per layer (shape arithmetic,
rotary embedding, repeat_kv, mask building, softmax); on a small model ONNX Runtime spends more
time dispatching those nodes than multiplying weights. The pass keeps the model's interface
(input_ids, attention_mask, position_ids, past_key_values.N.*; logits, present.N.*) and every
projection node as it is, so it runs on the fp32 and the INT4 graph alike, before or after
quantization, and name-based layer mapping keeps working.

GroupQueryAttention takes each row's length from the attention mask (the count of its ones, as
onnxruntime-genai's graphs do): the rows of a batch are right-padded, every row's tokens sit at
their real positions in the KV buffer and rotary embedding uses those positions. Columns past a
row's length are masked with an additive bias.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from workbench.layout import MODEL_FILE, MS_DOMAIN, save_model, use_ms_domain
from workbench.generation.engine import FUSED_KEY, FUSED_VALUE, LOGITS_TO_KEEP

log = logging.getLogger(__name__)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inverse frequencies fixed in advance


@dataclass(frozen=True)
class FusionResult:
    fused: bool
    reason: str  # why not, or what was done
    nodes_before: int
    nodes_after: int


def is_fused(model_path: Path) -> bool:
    model = onnx.load(str(model_path), load_external_data=False)
    return any(p.key == FUSED_KEY for p in model.metadata_props)


def fuse_folder(model_dir: Path) -> FusionResult:
    """Fuse a model folder in place, reading the architecture from its config.json."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as error:
        return FusionResult(False, f"config.json not understood: {error}", 0, 0)
    return fuse_attention(model_dir, config)


def fuse_attention(model_dir: Path, config) -> FusionResult:
    """Rewrite `model_dir`/model.onnx in place; `config` is the model's transformers config.

    An architecture or graph the pass does not recognise is left untouched (fused=False, with
    the reason), never half-rewritten.
    """
    path = Path(model_dir) / MODEL_FILE
    model = onnx.load(str(path))
    before = len(model.graph.node)
    reason = _unsupported(config, model)
    if reason:
        log.info("attention left unfused in %s: %s", model_dir, reason)
        return FusionResult(False, reason, before, before)
    try:
        _rewrite(model, config)
    except _NoMatch as error:
        log.info("attention left unfused in %s: %s", model_dir, error)
        return FusionResult(False, str(error), before, before)
    save_model(model, path.parent)
    return FusionResult(True, "GroupQueryAttention with rotary embedding", before, len(model.graph.node))


class _NoMatch(Exception):
    """The graph does not have the shape the pass expects."""


def _unsupported(config, model: onnx.ModelProto) -> str | None:
    if any(p.key == FUSED_KEY for p in model.metadata_props):
        return "already fused"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    if rope_type_of(config) not in STATIC_ROPE_TYPES:
        return f"rotary scaling {rope_type_of(config)!r} depends on the sequence length"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embedding"
    return None


def rope_type_of(config) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rotary_caches(config, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (max positions, rotary dim / 2) as transformers' rotary embedding computes them; `seq_len`
    picks the frequencies of the rotary types that depend on the length (longrope's long factors)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type_of(config)](config, "cpu", **({"seq_len": seq_len} if seq_len else {}))
    positions = np.arange(config.max_position_embeddings, dtype=np.float32)
    angles = positions[:, None] * inv_freq.numpy().astype(np.float32)[None, :]
    return (np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32)


def _rewrite(model: onnx.ModelProto, config) -> None:
    graph = model.graph
    nodes = list(graph.node)
    produced_by = {out: node for node in nodes for out in node.output}
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    cos, sin = rotary_caches(config)
    shared = shared_inputs(graph)
    graph.initializer.extend([numpy_helper.from_array(cos, "gqa_cos_cache"), numpy_helper.from_array(sin, "gqa_sin_cache")])
    attention_nodes: dict[str, onnx.NodeProto] = {}  # o_proj node name -> GQA node to insert before it
    replaced_outputs = set()
    for layer in range(config.num_hidden_layers):
        scope = f"/model/layers.{layer}/self_attn/"
        q, k, v = (_scope_output(nodes, produced_by, f"{scope}{name}/") for name in ("q_proj", "k_proj", "v_proj"))
        o_proj = [n for n in nodes if n.name.startswith(f"{scope}o_proj/")]
        entry = [n for n in o_proj if n.input and n.input[0] in produced_by and not produced_by[n.input[0]].name.startswith(f"{scope}o_proj/")]
        if len(entry) != 1:
            raise _NoMatch(f"layer {layer}: no single o_proj input")
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        if not all(name in produced_by for name in present) or not all(_is_input(graph, name) for name in past):
            raise _NoMatch(f"layer {layer}: KV cache inputs/outputs not found")
        output = f"{scope}GroupQueryAttention_output_0"
        attention_nodes[entry[0].name] = helper.make_node(
            "GroupQueryAttention",
            [q, k, v, *past, shared["seqlens_k"], shared["total_length"], "gqa_cos_cache", "gqa_sin_cache"],
            [output, *present],
            name=f"{scope}GroupQueryAttention",
            domain=MS_DOMAIN,
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(head_dim) ** -0.5,
        )
        entry[0].input[0] = output
        replaced_outputs.update(present)
    rewritten = list(shared["nodes"])
    for node in nodes:
        if any(out in replaced_outputs for out in node.output):
            continue  # the old Concat that built the present KV
        if node.name in attention_nodes:
            rewritten.append(attention_nodes[node.name])
        rewritten.append(node)
    graph.ClearField("node")
    graph.node.extend(_live(graph, rewritten))
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    keep_last_logits(graph)
    use_ms_domain(model)
    model.metadata_props.add(key=FUSED_KEY, value=FUSED_VALUE)


def keep_last_logits(graph: onnx.GraphProto, head_output: str = "logits") -> None:
    """Project only the last `logits_to_keep` positions onto the vocabulary (0, the default: all).

    A generated token needs the prompt's last logits alone; for a 256-token prompt the full
    logits are the step's largest buffer (48 MiB on a 49k vocabulary) and a large share of its
    time. The input is an overridable initializer, so runners that do not know it (scoring,
    onnxruntime-genai, Triton) see the graph's usual inputs and get every position. `head_output`: what the
    vocabulary projection writes (the logits, unless ops such as soft-capping follow it).
    """
    prefix = "/model/logits_to_keep/"
    head = next((n for n in graph.node if head_output in n.output), None)
    if head is None:
        raise _NoMatch("no node produces the logits")
    graph.initializer.extend([
        numpy_helper.from_array(np.array([0], np.int64), LOGITS_TO_KEEP),
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), f"{prefix}end"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}axis"),
    ])
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    hidden = head.input[0]
    slicing = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{prefix}start"], name=f"{prefix}Neg"),
        helper.make_node("Slice", [hidden, f"{prefix}start", f"{prefix}end", f"{prefix}axis"], [f"{prefix}hidden"],
                         name=f"{prefix}Slice"),
    ]
    head.input[0] = f"{prefix}hidden"
    position = list(graph.node).index(head)
    for offset, node in enumerate(slicing):
        graph.node.insert(position + offset, node)


def _is_input(graph: onnx.GraphProto, name: str) -> bool:
    return any(i.name == name for i in graph.input)


def _scope_output(nodes, produced_by, scope: str) -> str:
    """The one tensor a projection's nodes (MatMul[NBits], bias Add) hand to the rest of the graph."""
    inside = [n for n in nodes if n.name.startswith(scope)]
    names = {n.name for n in inside}
    outputs = {o for n in inside for o in n.output}
    leaving = [
        o for o in outputs
        if any(o in n.input and n.name not in names for n in nodes)
    ]
    if len(leaving) != 1:
        raise _NoMatch(f"{scope}: expected one output, found {len(leaving)}")
    return leaving[0]


def shared_inputs(graph: onnx.GraphProto) -> dict:
    """seqlens_k (each row's length - 1) and the total length, computed once from the attention mask."""
    prefix = "/model/gqa_inputs/"
    constants = {"one": np.array(1, np.int64), "one_axis": np.array([1], np.int64)}
    graph.initializer.extend(numpy_helper.from_array(v, f"{prefix}{k}") for k, v in constants.items())
    c = {k: f"{prefix}{k}" for k in constants}

    def node(op, inputs, name, **attrs):
        return helper.make_node(op, inputs, [f"{prefix}{name}"], name=f"{prefix}{name}", **attrs)

    # Each row's own length: a batch's rows are right-padded, each at its real positions.
    nodes = [
        node("Shape", ["attention_mask"], "mask_shape"),
        node("Gather", [f"{prefix}mask_shape", c["one"]], "total", axis=0),
        node("Cast", [f"{prefix}total"], "total_length", to=TensorProto.INT32),
        node("ReduceSum", ["attention_mask", c["one_axis"]], "lengths", keepdims=0),
        node("Sub", [f"{prefix}lengths", c["one"]], "last_per_row"),
        node("Cast", [f"{prefix}last_per_row"], "seqlens_k", to=TensorProto.INT32),
    ]
    return {"nodes": nodes, "seqlens_k": f"{prefix}seqlens_k", "total_length": f"{prefix}total_length",
            "total": f"{prefix}total", "lengths": f"{prefix}lengths"}  # int64: a scalar, and (batch,)


def _live(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes the graph outputs still depend on, in their original order."""
    produced_by = {o: n for n in nodes for o in n.output}
    needed = {o.name for o in graph.output}
    live: set[str] = set()
    stack = list(needed)
    while stack:
        node = produced_by.get(stack.pop())
        if node is None or node.name in live:
            continue
        live.add(node.name)
        stack.extend(i for i in node.input if i)
    return [n for n in nodes if n.name in live]
