"""Shared fixtures: tiny real models (built, never downloaded) and their ONNX exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models import build_model

# No test may reach the network or the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Converted GGUF models go to a per-session cache (the demo test opts out: it is slow to convert)."""
    os.environ["INT4_WORKBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama") / "model", "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-qwen2") / "model", "qwen2")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen}[request.param]


def _export(model_dir: Path, dest: Path) -> Path:
    from exporters.onnx_export import export_onnx
    from workbench.sources import inspect_folder

    export_onnx(model_dir, dest, parameters=inspect_folder(model_dir).parameters)
    return dest


@pytest.fixture(scope="session")
def tiny_llama_onnx(tiny_llama, tmp_path_factory) -> Path:
    return _export(tiny_llama, tmp_path_factory.mktemp("tiny-llama-onnx") / "original")


@pytest.fixture(scope="session")
def tiny_qwen_onnx(tiny_qwen, tmp_path_factory) -> Path:
    return _export(tiny_qwen, tmp_path_factory.mktemp("tiny-qwen2-onnx") / "original")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_pair(request, tiny_llama, tiny_qwen, tiny_llama_onnx, tiny_qwen_onnx) -> tuple[Path, Path]:
    """(HF folder, fp32 ONNX folder) of each tiny architecture."""
    if request.param == "llama":
        return tiny_llama, tiny_llama_onnx
    return tiny_qwen, tiny_qwen_onnx


@pytest.fixture(scope="session")
def qapp(qapp_args):
    """pytest-qt's application, made the way the app makes it (style, font, theme)."""
    from ui.app import create_app

    return create_app(qapp_args)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory) -> Path:
    """A finished run of the tiny model (RTN, recorded under the balanced preset), alone in its runs folder."""
    from workbench.run.pipeline import quantize_run
    from workbench.settings import QuantSettings

    run = tmp_path_factory.mktemp("runs") / "tiny-rtn"
    quantize_run(str(tiny_llama), run, QuantSettings(method="rtn"), preset="balanced")
    return run
