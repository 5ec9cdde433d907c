"""Sizes on disk and in RAM: estimates from weight shapes, measurements from real files and sessions."""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import psutil

from workbench.layout import MODEL_FILE
from workbench.jobs import Cancelled, Progress, never_cancelled, no_progress
from workbench.quantization.int4_graph import module_name
from workbench.quantization.sizes import COMPONENTS, int4_bytes
from workbench.units import GIB, MIB, format_size
from workbench.settings import PRESETS, QuantSettings
from workbench.sources import ModelInfo

log = logging.getLogger(__name__)
# Fit verdict: the share of the currently available memory a step needs. Under half leaves room
# for the rest of the machine (browser, office apps, the OS cache); above nine tenths the system
# starts swapping or the step is killed.
COMFORTABLE_SHARE = 0.5
TIGHT_SHARE = 0.9
FITS, TIGHT, NO_FIT = "fits comfortably", "tight", "will not fit"
# RAM rules, each checked against measured peaks of the whole process tree (docs/scale.md).
# The streamed path (workbench.run.streamed) holds Python with PyTorch, ONNX and ONNX Runtime
# loaded, one tensor read in row chunks and the graph being written: its peak grows with the
# largest decoder layer, not with the model.
STREAMED_BASE_BYTES = 736 * MIB
STREAMED_LAYER_SHARE = 0.14
# Streamed GPTQ (workbench.quantization.streamed, .gptq) holds, at its peak in a decoder layer, the layer's
# weights in fp32 twice (the originals and the dequantized results swapped in to compute the next layer's
# inputs), the widest input's Hessian with the two matrices its factorization makes next to it, the calibration
# activations into and out of the layer, and the MLP's intermediate tensors (gate, up, their product) for one
# chunk of tokens; at the lm_head its fp32 weight, its codes, scales and zero points. Beyond that, freed memory
# glibc keeps: before the heap was trimmed after each layer the peak rose by 0.64-0.78 x the activations with
# every layer done (demo, 360M and 1B shapes; docs/scale.md); with the trim, not at all on the 360M shape
# (0.87-0.97 GiB over 32 layers) and by about 0.2 x on a small wide model (13 MiB a layer); with large blocks
# mapped apart as well, flat on that model. 0.25 x stays until a full run at 1B or 8B shows the rise gone.
HESSIANS_AT_ONCE = 3
MLP_TENSORS = 3
GPTQ_GROWTH_PER_LAYER = 0.25
# Data-free calibration text on the streamed path (workbench.run.streamed.calibration_samples) is written by a
# round-to-nearest copy on ONNX Runtime, not by the float model in PyTorch: on the demo it wrote the text 1.5x
# faster on a quiet machine and 3.4x on a busy one (PyTorch's two threads slow down most when other work holds
# the cores), with the same quality over four seeds (docs/quality.md), and it needs no fp32 model in RAM. 8-bit
# where it adds at most WRITER_8BIT_EXTRA_BYTES to what the run needs anyway (8-bit rounding is close to the
# float model, and with blocks of 128 ONNX Runtime decodes the 32-sample batch faster than an INT4 copy with
# blocks of 32: docs/scale.md), INT4 otherwise (an 8B model's 8-bit copy would take about 11 GiB, its INT4
# copy with blocks of 128 under 7, its GPTQ stage about 5.5).
WRITER_8BIT_EXTRA_BYTES = 512 * MIB
WRITER_8BIT = QuantSettings(method="rtn", block_size=128, eight_bit=("*",))
WRITER_INT4 = QuantSettings(method="rtn", block_size=128)
# The optimum export path: its peak is the export (the PyTorch model and its trace at once) or, above protobuf's
# 2 GiB, the INT4 pass over the whole fp32 graph (Quality preset: demo 3.1 GiB and 360M shape 6.8 in the export,
# Llama-3.2-1B shape 14.5 in the INT4 pass after 12.0 in the export; measured 2026-12-02, docs/scale.md).
# Below protobuf's 2 GiB the exporter holds the whole graph in memory as well, inline; above, it writes the
# weights out as it goes: a steeper line for small models than for large ones.
PROTOBUF_LIMIT_BYTES = 2 * GIB
EXPORT_INLINE_RULE = (1.1 * GIB, 4.3)  # base, times the fp32 size
EXPORT_EXTERNAL_RULE = (3.3 * GIB, 2.5)
# A session holds its weights as ONNX Runtime prepacks them (the INT4 ones into a larger layout at
# accuracy level 4) plus its own buffers; the mapped weights file is paged out while it loads.
RUN_RAM_FACTOR = 1.2
RUNTIME_OVERHEAD_BYTES = 160 * MIB  # beyond 1.2x the weights: 0.08-0.15 GiB measured, demo to 1B
# Disk: the export path holds the fp32 export, the INT4 copy and the intermediate files at once
# (1.65-1.94x the fp32 size measured); the streamed path writes the INT4 graph, and for GPTQ its
# spilled results and, without a calibration file, an RTN copy that writes the calibration text.
EXPORT_DISK_FACTOR = 2.0
STREAMED_DISK_MARGIN = 1.05  # the INT4 size estimate came within 1.5 % of the written files at 1B and 8B
RUN_FILES_BYTES = 64 * MIB  # tokenizer, config and report next to each graph


