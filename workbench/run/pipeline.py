"""The headless journey: model -> fp32 ONNX -> INT4 ONNX -> a finished run folder.

`quantize_run` is the one long step the CLI's `quantize`, the GUI's Quantize page and the tests
all call. It writes into a temporary folder and renames it at the end (see runs.staged_dir).
Its pieces (`prepare`, `quantize_int4`, `finish_run`) also serve auto-tune (workbench.run.tune),
which makes several INT4 variants from one export.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from exporters.onnx_export import export_onnx
from workbench.jobs import (
    Cancelled,
    Progress,
    Stage,
    Stages,
    check,
    never_cancelled,
    no_progress,
    sub_progress,
)
from workbench.run.memory import (
    fit_verdict,
    graph_sizes,
    measure_session_memory,
    original_fits,
    quantize_peak_ram,
    ram_components,
    run_disk_bytes,
    run_int4_ram,
    run_original_ram,
    shrink_ram,
)
from workbench.quantization.int4_graph import QuantizeResult, layer_plan, quantize_onnx, written_op_counts
from workbench.run.rates import Estimate, RunShape, estimate, remember
from workbench.run.report import write_report
from workbench.layout import INT4, ORIGINAL, folder_model_bytes
from workbench.run import stages as stage
from workbench.run.record import DATA_FREE, ModelFigures, RunRecord, RunSource
from workbench.run.streamed import (
    build_original,
    builder_reason,
    calibration_samples,
    quantize_streamed,
    skipped_original,
    streamable,
)
from workbench.run.folders import (
    check_output_dir,
    machine,
    save_run,
    staged_dir,
    versions,
)
from workbench.quantization.methods import METHODS
from workbench.quantization.sensitivity import eight_bit_layers, measure_layers, with_eight_bit
from workbench.settings import QuantSettings
from workbench.sources import ResolvedModel, load_torch_model, resolve, weights_folder

log = logging.getLogger(__name__)
NOT_ASKED = "the fp32 original was not kept, as asked; the INT4 model is measured alone"
BUILT_FUSION = {"attention": "GroupQueryAttention", "built": "written fused from the weights by the graph builder"}


@dataclass
class Source:
    """What every INT4 variant of one model is made from: the fp32 export and, when a step needs
    them, the PyTorch model and its calibration samples."""

    model: ResolvedModel
    original_dir: Path
    calibration: str | None  # as run.json records it
    torch_model: object = None
    samples: np.ndarray | None = None
    built: bool = False  # both graphs written by the graph builder (workbench.run.streamed)
    original_skipped: str | None = None  # why there is no original/ (too large to run here)

    @property
    def info(self):
        return self.model.info


def quantize_run(
    spec: str | ResolvedModel,
    run_dir: Path,
    settings: QuantSettings,
    *,
    calibration: Path | None = None,
    trust_remote_code: bool = False,
    preset: str | None = None,
    original: bool = True,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
    started: float | None = None,
) -> RunRecord:
    """Quantize a model into `run_dir`; return the run record (also saved as run.json). Without `original`
    the fp32 original is not kept, and the INT4 model is measured alone.

    `started` (a time.time()): when the wait for this run began, if before this call (a command's
    start); the rates learn the time outside the stages from then."""
    run_dir = Path(run_dir)
    check_output_dir(run_dir, 0)  # before the (possibly long) model resolution
    calibrated = settings.needs_calibration
    reads = calibration if calibrated else None
    # Each stage weighs what it takes on this machine, so the overall fraction is a share of the time.
    # A model still to open is taken to suit the graph builder until it is open.
    if isinstance(spec, ResolvedModel):
        plan = estimate_run(spec, settings, calibration, original=original)
    else:
        plan = estimate(10**9, RunShape(settings, reads, streamable(settings), opens_model=True),
                        stage_names(settings, built=streamable(settings), opens_model=True))
    stages = Stages(progress, [(s, plan.stages.get(s.name, 0.0)) for s, _ in run_stages(settings)])
    opened = time.time()
    model = resolve_model(spec, run_dir, stages, trust_remote_code, cancelled, settings)
    settings = settings.for_model(model.info.parameters, reads_file=calibration is not None)
    settings.check_patterns([w.name for w in model.info.weights])
    if calibration is not None and not calibrated:
        log.warning("%s does not use calibration data; %s is ignored", settings.method, calibration)
    with staged_dir(run_dir) as work:
        source = prepare(model, work, stages, settings, reads, trust_remote_code, cancelled, original=original)
        sensitivity = None
        if settings.sensitive_8bit_pct:
            measured = stages.run("sensitivity", lambda p: measure_layers(
                source.torch_model, source.samples, source.info, settings, progress=p, cancelled=cancelled))
            sensitivity = measured.section(source.info, settings)
        result = quantize_int4(stages, source, work / INT4, settings, sensitivity, cancelled)
        source.torch_model = None  # the ONNX steps need its memory
        record = finish_run(work, stages, source, settings, result, cancelled,
                            preset=preset, extra={"sensitivity": sensitivity} if sensitivity else {})
    record = record.replace(run_dir=str(run_dir.absolute()))
    # Converting the demo or a GGUF file happens once: it would teach the model stage a time no later run takes.
    timings = {name: seconds for name, seconds in record.timings_s.items()
               if not (name == "model" and converted_since(model, opened))}
    remember(timings, record.model.parameters,
             RunShape(settings, reads, source.built, original=source.original_skipped is None,
                      opens_model=not isinstance(spec, ResolvedModel)),
             rest_s=time.time() - (started or opened) - sum(record.timings_s.values()))
    return record


def converted_since(model: ResolvedModel, moment: float) -> bool:
    """Whether `model` was converted to a folder (demo, GGUF) after `moment` (a time.time()); a second
    of slack for file systems that keep whole seconds."""
    return model.info.kind in ("demo", "gguf") and (model.path / "config.json").stat().st_mtime > moment - 1.0


def run_stages(settings: QuantSettings, *, built: bool | None = None) -> list[tuple[Stage, float]]:
    """The stages of `quantize_run` for these settings, in order; weight 0: not run (`built`: the
    graph builder writes the graphs, which fuses attention itself; None: wherever the settings allow).
    What each weighs is how long it takes on this machine (estimate_run)."""
    built = streamable(settings) if built is None else built
    return [
        (stage.MODEL, 1),
        (stage.EXPORT, 1),
        (stage.CALIBRATION, 1 if settings.needs_calibration else 0),
        (stage.SENSITIVITY, 1 if settings.sensitive_8bit_pct else 0),
        *method_stages(settings),
        (stage.FUSE, 0 if built else 1),
        (stage.MEASURE, 1),
    ]


def stage_names(settings: QuantSettings, *, built: bool, opens_model: bool) -> list[str]:
    """The stages a run goes through, by name; "model" only when the run opens the model itself."""
    return [s.name for s, weight in run_stages(settings, built=built) if weight and (opens_model or s.name != "model")]


def estimate_run(model: ResolvedModel, settings: QuantSettings, calibration: Path | None = None, *,
                 opens_model: bool = False, original: bool = True) -> Estimate:
    """How long `quantize_run` should take here for `model` (rates learnt on this machine), counting
    the stages it will go through: the graph builder's where it can write this model, no fp32
    original where it would not run here or is not asked for (`original`), and opening the model
    only when `opens_model` (the CLI opens it; the app's Quantize step has it open already)."""
    settings = settings.for_model(model.info.parameters, reads_file=calibration is not None)
    reads = calibration if settings.needs_calibration else None
    built = builder_reason(model, settings) is None
    shape = RunShape(settings, reads, built, original=not built or (original and original_fits(model.info)),
                     opens_model=opens_model)
    return estimate(model.info.parameters, shape, stage_names(settings, built=built, opens_model=opens_model))


@dataclass(frozen=True)
class RunPlan:
    """What a run with these settings will cost on this machine, before it starts: the one source of `info`'s
    estimates and the app's fit verdicts and times (RAM from workbench.run.memory, time from the rates)."""

    time: Estimate
    streamed: bool  # the graph builder's path (else the optimum export)
    shrink_ram: int  # peak RAM through the INT4 model written
    run_int4_ram: int
    run_original_ram: int
    original_skipped: bool  # a streamed run will not write the original: it would not run in the free RAM
    peak_ram: int  # the whole `quantize`, measuring each side included
    available: int  # free RAM now, which the verdicts are of

    def fit(self, needed: int) -> str:
        return fit_verdict(needed, self.available)

    def to_dict(self) -> dict:
        """`info --json`'s `estimates` entry of a preset."""
        return {
            "seconds": round(self.time.seconds), "estimate": self.time.basis, "peak_ram_bytes": self.peak_ram,
            "shrink_ram_bytes": self.shrink_ram, "run_int4_ram_bytes": self.run_int4_ram,
            "run_original_ram_bytes": self.run_original_ram, "original_skipped": self.original_skipped,
            "path": "streamed" if self.streamed else "export",
            "fit": {"shrink": self.fit(self.shrink_ram), "run_int4": self.fit(self.run_int4_ram),
                    "run_original": self.fit(self.run_original_ram)},
        }


def plan_run(model: ResolvedModel, settings: QuantSettings, calibration: Path | None = None, *,
             opens_model: bool = False) -> RunPlan:
    """What `quantize_run` of `model` with these settings needs here, in time and RAM."""
    settings = settings.for_model(model.info.parameters, reads_file=calibration is not None)
    streamed = builder_reason(model, settings) is None
    info = model.info
    return RunPlan(
        time=estimate_run(model, settings, calibration, opens_model=opens_model),
        streamed=streamed,
        shrink_ram=shrink_ram(info, settings, streamed),
        run_int4_ram=run_int4_ram(info, settings),
        run_original_ram=run_original_ram(info),
        original_skipped=streamed and not original_fits(info),
        peak_ram=quantize_peak_ram(info, settings, streamed),
        available=psutil.virtual_memory().available,
    )


def method_stages(settings: QuantSettings) -> list[tuple[Stage, float]]:
    """The weighted stages of `quantize_int4` for these settings."""
    return [*((m.stage, m.weight if m.name == settings.method else 0) for m in METHODS.values() if m.stage),
            (stage.INT4, 2)]


def resolve_model(spec: str | ResolvedModel, run_dir: Path, stages: Stages, trust_remote_code: bool,
                  cancelled: Cancelled, settings: QuantSettings, *, streamed: bool = True) -> ResolvedModel:
    """The model behind `spec` (stage "model"), once `run_dir` is known to have room for a run of it
    with these settings (on the streamed path where `streamed` and the model allow it)."""
    model = spec if isinstance(spec, ResolvedModel) else stages.run(
        "model", lambda p: resolve(spec, trust_remote_code=trust_remote_code, progress=p, cancelled=cancelled)
    )
    streamed = streamed and builder_reason(model, settings) is None
    check_output_dir(run_dir, needed_bytes=run_disk_bytes(model.info, settings, streamed))
    return model


def prepare(model: ResolvedModel, work: Path, stages: Stages, settings: QuantSettings, calibration: Path | None,
            trust_remote_code: bool, cancelled: Cancelled, *, streamed: bool = True, original: bool = True) -> Source:
    """Stage "export" into `work`/original, then, when the settings need them, the PyTorch model
    and stage "calibration" (from the file, or written by the model itself when there is none).
    With `streamed` the graph builder writes the graphs where it can (workbench.run.streamed);
    without `original` the fp32 original is not kept (the export path deletes it once quantized)."""
    original_dir = work / ORIGINAL
    why_not = builder_reason(model, settings) if streamed else "the PyTorch model is needed"
    if why_not is None:
        skipped = stages.run("export", lambda p: build_original(model, original_dir, settings, progress=p,
                                                                cancelled=cancelled)) if original else NOT_ASKED
        samples = stages.run("calibration", lambda p: calibration_samples(
            model, work, settings, calibration, progress=p, cancelled=cancelled)) if settings.needs_calibration else None
        return Source(model, original_dir, _calibration_label(settings, calibration), samples=samples, built=True,
                      original_skipped=skipped)
    log.info("graph builder not used: %s", why_not)

    def export(progress: Progress) -> Path:
        """optimum reads transformers' folder: a GGUF source's fp32 conversion, made here if not yet."""
        folder = weights_folder(model.path, progress=sub_progress(progress, 0.0, 0.3), cancelled=cancelled)
        export_onnx(folder, original_dir, parameters=model.info.parameters, trust_remote_code=trust_remote_code,
                    progress=sub_progress(progress, 0.3 if folder != model.path else 0.0, 1.0), cancelled=cancelled)
        return folder

    weights = stages.run("export", export)
    skipped = None if original else NOT_ASKED
    if not settings.needs_calibration:
        return Source(model, original_dir, None, original_skipped=skipped)
    torch_model, tokenizer = load_torch_model(weights, trust_remote_code)
    samples = stages.run(
        "calibration",
        lambda p: _calibration_samples(calibration, torch_model, tokenizer, settings, p, cancelled),
    )
    return Source(model, original_dir, _calibration_label(settings, calibration), torch_model, samples,
                  original_skipped=skipped)


def _calibration_label(settings: QuantSettings, calibration: Path | None) -> str | None:
    if not settings.needs_calibration:
        return None
    return str(calibration) if calibration else DATA_FREE


def quantize_int4(stages: Stages, source: Source, dest: Path, settings: QuantSettings, sensitivity: dict | None,
                  cancelled: Cancelled) -> QuantizeResult:
    """The method's own pass on the PyTorch model when it has one (GPTQ, AWQ), then the INT4 graph in
    `dest` (stages of `method_stages`); the layers chosen in a `sensitivity` section stay at 8 bits."""
    settings = with_eight_bit(settings, eight_bit_layers(sensitivity))
    if source.built:
        return quantize_streamed(stages, source.model, source.samples, dest, settings,
                                 _torch_plan(source.info, settings), cancelled)
    method = METHODS[settings.method]
    precomputed = overrides = None
    if method.function:
        import torch

        inputs = (source.torch_model, torch.as_tensor(source.samples), _torch_plan(source.info, settings), settings)
        precomputed, overrides = stages.run(
            method.stage.name, lambda p: method.run(*inputs, progress=p, cancelled=cancelled)
        )
    return stages.run(
        "int4",
        lambda p: quantize_onnx(
            source.original_dir, dest, source.info, settings, precomputed=precomputed, overrides=overrides,
            progress=p, cancelled=cancelled,
        ),
    )


def finish_run(work: Path, stages: Stages, source: Source, settings: QuantSettings, result: QuantizeResult,
               cancelled: Cancelled, *, preset: str | None, extra: dict) -> RunRecord:
    """Stages "fuse" and "measure" on `work`/original and `work`/int4, then run.json (with the
    `extra` sections: RunRecord fields) and the report."""
    int4_dir = work / INT4
    # After quantization, which maps MatMuls to modules by node name.
    fusion = BUILT_FUSION if source.built else stages.run(
        "fuse", lambda p: _fuse(source.original_dir, int4_dir, p, cancelled))
    if source.original_skipped:  # the export path needed it to make the INT4 graph
        shutil.rmtree(source.original_dir, ignore_errors=True)
    measured = stages.run("measure", lambda p: _measure(source.original_dir, int4_dir, source.info, p, cancelled,
                                                        skipped=source.original_skipped))
    check(cancelled)
    model, info = source.model, source.info
    record = RunRecord(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        source=RunSource(spec=model.spec, kind=info.kind, name=info.name, path=str(model.path)),
        model=info,
        preset=preset,
        settings=settings,
        calibration=source.calibration,
        original=ModelFigures(**measured[ORIGINAL]),
        int4=ModelFigures(**measured[INT4]),
        size_ratio=measured["size_ratio"],
        ram_ratio=measured["ram_ratio"],
        bits_per_weight=measured["bits_per_weight"],
        graph=fusion,
        int4_layers=result.layer_bits,
        shared_embeddings=result.shared_embeddings,
        ops=written_op_counts(int4_dir),
        timings_s=stages.timings,
        machine=machine(),
        versions=versions(),
        **{"quality": (), **extra},
    )
    save_run(work, record)
    write_report(work, record)
    return record


def _fuse(original_dir: Path, int4_dir: Path, progress: Progress, cancelled: Cancelled) -> dict:
    """Fused attention for both graphs, or neither: a fused and a plain graph do not compare fairly."""
    from exporters.optimize import fuse_folder

    progress(0.0, "original")
    first = fuse_folder(original_dir)
    check(cancelled)
    if not first.fused:
        return {"attention": "plain", "reason": first.reason}
    progress(0.5, "int4")
    second = fuse_folder(int4_dir)
    if not second.fused:
        raise RuntimeError(f"attention fused in the original graph but not in the INT4 one: {second.reason}")
    return {"attention": "GroupQueryAttention", "nodes": {"original": first.nodes_after, "int4": second.nodes_after}}



def _calibration_samples(path, model, tokenizer, settings: QuantSettings, progress: Progress, cancelled: Cancelled):
    from workbench.quantization.calibration import file_samples, self_written_samples

    if path is None:
        return self_written_samples(
            model, tokenizer, settings.samples, settings.calibration_tokens,
            progress=progress, cancelled=cancelled,
        )
    return file_samples(path, tokenizer, settings, progress)


def _torch_plan(info, settings: QuantSettings) -> dict[str, int]:
    """Bits per linear for the PyTorch-side methods: the embeddings are left to the INT4 step."""
    embeddings = {w.name for w in info.weights if w.role == "embeddings"}
    return {name: bits for name, bits in layer_plan(info, settings).items() if bits and name not in embeddings}


def _measure(original_dir: Path, int4_dir: Path, info, progress: Progress, cancelled: Cancelled,
             skipped: str | None = None) -> dict:
    """Sizes per component (disk) and measured peak RAM of a real session for both models (the INT4 one
    alone when the original was `skipped`, with the reason)."""
    record = {ORIGINAL: skipped_original(info, skipped)} if skipped else {}
    for index, (key, folder) in enumerate(((ORIGINAL, original_dir), (INT4, int4_dir))):
        if key in record:
            continue
        disk = graph_sizes(folder, info)
        memory = measure_session_memory(
            folder,
            progress=lambda f, m, i=index, k=key: progress((i + f) / 2, f"{k}: {m}"),
            cancelled=cancelled,
        )
        record[key] = {
            "bytes": folder_model_bytes(folder),
            "components": disk,
            "ram_components": ram_components(disk, memory),
            "peak_rss_bytes": memory.peak_rss,
        }
    original, int4 = record[ORIGINAL], record[INT4]
    record["size_ratio"] = round(original["bytes"] / int4["bytes"], 3)
    record["ram_ratio"] = round(original["peak_rss_bytes"] / int4["peak_rss_bytes"], 3) if not skipped else None
    record["bits_per_weight"] = round(8 * int4["bytes"] / info.parameters, 3)
    return record

