"""SIGTERM and SIGKILL sent to a real `quantize` (issue 11, item 2): SIGTERM cleans up as Ctrl-C does,
children die with their parent, and the next run removes what a killed run left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workbench.partial import clean_up_stopped, partial_dir, remove_abandoned
from workbench.units import format_size

ROOT = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 120


def start_quantize(model: Path, run: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "quantize", str(model), "-o", str(run), "--method", "rtn", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_for_export_child(process: subprocess.Popen, runs: Path) -> psutil.Process:
    """The export child, once it runs and the partial run folder exists."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        children = psutil.Process(process.pid).children()
        if children and any(p.name.startswith(".") for p in runs.iterdir()):
            return children[0]
        time.sleep(0.1)
    raise AssertionError("the export did not start")


def gone(process: psutil.Process, seconds: float = 3.0) -> bool:
    try:
        process.wait(seconds)
        return True
    except psutil.TimeoutExpired:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its new parent


@pytest.fixture
def runs(tmp_path) -> Path:
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


def test_sigterm_cleans_up_like_ctrl_c(tiny_llama, runs):
    process = start_quantize(tiny_llama, runs / "run")
    child = wait_for_export_child(process, runs)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == 143
    assert "stopped (SIGTERM); nothing was written." in stderr and "Traceback" not in stderr
    assert list(runs.iterdir()) == []
    assert gone(child)


def test_sigkill_takes_the_child_along_and_the_next_run_cleans_up(tiny_llama, runs):
    process = start_quantize(tiny_llama, runs / "run")
    child = wait_for_export_child(process, runs)
    process.kill()
    process.communicate(timeout=WAIT_SECONDS)
    assert gone(child)  # PR_SET_PDEATHSIG: not left exporting for nobody
    left = list(runs.iterdir())
    assert len(left) == 1 and ".partial-" in left[0].name
    # The next run, even one refused at once, removes it and says what it gave back.
    done = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "quantize", str(runs / "no-such-model"), "-o", str(runs / "next"), "-q"],
        capture_output=True, text=True, timeout=WAIT_SECONDS, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "Removed an unfinished folder left in" in done.stderr and "of disk space given back" in done.stderr
    assert list(runs.iterdir()) == []


def test_partial_folders_of_live_processes_are_kept(runs):
    ours = partial_dir(runs / "mine")
    (ours / "model.onnx.data").write_bytes(b"x" * 1000)
    reused = runs / f".other.partial-{os.getpid()}-1-abcd"  # this pid, but a process started long ago: pid reuse
    reused.mkdir()
    (reused / "model.onnx.data").write_bytes(b"x" * 3000)
    removed, freed = remove_abandoned(runs)
    assert removed == [reused] and freed == 3000
    assert ours.is_dir()
    shutil.rmtree(ours)


def test_the_app_cleans_up_at_start(qtbot, runs):
    from ui.main_window import MainWindow

    stale = runs / ".old.partial-999999999-1-abcd"  # no such process
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"x" * 2_000_000)
    window = MainWindow(runs)
    qtbot.addWidget(window)
    assert not stale.exists()
    assert f"{format_size(2_000_000)} of disk space given back" in window.statusBar().currentMessage()
    assert clean_up_stopped([runs]) == ""
