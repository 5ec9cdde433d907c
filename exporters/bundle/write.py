"""Writing a bundle: a new folder, or a zip written beside its final name and renamed when complete."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from exporters import serving, triton
from exporters.bundle.card import base_model, model_card
from exporters.bundle.chat_template import chat_format_of
from exporters.bundle.check import record_check
from exporters.bundle.files import copy_stream, file_entries
from exporters.bundle.genai import GENAI_VERSION, genai_config, genai_unsupported
from exporters.bundle.layout import (
    BUNDLE_SCHEMA_VERSION,
    ENGINE_FILE,
    ENGINE_SOURCE,
    GENAI_FILE,
    MANIFEST_FILE,
    README_FILE,
    REQUIREMENTS_FILE,
    RUNNER_DIR,
    RUNNER_FILES,
    RUNNER_SETTINGS,
    TARGETS,
    Layout,
)
from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.generation.runtime import context_length_of, eos_token_ids_of
from workbench.generation.runtime import model_files as checked_model_files  # `model_files` names the list here
from workbench.jobs import Cancelled, Progress, Stages, never_cancelled, no_progress
from workbench.layout import INT4, SIDE_FILES
from workbench.errors import DISK_FULL
from workbench.run.folders import check_output_dir, load_run, staged_dir, write_failed, write_json
from workbench.run import stages as stage
from workbench.run.record import RunRecord
from workbench.run.wording import verdict

log = logging.getLogger(__name__)
# What a bundle's runner needs, by distribution name; onnxruntime-gpu is the CUDA build of the first.
RUNNER_PACKAGES = ("onnxruntime", "tokenizers", "numpy")
MODEL_FACTS = ("architecture", "model_type", "parameters", "layers", "hidden_size", "vocab_size", "context_length",
               "tied_embeddings")


@dataclass(frozen=True)
class BundleResult:
    path: Path  # the bundle folder, or the zip file
    target: str
    bytes: int
    files: int
    check: dict  # the fixed prompt's recorded answer
    genai: dict  # {"written": bool, "reason": str}

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def build_bundle(
    run_dir: Path,
    out: Path,
    *,
    target: str = "runner",
    zip_file: bool = False,
    name: str | None = None,
    ray_scale: serving.RayScale | None = None,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> BundleResult:
    """Write the bundle of `run_dir` to `out` (a new folder), or to `out`.zip with `zip_file`.

    `ray_scale` (the ray-serve target only): the replicas or autoscaling bounds in serve_config.yaml.
    """
    if target not in TARGETS:
        raise WorkbenchError(f"Unknown bundle target {target!r}; choose {', '.join(TARGETS)}.")
    if ray_scale is not None and target != "ray-serve":
        raise WorkbenchError("Replicas and autoscaling bounds belong to the ray-serve target: add --target ray-serve.")
    ray_scale = ray_scale or serving.RayScale()
    ray_config = serving.ray_serve_config(ray_scale) if target == "ray-serve" else None  # checks the bounds first
    run_dir, out = Path(run_dir), Path(out)
    record = load_run(run_dir)
    model_dir = run_dir / INT4
    final = out.with_name(out.name if out.suffix == ".zip" else out.name + ".zip") if zip_file else out
    model_files = checked_model_files(model_dir)
    size = sum((model_dir / f).stat().st_size for f in model_files)
    check_output_dir(final, needed_bytes=int(size * (2.1 if zip_file else 1.1)))
    layout = Layout.for_target(target, triton.model_name(name or f"{record.source.name}-int4"))
    stages = Stages(progress, [(stage.COPY, 6), (stage.CHECK, 2), (stage.CHECKSUMS, 2), (stage.ZIP, 4 if zip_file else 0)])
    with _scratch(final) if zip_file else staged_dir(final) as work:
        stages.run("copy", lambda p: _copy_model(model_dir, work, layout, model_files, p, cancelled))
        settings = _runner_settings(model_dir, layout)
        write_json(work / RUNNER_SETTINGS, settings)
        recorded = stages.run("check", lambda p: record_check(work, model_dir, settings, p))
        genai = _write_target_files(work, layout, record, model_dir, settings)
        if ray_config is not None:
            (work / serving.RAY_CONFIG_FILE).write_text(ray_config, encoding="utf-8")
        (work / README_FILE).write_text(model_card(record, layout, genai), encoding="utf-8")
        files = stages.run("checksums", lambda p: file_entries(work, p, cancelled))
        manifest = _manifest(record, layout, files, recorded, genai)
        write_json(work / MANIFEST_FILE, manifest)
        if zip_file:
            stages.run("zip", lambda p: _zip(work, final, p, cancelled))
    total = final.stat().st_size if zip_file else sum(f["bytes"] for f in files)
    log.info("bundle %s: %d files, %d bytes", final, len(files) + 1, total)
    return BundleResult(final, target, total, len(files) + 1, recorded, genai)


@contextlib.contextmanager
def _scratch(near: Path) -> Iterator[Path]:
    """A temporary folder beside `near` (same disk), removed afterwards whatever happens."""
    near.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{near.name}.partial-", dir=near.parent) as folder:
        yield Path(folder)


def _copy_model(model_dir: Path, work: Path, layout: Layout, model_files: list[str], progress: Progress, cancelled) -> None:
    (work / layout.model_dir).mkdir(parents=True, exist_ok=True)
    total = sum((model_dir / f).stat().st_size for f in model_files) or 1
    done = 0
    for file in model_files:
        with open(model_dir / file, "rb") as reader, open(work / layout.model(file), "wb") as writer:
            done = copy_stream(reader, writer.write, label=file, done=done, total=total, progress=progress,
                               cancelled=cancelled)
    for file in SIDE_FILES:
        if (model_dir / file).is_file():
            shutil.copyfile(model_dir / file, work / file)


def _runner_settings(model_dir: Path, layout: Layout) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise WorkbenchError(
            f"{model_dir} has no tokenizer.json, which the runner's `tokenizers` library reads; bundles need a "
            "model with a fast (Rust) tokenizer."
        )
    return {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "model": layout.model(),
        "tokenizer": "tokenizer.json",
        "context_length": context_length_of(model_dir),
        "eos_token_ids": eos_token_ids_of(model_dir, tokenizer),
        "chat": chat_format_of(tokenizer),
    }


def _write_target_files(work: Path, layout: Layout, record: RunRecord, model_dir: Path, settings: dict) -> dict:
    """The target's own files; returns whether genai_config.json was written, and why (not)."""
    if layout.target == "triton":
        model_path = work / layout.model()
        inputs, outputs = triton.graph_interface(model_path)
        text = triton.render_config(layout.name, inputs, outputs)
        triton.check_config(text, layout.name, model_path)
        (work / layout.name / triton.CONFIG_FILE).write_text(text, encoding="utf-8")
        return {"written": False, "reason": "Triton serves the model; genai_config.json belongs to the runner target."}
    for file in RUNNER_FILES:
        shutil.copyfile(RUNNER_DIR / file, work / file)
    shutil.copyfile(ENGINE_SOURCE, work / ENGINE_FILE)
    (work / REQUIREMENTS_FILE).write_text(requirements(), encoding="utf-8")
    (work / serving.RAY_REQUIREMENTS_FILE).write_text(serving.ray_requirements(), encoding="utf-8")
    model_type = record.model.model_type
    reason = genai_unsupported(model_type, model_dir)
    if reason is None:
        write_json(work / GENAI_FILE, genai_config(model_dir, settings))
        return {"written": True, "reason": f"onnxruntime-genai {GENAI_VERSION} was checked here on {model_type} graphs like this one."}
    return {"written": False, "reason": reason}


