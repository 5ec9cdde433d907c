"""The headless journey through the CLI and `quantize_run`: real exports, real sessions."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli, leftovers
from workbench.errors import JobCancelled
from workbench.run.pipeline import quantize_run
from workbench.run.folders import RUN_SCHEMA_VERSION, load_run
from workbench.settings import QuantSettings



def test_cli_quantize_evaluate_report(tiny_model, tmp_path, prose):
    run_dir = tmp_path / "runs" / "tiny"
    result = cli("quantize", str(tiny_model), "-o", str(run_dir), "--method", "rtn", "--json", "-q")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("run_dir", "size_ratio", "bits_per_weight", "ops", "timings_s"):
        assert key in data
    assert data["original"]["bytes"] > data["int4"]["bytes"] > 0
    assert data["size_ratio"] == pytest.approx(data["original"]["bytes"] / data["int4"]["bytes"], rel=1e-3)
    assert data["ops"]["MatMulNBits"] >= 14 and data["ops"]["GatherBlockQuantized"] == 1
    assert {"export", "int4", "measure"} <= set(data["timings_s"])
    for name in ("original/model.onnx", "int4/model.onnx", "int4/tokenizer.json", "run.json", "report.md", "memory.png"):
        assert (run_dir / name).is_file(), name
    for model in ("original", "int4"):  # weights apart, for ONNX Runtime to map; one data file after every rewrite
        assert sorted(p.name for p in (run_dir / model).glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
        assert (run_dir / model / "model.onnx").stat().st_size < 1_000_000
    assert load_run(run_dir).schema_version == RUN_SCHEMA_VERSION

    result = cli("evaluate", str(run_dir), "--text", str(prose), "--json", "-q")
    assert result.returncode == 0, result.stderr
    quality = json.loads(result.stdout)
    assert quality["original"]["perplexity"] > 1 and quality["int4"]["perplexity"] > 1
    assert quality["tokens"] > 500
    assert 0 <= quality["top1_agreement"] <= 1 and quality["mean_kl"] >= 0
    assert quality["perplexity_increase_pct"] == pytest.approx(
        100 * (quality["int4"]["perplexity"] / quality["original"]["perplexity"] - 1), abs=0.05
    )
    assert "prose.txt" in (run_dir / "report.md").read_text()

    (run_dir / "report.md").unlink()
    assert cli("report", str(run_dir), "-q").returncode == 0
    assert "prose.txt" in (run_dir / "report.md").read_text()


def test_gptq_with_a_calibration_file_beats_rtn(tiny_llama, tmp_path, prose):
    runs = {}
    for method in ("rtn", "gptq"):
        settings = QuantSettings(method=method, block_size=32, symmetric=False, calibration_samples=8,
                                 calibration_tokens=64)
        record = quantize_run(str(tiny_llama), tmp_path / method, settings, calibration=prose)
        assert record.calibration == (str(prose) if method == "gptq" else None)
        runs[method] = tmp_path / method
    from workbench.quality.evaluate import evaluate

    kl = {m: evaluate(d / "original", d / "int4", prose).mean_kl for m, d in runs.items()}
    assert kl["gptq"] < kl["rtn"], kl


def test_a_data_free_run_records_the_samples_its_model_wrote(tiny_llama, tmp_path):
    settings = QuantSettings(method="gptq", symmetric=False, calibration_tokens=16)
    record = quantize_run(str(tiny_llama), tmp_path / "run", settings)
    assert record.settings.calibration_samples == 128 and record.kept(settings)  # still the settings asked for
    assert load_run(tmp_path / "run").settings == record.settings
    assert not record.kept(settings.replace(calibration_samples=32)) and not record.kept(settings.replace(block_size=64))


def test_existing_output_is_refused_and_kept(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    result = cli("quantize", str(tiny_llama), "-o", str(run_dir), "-q")
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert (run_dir / "keep.txt").read_text() == "mine"


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write in: chmod for ordinary users, the immutable flag for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a filesystem without chattr +i: no folder is read-only to root")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_read_only_output_folder(tiny_llama, read_only_dir):
    result = cli("quantize", str(tiny_llama), "-o", str(read_only_dir / "run"), "-q")
    assert result.returncode == 2, result.stderr
    assert "Cannot write in" in result.stderr and "another output folder" in result.stderr
    assert list(read_only_dir.iterdir()) == []


def _small_file_limit():
    # Files may not grow past 64 KB: writes fail with EFBIG, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_running_out_of_space_leaves_nothing(tiny_llama, tmp_path):
    result = cli("quantize", str(tiny_llama), "-o", str(tmp_path / "run"), "-q", preexec_fn=_small_file_limit)
    assert result.returncode == 2, result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("stage", ["export", "int4", "measure"])
def test_cancel_leaves_nothing(tiny_llama, tmp_path, stage):
    seen = []

    def progress(fraction, message):
        seen.append(message)

    def cancelled():
        return any(m.startswith(f"{stage}:") for m in seen)

    with pytest.raises(JobCancelled):
        quantize_run(str(tiny_llama), tmp_path / "run", QuantSettings(method="rtn"), progress=progress,
                     cancelled=cancelled)
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def test_ctrl_c_during_export_leaves_nothing(tiny_llama, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "quantize", str(tiny_llama), "-o", str(tmp_path / "run")],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and time.monotonic() < deadline:  # the export has begun
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "nothing was written" in stderr
    assert not (tmp_path / "run").exists() and leftovers(tmp_path) == []


def test_bad_calibration_file_is_refused_before_export(tiny_llama, tmp_path):
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    started = time.monotonic()
    result = cli("quantize", str(tiny_llama), "-o", str(tmp_path / "run"), "--calibration", str(binary), "-q")
    assert result.returncode == 2 and "binary" in result.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()
