"""Run folders: created under a temporary name and renamed only when complete; versioned run.json."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil

from workbench.layout import RUN_FILE
from workbench.run.record import RUN_SCHEMA_VERSION, RunRecord
from workbench.units import format_size
from workbench.errors import DISK_FULL, READ_ONLY, WorkbenchError, write_errno
from workbench.partial import partial_dir

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("int4-workbench", "onnxruntime-gpu", "onnxruntime", "onnx", "optimum-onnx", "transformers", "torch")


def check_output_dir(path: Path, needed_bytes: int) -> None:
    """Refuse, before any work, an output folder we could not finish writing."""
    if path.exists():
        raise WorkbenchError(f"{path} already exists. Choose a new folder name, or delete the old run first.")
    parent = _existing_parent(path)
    try:  # a real attempt: permissions, read-only mounts and immutable folders all show here
        Path(tempfile.mkdtemp(prefix=".write-test-", dir=parent)).rmdir()
    except OSError as error:
        raise WorkbenchError(
            f"Cannot write in {parent} ({error.strerror}). Choose another output folder."
        ) from error
    free = shutil.disk_usage(parent).free
    if free < needed_bytes:
        raise WorkbenchError(
            f"Not enough disk space in {parent}: this run needs about {format_size(needed_bytes)}, "
            f"{format_size(free)} are free. Free some space or choose another output folder."
        )


def _existing_parent(path: Path) -> Path:
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it to `final` only if the block completes.

    Any exception, Ctrl-C included, removes the temporary folder: nothing half-written remains.
    """
    final = final.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_dir(final)
    temporary.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a run folder is an ordinary folder
    try:
        yield temporary
        if final.exists():
            raise WorkbenchError(f"{final} appeared while the run was working; the new run was discarded.")
        temporary.rename(final)
    except Exception as error:
        code = write_errno(error)
        if code is None:
            raise
        raise write_failed(OSError(code, os.strerror(code)), final) from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_failed(error: OSError, target: Path) -> WorkbenchError:
    """The user's words for a failed write of `target`."""
    if error.errno in DISK_FULL:
        return WorkbenchError(
            f"Writing {target} failed: {error.strerror}; there is no room for it there. Nothing was kept. Free "
            "some disk space or choose another output folder, then run again."
        )
    if error.errno in READ_ONLY:
        return WorkbenchError(
            f"Cannot write {target}: {error.strerror}. Copy the folder to a place you can write to "
            "(or make it writable) and run again."
        )
    return WorkbenchError(f"Writing {target} failed: {error}. Nothing was kept.")


def write_json(path: Path, data: dict) -> None:
    """Write JSON via a temporary file and an atomic rename, so readers never see half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):  # a read-only folder never got it
            temporary.unlink(missing_ok=True)
        raise write_failed(error, path) from error


def load_versioned_json(path: Path, version: int, *, missing: str, remedy: str, other_version: str) -> dict:
    """A JSON file carrying `schema_version`, refused with a message saying what to do when it is
    missing (`missing`), damaged (`remedy`) or of another version (`other_version`)."""
    if not path.is_file():
        raise WorkbenchError(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WorkbenchError(f"{path} is damaged ({error}); {remedy}.") from error
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != version:
        raise WorkbenchError(
            f"{path} has schema version {found!r}; this workbench reads version {version}. {other_version}"
        )
    return data


def load_run(run_dir: Path) -> RunRecord:
    data = load_versioned_json(
        Path(run_dir) / RUN_FILE,
        RUN_SCHEMA_VERSION,
        missing=f"{run_dir} is not a run folder (no {RUN_FILE}). Give a folder made by `quantize`.",
        remedy="quantize the model again",
        other_version="Open it with the workbench version that made it, or quantize again.",
    )
    return RunRecord.from_dict(data, run_dir=str(Path(run_dir).absolute()))


def save_run(run_dir: Path, record: RunRecord) -> None:
    write_json(Path(run_dir) / RUN_FILE, record.to_dict())


def list_runs(runs_dir: Path) -> list[Path]:
    """Finished run folders under `runs_dir` (work in progress is hidden), newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = [p.parent for p in runs_dir.glob(f"*/{RUN_FILE}") if not p.parent.name.startswith(".")]
    return sorted(runs, key=lambda p: (p / RUN_FILE).stat().st_mtime, reverse=True)


def machine() -> dict:
    """Where figures were measured, for run.json and bundle manifests."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
    }


def versions() -> dict:
    found = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
