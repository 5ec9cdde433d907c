"""The streamed path of a run: the graph builder writes both graphs straight from the safetensors.

Data-free methods (RTN, HQQ) on an architecture the builder knows need neither PyTorch nor an fp32
copy of the model: the INT4 graph is written tensor by tensor. The fp32 original is written too,
the same way, when this machine could run it for the comparison; otherwise it is skipped and the
run says why (ONNX Runtime's CPU kernels have no bf16 MatMul, so a bf16 original cannot stand in).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import psutil

from exporters.builder import build_decoder, supports
from workbench.jobs import Cancelled, Progress
from workbench.run.memory import NO_FIT, RUN_RAM_FACTOR, RUNTIME_OVERHEAD_BYTES, fit_verdict, original_sizes
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo, ResolvedModel

log = logging.getLogger(__name__)


def builder_reason(model: ResolvedModel, settings: QuantSettings) -> str | None:
    """None when the run can take the streamed path, else why not (the optimum export is used then)."""
    if settings.needs_calibration:
        return f"{settings.method} with calibration runs on the PyTorch model"
    return supports(model.path, model.info.model_type)


def original_skip_reason(info: ModelInfo, dest: Path) -> str | None:
    """Why the fp32 original is not written here: it would not run in this machine's free memory, or not fit
    on its disk; None when it is written."""
    needed = int(info.fp32_bytes * RUN_RAM_FACTOR + RUNTIME_OVERHEAD_BYTES)
    available = psutil.virtual_memory().available
    if fit_verdict(needed, available) == NO_FIT:
        return (f"the fp32 original needs about {needed / 2**30:.1f} GiB of RAM to run and {available / 2**30:.1f} "
                "GiB are free, so it was not written; the INT4 model is measured alone")
    free = shutil.disk_usage(dest.parent).free
    if free < 1.2 * info.fp32_bytes:
        return (f"the fp32 original takes {info.fp32_bytes / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of disk "
                "are free, so it was not written; the INT4 model is measured alone")
    return None


def build_original(model: ResolvedModel, dest: Path, *, progress: Progress, cancelled: Cancelled) -> str | None:
    """The fp32 original in `dest`, or the reason it was skipped."""
    reason = original_skip_reason(model.info, dest)
    if reason:
        log.warning("original skipped: %s", reason)
        return reason
    build_decoder(model.path, dest, model.info, None, progress=progress, cancelled=cancelled)
    return None


def build_int4(model: ResolvedModel, dest: Path, settings: QuantSettings, *, progress: Progress,
               cancelled: Cancelled):
    return build_decoder(model.path, dest, model.info, settings, progress=progress, cancelled=cancelled)


def skipped_original(info: ModelInfo, reason: str) -> dict:
    """The original's entry in run.json when it was not written: sizes from the weight shapes, no RAM figure."""
    sizes = original_sizes(info)
    return {"bytes": sum(sizes.values()), "components": sizes, "ram_components": {}, "peak_rss_bytes": None,
            "skipped": reason}
