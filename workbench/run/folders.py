"""Run folders: created under a temporary name and renamed only when complete; versioned run.json."""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from workbench.errors import JobCancelled, WorkbenchError

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 1
RUN_FILE = "run.json"
ORIGINAL = "original"
INT4 = "int4"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
# A folder being written: `.NAME.partial-PID-START-RANDOM`, START the owner's start time in centiseconds,
# so a later run can tell a folder whose process is gone (killed, crashed) even when its pid was reused.
_PARTIAL = re.compile(r"^\..+\.partial-(\d+)-(\d+)-[^/]*$")
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
            f"Not enough disk space in {parent}: this run needs about {needed_bytes / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB are free. Free some space or choose another output folder."
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


def write_errno(error: BaseException) -> int | None:
    """The errno of a write that failed for want of space or permission, else None.

    Native writers (torch's ONNX exporter, ONNX Runtime) raise their own errors with the system's text in them.
    """
    if isinstance(error, OSError):
        return error.errno if error.errno in DISK_FULL + READ_ONLY else None
    return next((code for code in DISK_FULL + READ_ONLY if os.strerror(code) in str(error)), None)


def partial_dir(final: Path) -> Path:
    """A new hidden sibling of `final` that names this process as its owner (see remove_abandoned)."""
    me = psutil.Process()
    prefix = f".{final.name}.partial-{me.pid}-{_start_centiseconds(me)}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))


def _start_centiseconds(process: psutil.Process) -> int:
    return round(process.create_time() * 100)


def _owner_alive(pid: int, start: int) -> bool:
    try:
        process = psutil.Process(pid)
        # Start times read twice can differ by a tick; a reused pid started later than that.
        return abs(_start_centiseconds(process) - start) <= 2 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def remove_abandoned(folder: Path) -> tuple[list[Path], int]:
    """Remove the partial folders in `folder` whose owning process is gone; return them and the bytes freed.

    A run stopped by SIGKILL, a crash or a power cut cannot clean up after itself; the next run does.
    """
    folder = Path(folder)
    removed, freed = [], 0
    if not folder.is_dir():
        return removed, freed
    for path in folder.iterdir():
        match = _PARTIAL.match(path.name)
        if not match or not path.is_dir() or _owner_alive(int(match[1]), int(match[2])):
            continue
        size = tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
            freed += size
            log.info("removed %s (%d bytes) left by a process that is gone", path, size)
    return removed, freed


def clean_up_stopped(folders: list[Path]) -> str:
    """remove_abandoned in each folder; one sentence for the user about it ('' when nothing was left)."""
    removed, freed = [], 0
    for folder in folders:
        paths, size = remove_abandoned(folder)
        removed += paths
        freed += size
    if not removed:
        return ""
    what = "an unfinished folder" if len(removed) == 1 else f"{len(removed)} unfinished folders"
    where = ", ".join(sorted({str(p.parent) for p in removed}))
    amount = f"{freed / 1e6:,.1f} MB" if freed >= 1e5 else f"{freed / 1e3:,.1f} kB"
    return (f"Removed {what} left in {where} by a run that was stopped before it could clean up: "
            f"{amount} of disk space given back.")


@contextlib.contextmanager
def locked(path: Path, *, cancelled=lambda: False, waiting=lambda: None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if needed) for the block; other processes wait.

    The lock goes with its process: a killed holder never leaves it locked.
    """
    import fcntl

    with open(path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waiting()
                if cancelled():
                    raise JobCancelled() from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tree_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


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


def load_run(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise WorkbenchError(f"{run_dir} is not a run folder (no {RUN_FILE}). Give a folder made by `quantize`.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WorkbenchError(f"{path} is damaged ({error}); quantize the model again.") from error
    version = record.get("schema_version")
    if version != RUN_SCHEMA_VERSION:
        raise WorkbenchError(
            f"{path} has schema version {version!r}; this workbench reads version {RUN_SCHEMA_VERSION}. "
            "Open it with the workbench version that made it, or quantize again."
        )
    return record


def save_run(run_dir: Path, record: dict) -> None:
    write_json(Path(run_dir) / RUN_FILE, record)


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
