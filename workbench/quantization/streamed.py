"""Calibrated quantization on a model that is never whole in memory.

GPTQ runs the decoder layers one after another on the calibration activations
(workbench.quantization.layerwise); nothing needs the other layers' weights meanwhile. So the
PyTorch model is built on the meta device and each decoder layer is loaded from the safetensors
(or the GGUF) when it first runs, and dropped when the next one does; the embeddings live only while the
first layer's inputs are captured, the lm_head only while it is quantized. GPTQ's results go to
files as they are made, for the graph builder to write. Peak memory: one decoder layer in float,
its Hessians and the calibration activations, whatever the model's size.

Data-free calibration text is written by a round-to-nearest copy on ONNX Runtime (8-bit or INT4,
workbench.run.memory.calibration_writer) instead of the float model in PyTorch: the same sampling
(workbench.quantization.calibration.self_written_samples), a model a quarter of the size or less, and a
faster decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from exporters.builder.tensors import open_weights
from workbench.generation.engine import map_large_blocks, trim_heap
from workbench.quantization.blockquant import QuantizedWeight

log = logging.getLogger(__name__)


class SpilledWeights(MutableMapping):
    """Quantized weights by module name, each kept in its own file in `folder` rather than in memory."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names: set[str] = set()

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.npz"

    def __setitem__(self, name: str, weight: QuantizedWeight) -> None:
        arrays = {"q": weight.q, "scales": weight.scales, "meta": np.array([weight.bits, weight.block_size, weight.k])}
        if weight.zero_points is not None:
            arrays["zero_points"] = weight.zero_points
        np.savez(self._path(name), **arrays)
        self.names.add(name)

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self.names:
            raise KeyError(name)
        with np.load(self._path(name)) as data:
            bits, block_size, k = (int(v) for v in data["meta"])
            zero_points = data.get("zero_points")
            return QuantizedWeight(q=data["q"], scales=data["scales"], zero_points=zero_points, bits=bits,
                                   block_size=block_size, k=k)

    def __delitem__(self, name: str) -> None:
        self.names.remove(name)
        self._path(name).unlink()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


class LazyModel:
    """A transformers causal LM on the meta device whose weights are loaded as they are used."""

    def __init__(self, model_dir: Path):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(model_dir)
        # Parameters on the meta device; buffers (rotary frequencies, Gemma 3's embedding scale) are computed,
        # not stored, so they are made on the CPU as the model builds them.
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model.eval()
        self.weights = open_weights(model_dir)
        inner = self.model.model
        self.tied = "lm_head.weight" not in self.weights  # the head reads the embeddings
        self.load(inner.embed_tokens, "model.embed_tokens.")
        self.load(inner.norm, "model.norm.")
        self.current: nn.Module | None = None
        for index, layer in enumerate(inner.layers):
            layer.register_forward_pre_hook(self._layer_hook(index))
        # GPTQ reads the final norm's outputs just before it quantizes the lm_head.
        inner.norm.register_forward_pre_hook(lambda module, args: self._load_head())

    def load(self, module: nn.Module, prefix: str) -> None:
        buffers = {name: buffer.clone() for name, buffer in module.named_buffers() if not buffer.is_meta}
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if parameter.dim() != 2:
                    parameter.copy_(torch.from_numpy(self.weights.read(prefix + name)))
                    continue
                # Row chunks: a float32 copy of a whole tensor beside the parameter would double a large
                # embedding (1 GiB for a 128k vocabulary of width 2048) while it loads.
                row = 0
                for chunk in self.weights.row_chunks(prefix + name):
                    parameter[row:row + len(chunk)].copy_(torch.from_numpy(chunk))
                    row += len(chunk)
            for name, buffer in buffers.items():  # to_empty left them uninitialised
                module.get_buffer(name).copy_(buffer)

    def _layer_hook(self, index: int):
        def hook(module, args):
            if "forward" in module.__dict__:  # `capture` swapped in the identity: no weights needed
                return
            if self.current is not module:
                self._release()
                self.load(module, f"model.layers.{index}.")
                self.current = module
                self.model.model.embed_tokens.to("meta")  # the first layer's inputs are captured by now

        return hook

    def _release(self) -> None:
        if self.current is not None:
            self.current.to("meta")
            self.current = None
        # The layer's weights, and the Hessians and activations of its GPTQ step, are freed by now; glibc would
        # keep much of that heap resident, and what it kept grew by about a layer's activations per layer
        # (1B shape: 2.10 -> 2.85 GiB over 16 layers, docs/scale.md).
        trim_heap()

    def _load_head(self) -> None:
        head = self.model.get_output_embeddings()
        if head.weight.is_meta:
            self._release()
            self.load(head, "model.embed_tokens." if self.tied else "lm_head.")


def streamed_gptq(model_dir: Path, samples: np.ndarray, plan: dict[str, int], results: MutableMapping, *,
                  block_size: int, symmetric: bool, act_order: bool, progress, cancelled) -> MutableMapping:
    """GPTQ of the linears in `plan` (module name -> bits) into `results`, one decoder layer in memory at a time."""
    from workbench.quantization.gptq import gptq_quantize

    map_large_blocks()  # each layer frees its weights, Hessians and activations: give the pages back
    lazy = LazyModel(model_dir)
    gptq_quantize(lazy.model, torch.as_tensor(samples), plan, block_size=block_size, symmetric=symmetric,
                  act_order=act_order, progress=progress, cancelled=cancelled, results=results)
    return results


class OnnxWriter(nn.Module):
    """Just enough of a transformers causal LM for `self_written_samples`, decoding with an ONNX graph."""

    def __init__(self, folder: Path, config, capacity: int):
        from workbench.generation.engine import CausalLM

        super().__init__()
        self.lm = CausalLM(str(Path(folder) / "model.onnx"))
        self.config = config
        self.capacity = capacity
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)  # says where tensors live: the CPU

    def get_input_embeddings(self):
        return SimpleNamespace(num_embeddings=self.config.vocab_size)

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True):
        cache = past_key_values or self.lm.new_cache(input_ids.shape[0], self.capacity)
        logits = self.lm.step(cache, input_ids.numpy(), last_only=True)
        return SimpleNamespace(logits=torch.from_numpy(logits), past_key_values=cache)


def onnx_written_samples(model_dir: Path, rtn_dir: Path, tokenizer, n_samples: int, seq_len: int, *,
                         progress, cancelled) -> np.ndarray:
    """Data-free calibration tokens written by the round-to-nearest graph in `rtn_dir`."""
    from transformers import AutoConfig

    from workbench.quantization.calibration import self_written_samples

    writer = OnnxWriter(rtn_dir, AutoConfig.from_pretrained(model_dir), seq_len)
    return self_written_samples(writer, tokenizer, n_samples, seq_len, progress=progress, cancelled=cancelled)
