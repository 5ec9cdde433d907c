"""GGUF sources read tensor by tensor: the same graphs and INT4 tensors as from transformers' fp32 conversion."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from exporters.builder import build_decoder
from exporters.builder.tensors import open_weights
from gguf_files import converter_rope_freqs, write_llama_gguf
from models import LLAMA3_ROPE_SCALING, build_model
from workbench.errors import WorkbenchError
from workbench.gguf_rope import llama3_divisors, llama3_rope_scaling
from workbench.generation.engine import CausalLM, GenerationConfig, generate
from workbench.settings import QuantSettings
from workbench.sources import GGUF_SOURCE, cache_dir, inspect_folder, read_gguf_source, resolve, weights_folder

PROMPT = np.asarray([[5, 17, 42, 8, 99, 120, 33, 64, 7, 250, 31]], np.int64)
# Long enough for the low rotary frequencies Llama 3's scaling divides to turn noticeably.
LONG_PROMPT = np.random.default_rng(3).integers(3, 380, (1, 200))
LOGITS_ATOL = 1e-4  # an fp32 graph against PyTorch in fp32: as tests/test_builder.py
Q8_0, Q4_1 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1


@pytest.fixture(scope="module")
def tiny_llama_like(tmp_path_factory) -> dict[str, Path]:
    """Tiny Granite and SmolLM3 (HF folders), which llama.cpp writes as Llama."""
    return {name: build_model(tmp_path_factory.mktemp(f"tiny-{name}") / "model", name) for name in ("granite", "smollm3")}


@pytest.fixture(scope="module", params=[("llama", Q4_1), ("qwen2", Q8_0), ("granite", Q4_1), ("smollm3", Q8_0)],
                ids=["llama-q4_1", "qwen2-q8_0", "granite-q4_1", "smollm3-q8_0"])
def gguf_source(request, tiny_llama, tiny_qwen, tiny_llama_like, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny model's GGUF opened as a source (its folder), its fp32 conversion (transformers', or for granite and
    smollm3, which transformers' loader refuses, one filled the way it fills llama's), the file."""
    architecture, qtype = request.param
    hf_dir = ({"llama": tiny_llama, "qwen2": tiny_qwen} | tiny_llama_like)[architecture]
    path = write_llama_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / f"{architecture}.gguf", qtype)
    source = resolve(str(path)).path
    return source, weights_folder(source), path


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(folder / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _logits(folder: Path) -> np.ndarray:
    return CausalLM(str(folder / "model.onnx"), context_length=64).forward(PROMPT)[0]


def test_a_gguf_source_holds_no_weights_and_reads_those_of_the_conversion(gguf_source):
    source, converted, _ = gguf_source
    assert (source / GGUF_SOURCE).is_file() and not list(source.glob("*.safetensors"))
    assert (source / "tokenizer.json").is_file() and (source / "config.json").is_file()
    assert inspect_folder(source).weights == inspect_folder(converted).weights
    weights, expected = open_weights(source), load_file(converted / "model.safetensors")
    assert set(weights.shapes) == set(expected)
    for name, tensor in expected.items():
        np.testing.assert_array_equal(weights.read(name), tensor, err_msg=name)
    q = "model.layers.1.self_attn.q_proj.weight"  # llama: rows put back in HF order, block by block too
    np.testing.assert_array_equal(np.concatenate([weights.read(q, rows=slice(s, s + 24)) for s in range(0, 64, 24)]),
                                  expected[q])
    np.testing.assert_array_equal(np.concatenate(list(weights.transposed_chunks(q)), axis=0), expected[q].T)


@pytest.mark.parametrize("settings", [None, QuantSettings(), QuantSettings(symmetric=False, block_size=64)],
                         ids=["fp32", "rtn-symmetric", "rtn-asymmetric-b64"])
def test_graphs_from_the_gguf_equal_those_from_the_conversion(gguf_source, settings, tmp_path):
    source, converted, _ = gguf_source
    streamed = build_decoder(source, tmp_path / "streamed", inspect_folder(source), settings)
    expected = build_decoder(converted, tmp_path / "converted", inspect_folder(converted), settings)
    assert streamed.layer_bits == expected.layer_bits
    ours, theirs = _initializers(tmp_path / "streamed"), _initializers(tmp_path / "converted")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    np.testing.assert_array_equal(_logits(tmp_path / "streamed"), _logits(tmp_path / "converted"))
    assert not (tmp_path / "streamed" / GGUF_SOURCE).exists()  # the bundle's side files never point at the GGUF


def test_streamed_gptq_from_the_gguf_equals_gptq_from_the_conversion(gguf_source, tmp_path):
    from workbench.quantization.streamed import SpilledWeights, streamed_gptq
    from workbench.run.pipeline import _torch_plan

    source, converted, _ = gguf_source
    settings = QuantSettings(method="gptq", symmetric=False, act_order=True)
    plan = _torch_plan(inspect_folder(source), settings)
    samples = np.random.default_rng(0).integers(3, 380, (4, 32))
    options = {"block_size": settings.block_size, "symmetric": False, "act_order": True, "progress": lambda f, m: None,
               "cancelled": lambda: False}
    ours = streamed_gptq(source, samples, plan, SpilledWeights(tmp_path / "ours"), **options)
    theirs = streamed_gptq(converted, samples, plan, SpilledWeights(tmp_path / "theirs"), **options)
    assert sorted(ours) == sorted(theirs) == sorted(plan)
    for name in plan:
        for field in ("q", "scales", "zero_points"):
            np.testing.assert_array_equal(getattr(ours[name], field), getattr(theirs[name], field), err_msg=name)


def test_an_rtn_run_from_a_gguf_is_streamed_without_a_conversion(tiny_qwen, tmp_path):
    from workbench.run.pipeline import quantize_run

    path = write_llama_gguf(tiny_qwen, tmp_path / "qwen.gguf", Q8_0)
    record = quantize_run(str(path), tmp_path / "run", QuantSettings(method="rtn"))
    assert record.model.kind == "gguf" and "built" in record.graph and record.original.skipped is None
    assert not any(name.startswith("qwen-") for name in _names(cache_dir() / "gguf"))  # no fp32 copy made
    assert record.ops["MatMulNBits"] == 2 * 7 + 1 and record.ops["GroupQueryAttention"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "int4").glob("*.json")) == sorted(
        p.name for p in (tmp_path / "run" / "original").glob("*.json"))


