"""Shared fixtures: tiny real models (built, never downloaded) and their ONNX exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model
from workbench.errors import JobCancelled

# No test may reach the network or the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
JOB_TIMEOUT_MS = 180_000  # a GUI job on a tiny model, on a busy machine


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """GGUF sources' folders and fp32 conversions go to a per-session cache (the demo tests opt out: the
    demo's fp32 conversion, which the optimum export reads, is slow to redo)."""
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


# -- helpers shared by the test modules (they import them from here) -------------------------------


def prose_text(paragraphs: int = 40) -> str:
    """Plain English paragraphs of the kind a user calibrates with and judges on."""
    return "\n\n".join(
        f"Paragraph {i}. The workbench turns a large language model into a small one. It keeps the weights "
        f"in four bits, block by block, and measures what the smaller model lost. Teams run it on office "
        f"machines without a graphics card, and compare the answers side by side before they deploy."
        for i in range(paragraphs)
    )


PROSE = prose_text()


@pytest.fixture
def prose(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE, encoding="utf-8")
    return path


def cli(*args, env=None, preexec_fn=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, timeout=timeout,
    )


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


# -- PyTorch models and calibration ids (GPTQ, AWQ, sensitivity) -----------------------------------


def calibration_ids(model, samples=8, tokens=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (samples, tokens), generator=generator)


def sampled_ids(model, samples=32, tokens=64, seed=0):
    """Text the model itself writes: its loss on it is meaningful, unlike on random ids."""
    torch.manual_seed(seed)
    start = torch.full((samples, 1), model.config.bos_token_id)
    with torch.no_grad():
        return model.generate(start, do_sample=True, max_new_tokens=tokens - 1, min_new_tokens=tokens - 1,
                              pad_token_id=model.config.pad_token_id)


def full_plan(model, bits=4, eight_bit=()):
    return {
        name: 8 if any(part in name for part in eight_bit) else bits
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def correlated_inputs(k, tokens=2048, seed=0):
    """Inputs whose features are strongly correlated, as activations are."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k**0.5 + 0.3 * torch.randn(1, k, generator=generator)
    scales = torch.exp(torch.randn(k, generator=generator))
    return (torch.randn(tokens, k, generator=generator) @ mixing) * scales


def state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def assert_untouched_by_a_cancel_at_any_point(model, quantize) -> int:
    """Run `quantize(cancelled)` once to count its cancel checks, then cancel at each one in turn."""
    before = state(model)
    calls = []
    quantize(lambda: bool(calls.append(1)))
    assert_same_state(model, before)
    for point in range(1, len(calls) + 1):
        seen = []
        with pytest.raises(JobCancelled):
            quantize(lambda point=point, seen=seen: seen.append(1) or len(seen) >= point)
        assert_same_state(model, before)
    return len(calls)


# -- the app -----------------------------------------------------------------------------------------


def wait_for_jobs(qtbot) -> None:
    """Until the background work ended, whatever the outcome (the page then shows it)."""
    from ui import jobs

    qtbot.waitUntil(lambda: not jobs.running(), timeout=JOB_TIMEOUT_MS)


def ask_on_compare(qtbot, page, prompt: str) -> list[str]:
    """Ask the Compare step `prompt` and wait for the answers; the model of each token as it arrived."""
    arrivals = []
    job = page.ask(prompt)
    job.signals.partial.connect(lambda values: arrivals.append(values[0]))
    wait_for_jobs(qtbot)
    assert not page.problem.isVisible(), page.problem.text()
    return arrivals


def open_run_on(qtbot, run_dir: Path, page_class):
    """A new window showing `run_dir` on the step of `page_class`, its start-up checks done."""
    from ui.main_window import STEP_PAGES, MainWindow

    window = MainWindow(run_dir.parent)
    qtbot.addWidget(window)
    window.show()
    window.open_run(run_dir)
    window.go(STEP_PAGES.index(page_class))
    wait_for_jobs(qtbot)
    return window, window.page(page_class)


def open_model(window, qtbot, spec):
    from ui.pages.model import ModelPage

    page = window.page(ModelPage)
    page.load(str(spec))
    wait_for_jobs(qtbot)
    return page


@pytest.fixture(scope="module")
def serve_run(tiny_llama, tmp_path_factory) -> Path:
    """An INT4 run with the default settings (int8 activations, accuracy level 4), as users bundle it."""
    from workbench.run.pipeline import quantize_run
    from workbench.settings import QuantSettings

    run = tmp_path_factory.mktemp("serve-run") / "run"
    quantize_run(str(tiny_llama), run, QuantSettings(method="rtn", block_size=16))
    return run


@pytest.fixture(scope="module")
def bundle(serve_run, tmp_path_factory) -> Path:
    """The runner bundle of `serve_run`, for the serving tests."""
    from exporters.bundle import build_bundle

    return build_bundle(serve_run, tmp_path_factory.mktemp("serve-bundle") / "tiny").path
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
