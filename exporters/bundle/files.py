"""A bundle's bytes: copied in pieces (progress, Cancel) and listed with their SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from exporters.bundle.layout import MANIFEST_FILE
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress

CHUNK = 16 * 2**20


def copy_stream(
    reader: BinaryIO,
    write: Callable[[bytes], object],
    *,
    label: str = "",
    done: int = 0,
    total: int = 1,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> int:
    """Pass `reader`'s bytes to `write` in pieces, so a multi-gigabyte weights file reports progress
    (`done` of `total` bytes, as `label`) and can be cancelled; return `done` plus the bytes passed."""
    while chunk := reader.read(CHUNK):
        check(cancelled)
        write(chunk)
        done += len(chunk)
        progress(done / total, label)
    return done


def file_entries(root: Path, progress: Progress = no_progress, cancelled: Cancelled = never_cancelled) -> list[dict]:
    """Path, size and SHA-256 of every file under `root` but the manifest (and Python's caches)."""
    paths = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and "__pycache__" not in p.relative_to(root).parts
    )
    total = sum(p.stat().st_size for p in paths) or 1
    done = 0
    entries = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as reader:
            done = copy_stream(reader, digest.update, label=path.name, done=done, total=total, progress=progress,
                               cancelled=cancelled)
        entries.append({"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
    return entries