def original_sizes(info: ModelInfo) -> dict[str, int]:
    sizes = dict.fromkeys(COMPONENTS, 0)
    sizes["other"] = info.other_parameters * 4
    for weight in info.weights:
        if weight.role == "lm_head" and info.tied_embeddings:
            continue  # the same matrix as the embeddings
        sizes[weight.role] += weight.rows * weight.cols * 4
    return sizes


def preset_estimates(info: ModelInfo) -> dict[str, int]:
    return {name: int4_bytes(info, preset.settings) for name, preset in PRESETS.items()}


def ram_estimates(info: ModelInfo, settings: QuantSettings, streamed: bool) -> dict[str, int | None]:
    """Memory each step needs with these settings (`streamed`: the run takes the graph builder's path),
    next to what this machine has (GPU figures are None without a GPU)."""
    from workbench.generation.runtime import gpu_memory

    gpu = gpu_memory()
    return {
        "shrink": shrink_ram(info, settings, streamed),
        "run_original": run_original_ram(info),
        "run_int4": run_int4_ram(info, settings),
        "machine_total": psutil.virtual_memory().total,
        "machine_available": psutil.virtual_memory().available,
        "gpu_total": gpu[0] if gpu else None,
        "gpu_free": gpu[1] if gpu else None,
    }


def shrink_ram(info: ModelInfo, settings: QuantSettings, streamed: bool) -> int:
    """Peak RAM of `quantize` up to the INT4 model written (measuring each side runs it: run_*_ram), for
    data-free calibration."""
    if not streamed:
        base, factor = EXPORT_INLINE_RULE if info.fp32_bytes < PROTOBUF_LIMIT_BYTES else EXPORT_EXTERNAL_RULE
        return int(base + factor * info.fp32_bytes)
    peak = STREAMED_BASE_BYTES + STREAMED_LAYER_SHARE * layer_bytes(info)
    if settings.method == "gptq":
        writer = calibration_writer_ram(info, settings, calibration_writer(info, settings))
        peak = STREAMED_BASE_BYTES + max(streamed_gptq_ram(info, settings), writer)
    return int(peak)