def test_a_method_on_the_whole_model_converts_the_gguf_first(tiny_llama, tmp_path):
    """AWQ runs on the whole PyTorch model and the optimum export: those read transformers' fp32 conversion."""
    from workbench.run.pipeline import quantize_run

    path = write_llama_gguf(tiny_llama, tmp_path / "awq.gguf", Q8_0)
    settings = QuantSettings(method="awq", calibration_samples=2, calibration_tokens=16)
    record = quantize_run(str(path), tmp_path / "run", settings)
    assert "built" not in record.graph and record.ops["MatMulNBits"] >= 14
    assert [name for name in _names(cache_dir() / "gguf") if name.startswith("awq-")]


def _names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


def test_a_gguf_gone_since_it_was_opened_is_named(tiny_llama, tmp_path):
    path = write_llama_gguf(tiny_llama, tmp_path / "moved.gguf")
    source = resolve(str(path)).path
    path.rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(WorkbenchError, match="moved.gguf, which is gone since it was opened. Open the GGUF file again"):
        open_weights(source)


def test_an_older_workbenchs_source_folder_and_conversion_are_made_again(tiny_llama, tmp_path):
    """An older workbench's record (no version, no tensor table) of the very same file is not reused as it is,
    nor the fp32 conversion made with its config (which lacked the rope scaling of a rope_freqs tensor)."""
    import json

    path = write_llama_gguf(tiny_llama, tmp_path / "older.gguf")
    source = resolve(str(path)).path
    converted = weights_folder(source)
    record = json.loads((source / GGUF_SOURCE).read_text())
    older = {k: v for k, v in record.items() if k not in ("version", "architecture", "tensors")}
    (source / GGUF_SOURCE).write_text(json.dumps(older))
    again = resolve(str(path)).path
    assert again == source and json.loads((source / GGUF_SOURCE).read_text()) == record
    assert not converted.exists()
    assert open_weights(again).shape("model.layers.0.self_attn.q_proj.weight") == (64, 64)


