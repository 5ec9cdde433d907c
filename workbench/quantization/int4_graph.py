"""fp32 ONNX -> INT4: MatMul -> MatMulNBits, embedding Gather -> GatherBlockQuantized.

Rounding comes from `workbench.quantization.blockquant` (bit-exact with ONNX Runtime's RTN kernel), ONNX
Runtime's HQQ solver, or our GPTQ (computed on the PyTorch model and handed in as `precomputed`).
One graph pass places every quantized weight, so 4- and 8-bit layers, the embeddings and a tied
lm_head (which ONNX Runtime's quantizer leaves fp32) are handled alike. A tied lm_head and the
embeddings share one packed tensor: MatMulNBits' (N, blocks, blob) layout is exactly what
GatherBlockQuantized reads with quantize_axis=2.
"""

from __future__ import annotations

import collections
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workbench.layout import MODEL_FILE, MS_DOMAIN, SIDE_FILES, folder_bytes, save_model, use_ms_domain
from workbench.quantization.blockquant import QuantizedWeight, rtn_quantize
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.quantization.methods import METHODS
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """A weight in the fp32 graph that the INT4 step may replace."""

    layer: str  # module name, as in ModelInfo.weights
    role: str  # layers | lm_head | embeddings
    node: str  # MatMul or Gather node name
    initializer: str
    transposed: bool  # True: stored (K, N) as MatMul's B; False: stored (N, K) like an embedding


@dataclass(frozen=True)
class QuantizeResult:
    bytes: int
    layer_bits: dict[str, int | None]  # every target: 4, 8 or None (kept fp32)
    shared_embeddings: bool


def layer_plan(info: ModelInfo, settings: QuantSettings) -> dict[str, int | None]:
    """Bits per weight matrix (None: stays fp32). A tied pair gets one width: the wider one."""
    plan: dict[str, int | None] = {}
    for weight in info.weights:
        if weight.role == "embeddings" and not settings.quantize_embeddings:
            plan[weight.name] = None
        elif weight.role == "lm_head" and not settings.quantize_lm_head:
            plan[weight.name] = None
        else:
            plan[weight.name] = settings.bits_for(weight.name)
    if info.tied_embeddings:
        pair = [w.name for w in info.weights if w.role in ("embeddings", "lm_head")]
        widths = [plan[name] for name in pair]
        if all(widths):
            for name in pair:
                plan[name] = max(widths)
    return plan