def requirements() -> str:
    """Exact versions of the runner's packages as installed here: the set the bundle was checked with."""
    import importlib.metadata

    import onnxruntime

    pins = {"onnxruntime": onnxruntime.__version__}
    pins.update({p: importlib.metadata.version(p) for p in RUNNER_PACKAGES if p not in pins})
    lines = [
        "# The runner's packages, as the bundle was checked with them. For an NVIDIA GPU install",
        f"# onnxruntime-gpu=={pins['onnxruntime']} instead of onnxruntime (then run.py --provider cuda).",
        *(f"{p}=={v}" for p, v in pins.items()),
    ]
    return "\n".join(lines) + "\n"


def _manifest(record: RunRecord, layout: Layout, files: list[dict], recorded: dict, genai: dict) -> dict:
    source = record.source
    return {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "kind": "int4-workbench-bundle",
        "target": layout.target,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "made_with": {"int4-workbench": __version__, **record.versions},
        "source": {"name": source.name, "kind": source.kind, "spec": source.spec, "base_model": base_model(record)},
        "model": {key: getattr(record.model, key) for key in MODEL_FACTS},
        "preset": record.preset,
        "settings": record.settings.to_dict(),
        "graph": record.graph,
        "layout": {"model": layout.model(), "runner_settings": RUNNER_SETTINGS,
                   **({"triton_model": layout.name} if layout.target == "triton" else {})},
        "metrics": {
            "size": {"original_bytes": record.original.bytes, "int4_bytes": record.int4.bytes,
                     "size_ratio": record.size_ratio, "bits_per_weight": record.bits_per_weight},
            "memory": {"original_peak_rss_bytes": record.original.peak_rss_bytes,
                       "int4_peak_rss_bytes": record.int4.peak_rss_bytes, "ram_ratio": record.ram_ratio,
                       "provider": "cpu", "machine": record.machine},
            "quality": [q.to_dict() for q in record.quality],
            "speed": record.speed.to_dict() if record.speed else None,
        },
        "verdict": verdict(record),
        "check": recorded,
        "genai": genai,
        "files": files,
    }


def _zip(work: Path, final: Path, progress: Progress, cancelled: Cancelled) -> None:
    """All files under one top folder named like the zip, written to a temporary name, then renamed."""
    temporary = final.with_name(f".{final.name}.partial")
    paths = sorted(p for p in work.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in paths) or 1
    done = 0
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            for path in paths:
                entry = zipfile.ZipInfo.from_file(path, f"{final.stem}/{path.relative_to(work).as_posix()}")
                entry.compress_type = zipfile.ZIP_DEFLATED
                with open(path, "rb") as reader, archive.open(entry, "w", force_zip64=True) as writer:
                    done = copy_stream(reader, writer.write, label=path.name, done=done, total=total,
                                       progress=progress, cancelled=cancelled)
        if final.exists():
            raise WorkbenchError(f"{final} appeared while the bundle was written; the new bundle was discarded.")
        os.replace(temporary, final)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise write_failed(error, final) from error
        raise
    finally:
        temporary.unlink(missing_ok=True)
