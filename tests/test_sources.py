"""Model sources and the clear messages bad inputs get."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM

from gguf_files import write_llama_gguf, write_unsupported_gguf
from workbench.errors import WorkbenchError
from workbench.sources import inspect_folder, resolve, weights_folder


def copy_model(source, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def test_folder_is_described_from_its_weight_shapes(tiny_llama):
    info = resolve(str(tiny_llama)).info
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.tied_embeddings and info.layers == 2 and info.hidden_size == 64
    roles = [w.role for w in info.weights]
    assert roles.count("embeddings") == 1 and roles.count("lm_head") == 1 and roles.count("layers") == 14
    assert info.fp32_bytes == 4 * info.parameters


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(WorkbenchError, match="no config.json"):
        resolve(str(tmp_path))


def test_encoder_only_model_is_refused(tmp_path):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(WorkbenchError, match="not a text generator.*BertForMaskedLM"):
        resolve(str(tmp_path))


def test_truncated_safetensors(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WorkbenchError, match="incomplete.*copy or download the model again"):
        resolve(str(folder))


def test_remote_code_is_refused_unless_trusted(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WorkbenchError, match="remote code.*--trust-remote-code"):
        resolve(str(folder))


def test_missing_tokenizer(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(WorkbenchError, match="no tokenizer"):
        inspect_folder(folder)


def test_gguf_is_opened_as_the_same_model(tiny_llama, tmp_path):
    """Its folder: config and tokenizer from the GGUF's metadata, weights read from the GGUF; the fp32
    conversion (for what needs transformers' own folder) is the same model too."""
    from safetensors.numpy import load_file

    from exporters.builder.tensors import open_weights

    gguf_path = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    resolved = resolve(str(gguf_path))
    assert resolved.info.kind == "gguf" and not list(resolved.path.glob("*.safetensors"))
    assert resolved.info.weights == inspect_folder(tiny_llama).weights
    original, read = load_file(tiny_llama / "model.safetensors"), open_weights(resolved.path)
    assert sorted(read.shapes) == sorted(original)
    for name, tensor in original.items():  # an fp32 GGUF: the very weights
        np.testing.assert_array_equal(read.read(name), tensor, err_msg=name)
    ids = torch.tensor([[3, 17, 42, 8, 99]])
    expected = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits.detach().numpy()
    converted = AutoModelForCausalLM.from_pretrained(weights_folder(resolved.path))(ids).logits.detach().numpy()
    np.testing.assert_array_equal(converted, expected)
    assert resolve(str(gguf_path)).path == resolved.path  # made once, then cached


@pytest.mark.parametrize("architecture", ["granitemoe", "rwkv6"])
def test_gguf_of_an_unsupported_architecture(architecture, tmp_path):
    """Granite's mixture of experts too: neither transformers 4.57 nor the workbench reads its config from a GGUF."""
    with pytest.raises(WorkbenchError, match=f"odd.gguf is a GGUF file of architecture '{architecture}'.* reads GGUF "
                                             "files of Llama .*, Mistral, .* Gemma 3. Open the model's Hugging Face "
                                             r"folder \(config.json, the tokenizer and the \*.safetensors"):
        resolve(str(write_unsupported_gguf(tmp_path / "odd.gguf", architecture)))


def test_hub_id_offline_says_so():
    with pytest.raises(WorkbenchError, match="offline"):
        resolve("HuggingFaceTB/SmolLM2-135M-Instruct-not-cached")


def test_unknown_spec(tmp_path):
    with pytest.raises(WorkbenchError, match="was not found"):
        resolve(str(tmp_path / "nothing-here"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(WorkbenchError, match="not a .gguf"):
        resolve(str(text))
