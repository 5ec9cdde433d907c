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
from workbench.units import MIB, format_size
from workbench.settings import PRESETS
from workbench.sources import ModelInfo

log = logging.getLogger(__name__)
# RAM rules of thumb, measured on the demo model here (see docs in the README): exporting holds
# the PyTorch model and the traced graph at once; running holds the weights plus buffers.
# Fit verdict: the share of the currently available memory a step needs. Under half leaves room
# for the rest of the machine (browser, office apps, the OS cache); above nine tenths the system
# starts swapping or the step is killed.
COMFORTABLE_SHARE = 0.5
TIGHT_SHARE = 0.9
FITS, TIGHT, NO_FIT = "fits comfortably", "tight", "will not fit"
EXPORT_RAM_FACTOR = 3.0
RUN_RAM_FACTOR = 1.2
RUNTIME_OVERHEAD_BYTES = 300 * 2**20


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


def ram_estimates(info: ModelInfo) -> dict[str, int | None]:
    """Memory each step needs, next to what this machine has (GPU figures are None without a GPU)."""
    from workbench.generation.runtime import gpu_memory

    int4 = int4_bytes(info, PRESETS["balanced"].settings)
    gpu = gpu_memory()
    return {
        "export": int(info.fp32_bytes * EXPORT_RAM_FACTOR + RUNTIME_OVERHEAD_BYTES),
        "run_original": int(info.fp32_bytes * RUN_RAM_FACTOR + RUNTIME_OVERHEAD_BYTES),
        "run_int4": int(int4 * RUN_RAM_FACTOR + RUNTIME_OVERHEAD_BYTES),
        "machine_total": psutil.virtual_memory().total,
        "machine_available": psutil.virtual_memory().available,
        "gpu_total": gpu[0] if gpu else None,
        "gpu_free": gpu[1] if gpu else None,
    }


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
        for x, total in enumerate(bottoms):
            totals.append(format_size(total * MIB))
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
