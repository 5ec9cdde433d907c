"""Work in progress on disk: hidden partial folders that name the process writing them, removed by a
later run once that process is gone (killed, crashed), and file locks between processes."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from workbench.errors import JobCancelled
from workbench.layout import folder_bytes
from workbench.units import format_size

log = logging.getLogger(__name__)

# A folder being written: `.NAME.partial-PID-START-RANDOM`, START the owner's start time in centiseconds,
# so a later run can tell a folder whose process is gone (killed, crashed) even when its pid was reused.
_PARTIAL = re.compile(r"^\..+\.partial-(\d+)-(\d+)-[^/]*$")


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
        size = folder_bytes(path)
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
    return (f"Removed {what} left in {where} by a run that was stopped before it could clean up: "
            f"{format_size(freed)} of disk space given back.")


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