# Llama 3.1 8B's and 3.2 1B's rotary (heads of 128 and 64, theta 500000), another shape of blend, the tiny
# model's heads of 16 (one blended frequency) and heads of 16 with a theta of 100000 (none).
ROTARIES = [(500000.0, 128, 8.0, 1.0, 4.0), (500000.0, 64, 32.0, 1.0, 4.0), (500000.0, 64, 16.0, 2.0, 6.0),
            (500000.0, 16, 8.0, 1.0, 4.0), (100000.0, 16, 8.0, 1.0, 4.0)]


@pytest.mark.parametrize("theta, head_dim, factor, low, high", ROTARIES)
def test_llama3_rope_scaling_is_read_back_from_the_converters_divisors(theta, head_dim, factor, low, high):
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": 8192}
    divisors = converter_rope_freqs({"rope_scaling": scaling, "rope_theta": theta, "head_dim": head_dim})
    np.testing.assert_array_equal(llama3_divisors(theta, head_dim, factor, low, high), divisors)
    # With fewer than two blended frequencies the divisors leave the low factor open: Llama 3's is taken.
    assert llama3_rope_scaling(divisors, theta, head_dim) == scaling
    assert llama3_rope_scaling(np.ones_like(divisors), theta, head_dim) is None
    with pytest.raises(ValueError, match="not those of Llama 3"):
        llama3_rope_scaling(divisors[::-1], theta, head_dim)


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama3") / "model", "llama3")


