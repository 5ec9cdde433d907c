"""The streamed path of a run: the graph builder writes both graphs straight from the safetensors or GGUF.

On an architecture the builder knows, RTN, HQQ and GPTQ need no fp32 copy of the model: the INT4
graph is written tensor by tensor, GPTQ holds one decoder layer at a time
(workbench.quantization.streamed), and data-free calibration text comes from a round-to-nearest copy
on ONNX Runtime (8-bit, or INT4 where the 8-bit copy would add much to the run's RAM:
workbench.run.memory.calibration_writer). The fp32 original is written too, the same way, when this
machine could run it for the comparison; otherwise it is skipped and the run says why (ONNX Runtime's
CPU kernels have no bf16 MatMul, so a bf16 original cannot stand in).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import psutil

from exporters.builder import build_decoder, supports
from workbench.jobs import Cancelled, Progress, Stages, sub_progress
from workbench.quantization.streamed import (
    SpilledWeights,
    onnx_written_samples,
    streamed_gptq,
)
from workbench.run.memory import (
    WRITER_8BIT,
    calibration_writer,
    original_fits,
    original_sizes,
    run_disk_bytes,
    run_original_ram,
)
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo, ResolvedModel
from workbench.units import format_size

log = logging.getLogger(__name__)
STREAMED_METHODS = ("rtn", "hqq", "gptq")


def streamable(settings: QuantSettings) -> bool:
    """Whether these settings can take the streamed path (where the model's architecture allows)."""
    return settings.method in STREAMED_METHODS and not settings.sensitive_8bit_pct


def builder_reason(model: ResolvedModel, settings: QuantSettings) -> str | None:
    """None when the run can take the streamed path, else why not (the optimum export is used then)."""
    if not streamable(settings):
        return f"{settings.method}{' with sensitive 8-bit layers' if settings.sensitive_8bit_pct else ''} runs on " \
               "the whole PyTorch model"
    return supports(model.path, model.info.model_type)


def original_skip_reason(info: ModelInfo, dest: Path, settings: QuantSettings) -> str | None:
    """Why the fp32 original is not written here: it would not run in this machine's free memory, or not fit
    on its disk next to what the INT4 side needs; None when it is written."""
    needed = run_original_ram(info)
    available = psutil.virtual_memory().available
    if not original_fits(info):
        return (f"the fp32 original needs about {format_size(needed)} of RAM to run and {format_size(available)} "
                "are free, so it was not written; the INT4 model is measured alone")
    free = shutil.disk_usage(dest.parent).free
    if free < 1.05 * info.fp32_bytes + run_disk_bytes(info, settings, streamed=True):
        return (f"the fp32 original takes {format_size(info.fp32_bytes)} and {format_size(free)} of disk "
                "are free, so it was not written; the INT4 model is measured alone")
    return None


def build_original(model: ResolvedModel, dest: Path, settings: QuantSettings, *, progress: Progress,
                   cancelled: Cancelled) -> str | None:
    """The fp32 original in `dest`, or the reason it was skipped."""
    reason = original_skip_reason(model.info, dest, settings)
    if reason:
        log.warning("original skipped: %s", reason)
        return reason
    build_decoder(model.path, dest, model.info, None, progress=progress, cancelled=cancelled)
    return None


def calibration_samples(model: ResolvedModel, work: Path, settings: QuantSettings, calibration: Path | None, *,
                        progress: Progress, cancelled: Cancelled) -> np.ndarray:
    """Token samples from the calibration file, or written by the model itself (data-free).

    Data-free text is written by a round-to-nearest copy on ONNX Runtime, 8-bit or INT4 as
    workbench.run.memory.calibration_writer chooses by the RAM each adds to the run.
    """
    from transformers import AutoTokenizer

    from workbench.quantization.calibration import file_samples

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    if calibration is not None:
        return file_samples(calibration, tokenizer, settings, progress)
    n, length = settings.samples, settings.calibration_tokens
    writer_settings = calibration_writer(model.info, settings)
    copy = "8-bit copy" if writer_settings == WRITER_8BIT else "INT4 copy"
    log.info("calibration text written by an %s (round to nearest, blocks of %d) on ONNX Runtime", copy,
             writer_settings.block_size)
    writer = Path(tempfile.mkdtemp(prefix=".calibration-writer-", dir=work))
    try:
        build_decoder(model.path, writer, model.info, writer_settings,
                      progress=sub_progress(progress, 0.0, 0.1, prefix=f"{copy}: "), cancelled=cancelled)
        return onnx_written_samples(model.path, writer, tokenizer, n, length,
                                    progress=sub_progress(progress, 0.1, 1.0), cancelled=cancelled)
    finally:
        shutil.rmtree(writer, ignore_errors=True)


def quantize_streamed(stages: Stages, model: ResolvedModel, samples: np.ndarray | None, dest: Path,
                      settings: QuantSettings, plan: dict[str, int], cancelled: Cancelled):
    """Stages "gptq" (for GPTQ, on `plan`: module -> bits) and "int4": the INT4 graph in `dest`."""
    with tempfile.TemporaryDirectory(prefix=".gptq-", dir=dest.parent) as spill:
        precomputed = None
        if settings.method == "gptq":
            precomputed = stages.run("gptq", lambda p: streamed_gptq(
                model.path, samples, plan, SpilledWeights(Path(spill)), block_size=settings.block_size,
                symmetric=settings.symmetric, act_order=settings.act_order, progress=p, cancelled=cancelled))
        return stages.run("int4", lambda p: build_decoder(model.path, dest, model.info, settings,
                                                          precomputed=precomputed, progress=p, cancelled=cancelled))


def skipped_original(info: ModelInfo, reason: str) -> dict:
    """The original's entry in run.json when it was not written: sizes from the weight shapes, no RAM figure."""
    sizes = original_sizes(info)
    return {"bytes": sum(sizes.values()), "components": sizes, "ram_components": {}, "peak_rss_bytes": None,
            "skipped": reason}
