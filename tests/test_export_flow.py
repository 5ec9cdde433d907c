"""Export writes exactly where the user says, and says how to use the bundle: a command that starts
with `cd`, a Copy button, an Open folder button."""

from __future__ import annotations

import shlex
import subprocess
import sys

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from ui.pages.export import ExportPage
from conftest import open_run_on, wait_for_jobs


def test_a_new_or_empty_folder_is_the_bundle_and_the_command_runs_it(qtbot, tiny_run, tmp_path, monkeypatch):
    window, page = open_run_on(qtbot, tiny_run, ExportPage)
    assert page.destination.text() == str(tiny_run.parent / f"{tiny_run.name}-bundle")  # a suggestion, shown

    # A folder holding files: the bundle gets a folder of its own inside it, shown before anything is written.
    busy = tmp_path / "shared"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    page.choose(busy)
    assert page.destination.text() == str(busy / f"{tiny_run.name}-bundle")
    # A folder just made in the dialog (empty): the bundle is written exactly there.
    made = tmp_path / "for-the-laptop"
    made.mkdir()
    page.choose(made)
    assert page.destination.text() == str(made)
    opened = []
    monkeypatch.setattr("ui.pages.export.open_path", opened.append)
    qtbot.mouseClick(page.build_button, Qt.MouseButton.LeftButton)
    wait_for_jobs(qtbot)
    assert not page.problem.isVisible(), page.problem.text()
    assert (made / "run.py").is_file() and (made / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["for-the-laptop", "shared"]  # nothing written elsewhere

    command = page.command.text()
    assert command.startswith(f"cd {shlex.quote(str(made))} && ") and page.done_box.isVisible()
    qtbot.mouseClick(page.copy_button, Qt.MouseButton.LeftButton)
    assert QGuiApplication.clipboard().text() == command
    qtbot.mouseClick(page.open_bundle_button, Qt.MouseButton.LeftButton)
    assert opened == [made]
    # The command's `cd` leads to the runner: run it there (its settings check, not a chat).
    where = shlex.split(command.split(" && ")[0])[1]
    done = subprocess.run([sys.executable, "run.py", "--help"], cwd=where, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    window.close()


def test_a_nonempty_destination_is_refused_plainly(qtbot, tiny_run, tmp_path):
    window, page = open_run_on(qtbot, tiny_run, ExportPage)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    page.build(taken)
    wait_for_jobs(qtbot)
    assert "already exists" in page.problem.text() and (taken / "x").read_text() == "x"
    window.close()