def test_a_llama3_gguf_keeps_its_rope_scaling_in_every_path(tiny_llama3, tmp_path):
    """llama.cpp writes Llama 3's rope scaling as the rope_freqs tensor: the builder's graph and transformers'
    fp32 conversion give the original model's logits, and the source folder's config (which streamed GPTQ's
    PyTorch layers read) has the scaling."""
    path = write_llama_gguf(tiny_llama3, tmp_path / "llama3.gguf")
    source = resolve(str(path)).path
    assert AutoConfig.from_pretrained(source).rope_scaling == LLAMA3_ROPE_SCALING
    ids = torch.as_tensor(LONG_PROMPT)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32).eval()(ids).logits.numpy()
        # The same model with plain rotary frequencies, as every path read the GGUF before.
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama3, dtype=torch.float32, rope_scaling=None).eval()
        plain = plain(ids).logits.numpy()
        converted = AutoModelForCausalLM.from_pretrained(weights_folder(source), dtype=torch.float32).eval()
        converted = converted(ids).logits.numpy()
    build_decoder(source, tmp_path / "built", inspect_folder(source), None)
    built = CausalLM(str(tmp_path / "built" / "model.onnx"), context_length=LONG_PROMPT.shape[1]).forward(LONG_PROMPT)[0]
    assert np.abs(plain - reference).max() > 100 * LOGITS_ATOL  # the scaling shows in these logits
    np.testing.assert_allclose(built, reference, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(converted, reference, atol=LOGITS_ATOL, rtol=0)


def test_a_rope_freqs_tensor_that_is_no_llama3_scaling_is_refused(tiny_llama3, tmp_path):
    head_dim = 64
    path = write_llama_gguf(tiny_llama3, tmp_path / "odd.gguf", rope_freqs=np.linspace(1.0, 3.0, head_dim // 2))
    with pytest.raises(WorkbenchError, match="odd.gguf holds a rope_freqs tensor .* not those of Llama 3"):
        resolve(str(path))


# What llama.cpp keeps of each family's config: Granite's multipliers (float32 in the file), SmolLM3's layers
# without rotary (every fourth, fixed in llama.cpp), and what every Llama has.
KEPT = {"granite": ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"),
        "smollm3": ("no_rope_layers",)}
LLAMA_KEPT = ("model_type", "rope_theta", "tie_word_embeddings", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_size", "intermediate_size", "rms_norm_eps", "vocab_size",
              "bos_token_id", "eos_token_id", "pad_token_id")
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["granite", "smollm3"])
def llama_like(request, tiny_llama_like, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Granite or SmolLM3 (HF folder) and its fp32 GGUF, as llama.cpp's converter writes them."""
    hf_dir = tiny_llama_like[request.param]
    return hf_dir, write_llama_gguf(hf_dir, tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf")


def test_a_granite_or_smollm3_gguf_reads_as_its_original(llama_like, tmp_path):
    """Config, tokenizer and tensors from the GGUF are the original's; the builder's graph gives transformers'
    logits on the original, and its greedy tokens."""
    hf_dir, path = llama_like
    source = resolve(str(path)).path
    config, original = AutoConfig.from_pretrained(source), AutoConfig.from_pretrained(hf_dir)
    for key in LLAMA_KEPT + KEPT[original.model_type]:
        assert getattr(config, key) == pytest.approx(getattr(original, key)), key
    text = "The quick brown fox jumps over 36 lazy dogs."
    tokenizer, original_tokenizer = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer(text).input_ids == original_tokenizer(text).input_ids
    assert [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == [
        original_tokenizer.bos_token, original_tokenizer.eos_token, original_tokenizer.pad_token]
    weights, expected = open_weights(source), load_file(hf_dir / "model.safetensors")
    assert set(weights.shapes) == set(expected)
    for name, tensor in expected.items():  # llama.cpp's interleaved q/k rows put back
        np.testing.assert_array_equal(weights.read(name), tensor, err_msg=name)

    build_decoder(source, tmp_path / "built", inspect_folder(source), None)
    model = CausalLM(str(tmp_path / "built" / "model.onnx"), context_length=64)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.as_tensor(PROMPT)
    with torch.no_grad():
        reference_logits = reference(ids).logits.numpy()
        reference_tokens = reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, PROMPT.shape[1]:]
    np.testing.assert_allclose(model.forward(PROMPT)[0], reference_logits, atol=LOGITS_ATOL, rtol=0)
    tokens = generate(model, PROMPT[0].tolist(), GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens
    assert tokens == reference_tokens.tolist()


def test_a_granite_gguf_whose_tokenizer_adds_bos_adds_it(tiny_llama_like, tmp_path):
    """llama.cpp writes tokenizer.ggml.add_bos_token when the model's tokenizer says; without it, no BOS (above)."""
    path = write_llama_gguf(tiny_llama_like["granite"], tmp_path / "bos.gguf", add_bos_token=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve(str(path)).path)
    assert tokenizer("The fox").input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("add_bos_token", [False, True])
def test_a_llama_ggufs_tokenizer_has_the_files_special_tokens(tiny_llama, tmp_path, add_bos_token):
    """transformers' llama converter names BOS the end token as well and always puts BOS before a text; the source
    folder's tokenizer ends and starts as the file (and the original) says."""
    path = write_llama_gguf(tiny_llama, tmp_path / "llama.gguf", add_bos_token=add_bos_token)
    tokenizer = AutoTokenizer.from_pretrained(resolve(str(path)).path)
    original = AutoTokenizer.from_pretrained(tiny_llama)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (original.bos_token, original.eos_token)
    assert tokenizer.eos_token_id != tokenizer.bos_token_id
    assert (tokenizer("The fox").input_ids[0] == tokenizer.bos_token_id) == add_bos_token


def test_an_rtn_run_from_a_granite_or_smollm3_gguf_is_streamed(llama_like, tmp_path):
    from workbench.run.pipeline import quantize_run

    hf_dir, path = llama_like
    record = quantize_run(str(path), tmp_path / "run", QuantSettings(method="rtn"))
    assert record.model.kind == "gguf" and "built" in record.graph and record.original.skipped is None
    assert not Path(read_gguf_source(Path(record.model.path))["fp32"]).exists()  # no fp32 copy made
    layers = AutoConfig.from_pretrained(hf_dir).num_hidden_layers
    assert record.ops["MatMulNBits"] >= 7 * layers and record.ops["GroupQueryAttention"] == layers


def test_the_fp32_conversion_of_a_granite_or_smollm3_gguf_is_its_original(llama_like, tmp_path):
    """What the methods on the whole PyTorch model read (transformers' loader refuses both architectures)."""
    import shutil

    hf_dir, path = llama_like
    copy = shutil.copy(path, tmp_path / "whole.gguf")  # its own source: the run test above makes no conversion
    ids = torch.as_tensor(PROMPT)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits.numpy()
        converted = AutoModelForCausalLM.from_pretrained(weights_folder(resolve(str(copy)).path),
                                                         dtype=torch.float32).eval()(ids).logits.numpy()
    np.testing.assert_array_equal(converted, reference)