def quantized_bytes(
    rows: int, cols: int, bits: int, block_size: int, zero_points: str
) -> tuple[int, int]:
    """(packed values, scales + zero points) bytes of one (rows, cols) weight in MatMulNBits' layout.

    zero_points: "none" (symmetric), "packed" (integers, `bits` each), "byte" (integers, a byte each,
    as GatherBlockQuantized reads them) or "float" (HQQ, fp32 each).
    """
    blocks = -(-cols // block_size)
    packed = rows * blocks * block_size * bits // 8
    scales = rows * blocks * 4
    per_row = {"none": 0, "packed": -(-blocks * bits // 8), "byte": blocks, "float": blocks * 4}[zero_points]
    zero_bytes = rows * per_row
    return packed, scales + zero_bytes


def module_name(node_name: str) -> str:
    """`/model/layers.0/mlp/down_proj/MatMul` -> `model.layers.0.mlp.down_proj` (torch exporter scopes)."""
    return ".".join(part for part in node_name.split("/")[:-1] if part)


def find_targets(model: onnx.ModelProto, info: ModelInfo) -> list[Target]:
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    roles = {w.name: w.role for w in info.weights}
    transposes = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in initializers and list(_attribute(n, "perm", [1, 0])) == [1, 0]
    }
    targets = []
    for node in graph.node:
        layer = module_name(node.name)
        if node.op_type == "MatMul" and layer in roles and roles[layer] != "embeddings":
            weight = node.input[1]
            if weight in initializers and len(initializers[weight].dims) == 2:
                targets.append(Target(layer, roles[layer], node.name, weight, transposed=True))
            elif weight in transposes:  # a tied lm_head reads the embedding through a Transpose
                targets.append(Target(layer, roles[layer], node.name, transposes[weight], transposed=False))
        elif node.op_type == "Gather" and roles.get(layer) == "embeddings" and node.input[0] in initializers:
            targets.append(Target(layer, "embeddings", node.name, node.input[0], transposed=False))
    found = {t.layer for t in targets}
    missing = [w.name for w in info.weights if w.name not in found]
    if missing:
        log.warning("%d weight matrices were not found in the graph and stay fp32: %s", len(missing), missing[:5])
    return targets


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def zero_point_kind(settings: QuantSettings, *, for_gather: bool) -> str:
    """How a weight's zero points are stored: see `quantized_bytes`."""
    if METHODS[settings.method].float_zero_points:
        # GatherBlockQuantized needs integer zero points; HQQ's are floats, so gathers use RTN.
        return "packed" if for_gather else "float"
    return "none" if settings.symmetric else "packed"


def quantize_weight(weight: np.ndarray, bits: int, settings: QuantSettings, *, for_gather: bool) -> QuantizedWeight:
    """Quantize one (N, K) weight with the settings' data-free rounding (RTN or HQQ)."""
    kind = zero_point_kind(settings, for_gather=for_gather)
    if kind == "float":
        return _hqq(weight, bits, settings.block_size)
    return rtn_quantize(weight, bits, settings.block_size, symmetric=kind == "none")


def _hqq(weight: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    solver = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    q, scales, zeros = solver.quantize_internal(torch.from_numpy(weight), bits=bits, group_size=block_size)
    return QuantizedWeight(
        q=q.numpy().astype(np.uint8),
        scales=scales.numpy().astype(np.float32),
        zero_points=zeros.numpy().astype(np.float32),
        bits=bits,
        block_size=block_size,
        k=weight.shape[1],
    )


def quantize_onnx(
    source_dir: Path,
    dest_dir: Path,
    info: ModelInfo,
    settings: QuantSettings,
    *,
    precomputed: dict[str, QuantizedWeight] | None = None,
    overrides: dict[str, np.ndarray] | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> QuantizeResult:
    """Write `dest_dir` with the INT4 graph of `source_dir`/model.onnx and its side files.

    `precomputed`: quantized weights by layer name (GPTQ, AWQ). `overrides`: new fp32 values for
    other parameters by their PyTorch name (AWQ folds its scales into the norms before the layers).
    """
    precomputed = precomputed or {}
    progress(0.0, "loading the fp32 graph")
    model = onnx.load(str(source_dir / MODEL_FILE))
    targets = find_targets(model, info)
    plan = layer_plan(info, settings)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    # A shared weight (tied lm_head and embeddings) is quantized once, by whichever comes first.
    done: dict[str, tuple[QuantizedWeight, str]] = {}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    new_initializers: list[onnx.TensorProto] = []
    nodes_by_name = {n.name: n for n in graph.node}
    shared = False
    for index, target in enumerate(targets):
        check(cancelled)
        progress(0.05 + 0.85 * index / max(len(targets), 1), f"{target.layer}")
        bits = plan.get(target.layer)
        if bits is None:
            continue
        key = (target.initializer, bits)
        if key in done:
            quantized, packed_name = done[key]
            shared = True
        else:
            array = numpy_helper.to_array(initializers[target.initializer]).astype(np.float32)
            weight = array.T if target.transposed else array
            quantized = precomputed.get(target.layer) or quantize_weight(
                np.ascontiguousarray(weight), bits, settings, for_gather=_is_gathered(target, targets, plan)
            )
            packed_name = f"{target.layer}.weight_Q{bits}"
            new_initializers.append(numpy_helper.from_array(quantized.packed(), packed_name))
            done[key] = (quantized, packed_name)
        node = nodes_by_name[target.node]
        if target.role == "embeddings":
            nodes, extra = gather_nodes(node, quantized, packed_name, target.layer)
        else:
            nodes, extra = matmul_nodes(node, quantized, packed_name, target.layer, settings.accuracy_level)
        new_nodes[target.node] = nodes
        new_initializers.extend(extra)
    new_initializers.extend(_override_parameters(graph, initializers, overrides or {}))
    progress(0.9, "rewriting the graph")
    rewritten = []
    for node in graph.node:
        rewritten.extend(new_nodes.get(node.name, [node]))
    graph.ClearField("node")
    graph.node.extend(rewritten)
    graph.initializer.extend(new_initializers)
    _drop_unused(graph)
    use_ms_domain(model)
    progress(0.95, "saving")
    save_model(model, dest_dir)
    copy_side_files(source_dir, dest_dir)
    return QuantizeResult(
        bytes=folder_bytes(dest_dir),
        layer_bits={t.layer: plan.get(t.layer) for t in targets},
        shared_embeddings=shared,
    )


def written_op_counts(model_dir: Path) -> dict[str, int]:
    """Nodes per operator type of the graph in `model_dir` as it is on disk (after any later
    rewrite, such as attention fusion), the most used first."""
    graph = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    return dict(sorted(ops.items(), key=lambda kv: -kv[1]))


def _override_parameters(
    graph: onnx.GraphProto, initializers: dict[str, onnx.TensorProto], overrides: dict[str, np.ndarray]
) -> list[onnx.TensorProto]:
    """Point the nodes of each overridden parameter's module at a fresh initializer with its new value.

    The exporter may share one initializer between equal parameters (all-ones norms), read
    directly or through an Identity node named after each parameter, so the nodes get their own
    copy instead of the shared tensor being changed.
    """
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers}
    created = []
    for parameter, value in overrides.items():
        module = parameter.rsplit(".", 1)[0]
        name = f"{parameter}_override"
        replaced = 0
        for node in graph.node:
            if module_name(node.name) != module:
                continue
            for position, tensor_name in enumerate(node.input):
                tensor = initializers.get(aliases.get(tensor_name, tensor_name))
                if tensor is not None and tuple(tensor.dims) == value.shape:
                    node.input[position] = name
                    replaced += 1
        if not replaced:
            raise RuntimeError(f"no graph node reads {parameter}; the export's names are unexpected")
        created.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return created


def _is_gathered(target: Target, targets: list[Target], plan: dict[str, int | None]) -> bool:
    """Whether this weight's quantized tensor will also be read by GatherBlockQuantized."""
    return any(
        t.role == "embeddings" and t.initializer == target.initializer and plan.get(t.layer) == plan.get(target.layer)
        for t in targets
    )


def matmul_nodes(node, quantized: QuantizedWeight, packed_name: str, layer: str, accuracy_level: int):
    scales_name = f"{layer}.weight_Q{quantized.bits}_scales"
    initializers = [numpy_helper.from_array(quantized.scales, scales_name)]
    inputs = [node.input[0], packed_name, scales_name]
    zero_points = quantized.packed_zero_points()
    if zero_points is not None:
        inputs.append(f"{layer}.weight_Q{quantized.bits}_zero_points")
        initializers.append(numpy_helper.from_array(zero_points, inputs[-1]))
    matmul = helper.make_node(
        "MatMulNBits",
        inputs,
        [node.output[0]],
        name=f"{node.name}_Q{quantized.bits}",
        domain=MS_DOMAIN,
        K=quantized.k,
        N=quantized.n,
        bits=quantized.bits,
        block_size=quantized.block_size,
        accuracy_level=accuracy_level,
    )
    return [matmul], initializers


def gather_nodes(node, quantized: QuantizedWeight, packed_name: str, layer: str):
    """GatherBlockQuantized over the (N, blocks, blob) tensor, then back to (batch, seq, K)."""
    prefix = f"{layer}.weight_Q{quantized.bits}_gather"
    n, blocks = quantized.scales.shape
    initializers = [numpy_helper.from_array(quantized.scales.reshape(n, blocks, 1), f"{prefix}_scales")]
    inputs = [packed_name, node.input[1], f"{prefix}_scales"]
    if quantized.zero_points is not None:
        initializers.append(
            numpy_helper.from_array(quantized.zero_points.astype(np.uint8).reshape(n, blocks, 1), f"{prefix}_zero_points")
        )
        inputs.append(f"{prefix}_zero_points")
    padded_k = blocks * quantized.block_size
    gathered = f"{prefix}_blocks"
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [gathered],
            name=f"{node.name}_Q{quantized.bits}",
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=2,
            block_size=quantized.block_size,
            bits=quantized.bits,
        )
    ]
    # (batch, seq, blocks, block) -> (batch, seq, blocks * block); 0 keeps a dimension as is.
    initializers.append(numpy_helper.from_array(np.array([0, 0, padded_k], np.int64), f"{prefix}_shape"))
    reshaped = node.output[0] if padded_k == quantized.k else f"{prefix}_padded"
    nodes.append(helper.make_node("Reshape", [gathered, f"{prefix}_shape"], [reshaped], name=f"{prefix}_Reshape"))
    if padded_k != quantized.k:
        for suffix, value in (("starts", 0), ("ends", quantized.k), ("axes", 2)):
            initializers.append(numpy_helper.from_array(np.array([value], np.int64), f"{prefix}_{suffix}"))
        nodes.append(
            helper.make_node(
                "Slice",
                [reshaped, f"{prefix}_starts", f"{prefix}_ends", f"{prefix}_axes"],
                [node.output[0]],
                name=f"{prefix}_Slice",
            )
        )
    return nodes, initializers


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove initializers and Transpose nodes nothing reads any more (the fp32 weights)."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)


def copy_side_files(source_dir: Path, dest_dir: Path) -> None:
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, dest_dir / name)

