"""Provider choice, the model folder wrapper (chat template, JSON schema) and one demo-model check."""

from __future__ import annotations

import json
import mmap
import platform
import shutil
import sys
import time

import numpy as np
import pytest
from transformers import AutoConfig

from workbench.errors import WorkbenchError
from workbench.generation.engine import GenerationConfig
from workbench.generation.runtime import (
    ChatModel,
    OnnxCausalLM,
    choose_provider,
    cuda_status,
    gpu_memory_bytes,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
no_cuda = pytest.mark.skipif(cuda_status()[0], reason="CUDA works on this machine")


@no_cuda
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(WorkbenchError, match="CUDA was asked for.*--provider cpu"):
        choose_provider("cuda")


@no_cuda
def test_auto_falls_back_to_cpu_and_says_why(tiny_llama_onnx):
    choice = choose_provider("auto")
    assert choice.name == "cpu" and choice.reason.startswith("CUDA cannot be used")
    assert OnnxCausalLM(tiny_llama_onnx, "auto").device == "cpu"
    assert gpu_memory_bytes() in (None, 0)


@pytest.mark.skipif(not cuda_status()[0], reason="no working CUDA provider here")
def test_cuda_session_keeps_the_cache_on_the_gpu(tiny_llama_onnx):
    model = OnnxCausalLM(tiny_llama_onnx, "cuda")
    cache = model.new_cache(1)
    model.step(cache, np.array([[5, 6, 7]], np.int64))
    assert model.device == "cuda" and all(v.device_name().lower() == "cuda" for v in cache.values)
    assert gpu_memory_bytes() is None or gpu_memory_bytes() > 0


def test_unknown_provider_is_refused():
    with pytest.raises(WorkbenchError, match="auto, cpu or cuda"):
        choose_provider("tpu")


def test_missing_model_file_says_what_to_do(tmp_path):
    with pytest.raises(WorkbenchError, match="Quantize the model again"):
        OnnxCausalLM(tmp_path, "cpu")


def test_chat_template_and_system_prompt(tiny_llama_onnx):
    model = ChatModel(tiny_llama_onnx, "cpu")
    text = model.tokenizer.decode(model.encode("Hello there", system="Be brief."))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert model.eos_token_ids[0] == model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.lm.context_length == 256


def test_json_schema_answer_parses_and_matches(tiny_pair):
    model = ChatModel(tiny_pair[1], "cpu")
    ids = model.encode("Describe a person as JSON.")
    for seed in (0, 1):
        config = GenerationConfig(max_new_tokens=60, temperature=1.0, seed=seed)
        result = model.generate(ids, config, json_schema=PERSON)
        data = json.loads(result.text)
        assert set(data) == {"name", "age", "tags"}
        assert isinstance(data["name"], str) and len(data["name"]) <= 12
        assert isinstance(data["age"], int) and isinstance(data["tags"], list)
        assert all(isinstance(tag, str) for tag in data["tags"])


def test_unusable_json_schema_is_refused(tiny_llama_onnx):
    model = ChatModel(tiny_llama_onnx, "cpu")
    with pytest.raises(WorkbenchError, match="JSON schema"):
        model.generate(model.encode("x"), GenerationConfig(max_new_tokens=4), json_schema={"type": "no-such-type"})


def test_engine_errors_become_workbench_errors(tiny_llama_onnx):
    model = ChatModel(tiny_llama_onnx, "cpu")
    with pytest.raises(WorkbenchError, match="reads at most 256"):
        model.generate(list(range(5, 305)), GenerationConfig(max_new_tokens=4))


@pytest.fixture
def demo_cache(monkeypatch):
    """The demo's fp32 conversion (which the optimum export reads) is slow to redo: use the user's cache like
    `make run` does."""
    monkeypatch.delenv("INT4_WORKBENCH_CACHE", raising=False)


@pytest.mark.slow
def test_demo_model_fused_graph_answers_like_the_plain_one(demo_cache, tmp_path):
    """The real model: fusing attention keeps the greedy answer; the engine streams it in order."""
    from exporters.onnx_export import export_onnx
    from exporters.optimize import fuse_attention
    from workbench.sources import resolve, weights_folder

    model = resolve("demo")
    export_onnx(weights_folder(model.path), tmp_path / "plain", parameters=model.info.parameters)
    shutil.copytree(tmp_path / "plain", tmp_path / "fused")
    assert fuse_attention(tmp_path / "fused", AutoConfig.from_pretrained(model.path)).fused
    plain, fused = ChatModel(tmp_path / "plain", "cpu"), ChatModel(tmp_path / "fused", "cpu")
    ids = plain.encode("What is the capital of France?")
    config = GenerationConfig(max_new_tokens=24)
    pieces = []
    answer = fused.generate(ids, config, on_token=lambda token, piece: pieces.append(piece))
    assert answer.tokens == plain.generate(ids, config).tokens
    assert "Paris" in answer.text and "".join(pieces) == answer.text
    assert fused.generate_speculative(plain, ids, config).tokens == answer.tokens


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux") or tuple(map(int, platform.release().split(".")[:2])) < (5, 4),
                    reason="MADV_PAGEOUT is Linux 5.4+")
def test_while_a_session_loads_its_mapped_weights_leave_memory(tmp_path):
    """What loading an 8B model needs to stay under 6 GiB: the weights file ONNX Runtime reads through to
    prepack is paged out as it goes, so its pages and the prepacked copy do not add up."""
    from workbench.generation.engine import PAGE_OUT_INTERVAL_S, paging_out

    data = tmp_path / "model.onnx.data"
    data.write_bytes(np.random.default_rng(0).bytes(32 * 2**20))
    with open(data, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))  # read through, as prepacking does
        before = _mapped_rss(data)
        with paging_out(str(tmp_path)):
            time.sleep(5 * PAGE_OUT_INTERVAL_S)
            during = _mapped_rss(data)
        assert before > 30 * 2**20 and during < before / 4