def streamed_gptq_ram(info: ModelInfo, settings: QuantSettings) -> int:
    """RAM of streamed GPTQ beyond the base: capturing the first layer's inputs (the embeddings in fp32), a
    decoder layer or the lm_head, whichever needs most, with what the layers before left behind (see
    GPTQ_GROWTH_PER_LAYER)."""
    from workbench.quantization.gptq import ROW_CHUNK
    from workbench.quantization.layerwise import CHUNK_TOKENS

    length = settings.calibration_tokens
    activations = settings.samples * length * info.hidden_size * 4
    chunk = min(settings.samples, max(CHUNK_TOKENS // length, 1)) * length  # tokens a forward takes
    layer = layer_bytes(info)
    widest = max((w.cols for w in info.weights if w.role == "layers"), default=info.hidden_size)
    in_layer = 2 * layer + HESSIANS_AT_ONCE * widest**2 * 4 + 2 * activations + MLP_TENSORS * chunk * widest * 4
    grown = GPTQ_GROWTH_PER_LAYER * activations * info.layers
    embeddings = next(w for w in info.weights if w.role == "embeddings")
    rows, cols = embeddings.rows, embeddings.cols  # the lm_head's shape, tied or not
    capture = rows * cols * 4 + activations
    head = 0
    if settings.quantize_lm_head:
        codes = rows * cols + rows * -(-cols // settings.block_size) * 5  # uint8 codes, fp32 scales, uint8 zeros
        head = rows * cols * 4 + codes + HESSIANS_AT_ONCE * cols**2 * 4 + 2 * activations + 3 * ROW_CHUNK * cols * 4
    return int(max(capture, in_layer + grown, head + grown))


def calibration_writer_ram(info: ModelInfo, settings: QuantSettings, writer: QuantSettings) -> int:
    """RAM beyond the base (which holds ONNX Runtime already) of writing data-free calibration text with the copy
    `writer` (calibration_writer's answer), with the keys and values of all samples at once (measured, 8-bit copy,
    with the base: demo 1.08 GiB, 360M 1.52-1.56, 1B 2.62)."""
    cache = kv_cache_bytes(info, settings.samples, settings.calibration_tokens)
    return int(int4_bytes(info, writer) * RUN_RAM_FACTOR + cache)


def kv_cache_bytes(info: ModelInfo, samples: int, tokens: int) -> int:
    """fp32 keys and values of `samples` sequences of `tokens` in every layer, their width read from the key and
    value projections (a packed qkv projection holds the queries' hidden_size rows besides them)."""
    layers = [w for w in info.weights if w.role == "layers"]
    width = sum(w.rows for w in layers if w.name.endswith(("k_proj", "v_proj")))
    width = width or sum(w.rows - info.hidden_size for w in layers if w.name.endswith("qkv_proj"))
    return samples * tokens * (width or 2 * info.hidden_size * info.layers) * 4


def calibration_writer(info: ModelInfo, settings: QuantSettings) -> QuantSettings:
    """The settings of the round-to-nearest copy on ONNX Runtime that writes a streamed GPTQ run's data-free
    calibration text (WRITER_8BIT_EXTRA_BYTES's comment says why)."""
    anyway = max(streamed_gptq_ram(info, settings), calibration_writer_ram(info, settings, WRITER_INT4))
    if calibration_writer_ram(info, settings, WRITER_8BIT) <= anyway + WRITER_8BIT_EXTRA_BYTES:
        return WRITER_8BIT
    return WRITER_INT4


def quantize_peak_ram(info: ModelInfo, settings: QuantSettings, streamed: bool) -> int:
    """Peak RAM of the whole `quantize`: shrinking, then running each side to measure it (the streamed path
    skips an original that will not fit in the free RAM)."""
    original = run_original_ram(info) if not streamed or original_fits(info) else 0
    return max(shrink_ram(info, settings, streamed), run_int4_ram(info, settings), original)


def original_fits(info: ModelInfo) -> bool:
    """Whether the fp32 original would run in this machine's free memory (the streamed path does not write it
    otherwise)."""
    return fit_verdict(run_original_ram(info), psutil.virtual_memory().available) != NO_FIT


def run_original_ram(info: ModelInfo) -> int:
    """RAM to run the fp32 original (measured: demo 0.69 GiB, 1B shape 5.67 GiB)."""
    return int(info.fp32_bytes * RUN_RAM_FACTOR + RUNTIME_OVERHEAD_BYTES)


def run_int4_ram(info: ModelInfo, settings: QuantSettings) -> int:
    """RAM to run the INT4 model these settings write."""
    return int(int4_bytes(info, settings) * RUN_RAM_FACTOR + RUNTIME_OVERHEAD_BYTES)


def run_disk_bytes(info: ModelInfo, settings: QuantSettings, streamed: bool) -> int:
    """Free disk a run needs before it starts. On the streamed path the fp32 original is written only
    where there is room for it (workbench.run.streamed.original_skip_reason), so it is not counted."""
    if not streamed:
        return int(info.fp32_bytes * EXPORT_DISK_FACTOR)
    int4 = int4_bytes(info, settings)
    if settings.method == "gptq":  # the spilled GPTQ results, and the copy writing calibration text
        int4 += int4_bytes(info, settings) + int4_bytes(info, calibration_writer(info, settings))
    return int(int4 * STREAMED_DISK_MARGIN) + RUN_FILES_BYTES


def layer_bytes(info: ModelInfo) -> int:
    """The fp32 bytes of one decoder layer's weight matrices (the families here have equal layers)."""
    return sum(w.rows * w.cols * 4 for w in info.weights if w.role == "layers") // max(info.layers, 1)


def fit_verdict(needed: int, available: int) -> str:
    """"fits comfortably", "tight" or "will not fit" for `needed` bytes out of `available`."""
    share = needed / available if available > 0 else float("inf")
    if share < COMFORTABLE_SHARE:
        return FITS
    return TIGHT if share < TIGHT_SHARE else NO_FIT


def graph_sizes(model_dir: Path, info: ModelInfo) -> dict[str, int]:
    """Bytes per component of an ONNX model, read from its initializers' shapes and types.

    An initializer belongs to the component of the first weight node reading it (directly or
    through a Transpose), so a tensor shared by the embeddings and a tied lm_head counts once.
    """
    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    roles = {w.name: w.role for w in info.weights}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Transpose"}
    owner: dict[str, str] = {}
    for node in model.graph.node:
        role = roles.get(module_name(node.name))
        for name in node.input:
            if role:
                owner.setdefault(transposed.get(name, name), role)
    sizes = dict.fromkeys(COMPONENTS, 0)
    for tensor in model.graph.initializer:
        sizes[owner.get(tensor.name, "other")] += _tensor_bytes(tensor)
    return sizes


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


@dataclass(frozen=True)
class SessionMemory:
    baseline_rss: int  # python + onnxruntime, no model
    peak_rss: int  # after load, a prompt and a few generated tokens

    @property
    def model_rss(self) -> int:
        return self.peak_rss - self.baseline_rss


def measure_session_memory(
    model_dir: Path, *, progress: Progress = no_progress, cancelled: Cancelled = never_cancelled
) -> SessionMemory:
    """Peak RSS of a fresh process that loads the model and generates a few tokens."""
    from workbench.subprocess_job import run_in_subprocess

    result = run_in_subprocess(
        "workbench.run.memory:session_memory_in_process",
        {"model_dir": str(model_dir)},
        progress=progress,
        cancelled=cancelled,
        expected_seconds=10.0,
        message="measuring RAM",
    )
    return SessionMemory(**result)


def session_memory_in_process(model_dir: str, progress: Progress = no_progress) -> dict:
    from workbench.generation.engine import GenerationConfig, generate
    from workbench.generation.runtime import OnnxCausalLM

    baseline = peak_rss()
    model = OnnxCausalLM(Path(model_dir))
    progress(0.5, "running a prompt")
    generate(model, [1] * 64, GenerationConfig(max_new_tokens=8))  # as answers are made, cache and all
    return {"baseline_rss": baseline, "peak_rss": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident memory.

    On Linux ru_maxrss survives exec (a child would report its parent's peak), so read the
    per-address-space high-water mark instead.
    """
    if sys.platform.startswith("linux"):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def ram_components(disk: dict[str, int], memory: SessionMemory) -> dict[str, int]:
    """RAM per component: the weights as on disk, plus what the session needs beyond them."""
    weights = sum(disk.values())
    return {**disk, "runtime": max(memory.model_rss - weights, 0), "python + onnxruntime": memory.baseline_rss}


def pyplot():
    """matplotlib's pyplot drawing to files only (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_memory_chart(path: Path, original: dict, int4: dict, title: str) -> list[str]:
    """Two panels (disk, RAM), each a stacked bar for original and INT4, one colour per component;
    returns the totals written above the bars."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=110)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#bbbbbb"]
    totals = []
    for axis, key, label in ((axes[0], "disk", "On disk"), (axes[1], "ram", "In RAM (measured peak)")):
        parts = list(dict.fromkeys([*original[key], *int4[key]]))
        bottoms = np.zeros(2)
        for colour, part in zip(colours, parts):
            values = np.array([original[key].get(part, 0), int4[key].get(part, 0)]) / MIB
            if not values.any():
                continue
            axis.bar(["original", "INT4"], values, bottom=bottoms, color=colour, label=part, width=0.55)
            bottoms += values
        for x, total in enumerate(bottoms):  # an original not run has no RAM figure: say so, not "0 bytes"
            totals.append(format_size(total * MIB) if total else "not run")
            axis.text(x, total, totals[-1], ha="center", va="bottom", fontsize=9)
        axis.set_title(label)
        axis.set_ylabel("MiB")
        axis.set_ylim(0, bottoms.max() * 1.15)
        axis.legend(fontsize=8, loc="upper right")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return totals
