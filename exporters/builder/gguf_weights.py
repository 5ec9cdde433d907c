"""A GGUF file's tensors by Hugging Face name, dequantized as they are read, a block of rows at a time.

The tensor table is read once with gguf-py's reader, when the source's folder is made (workbench.
sources.check_gguf), and kept there. Each read takes only the bytes of the rows it asks for with a
plain file read (rows are contiguous in GGUF, and every quantized block lies within one row), so
neither a mapping of the whole file nor any other tensor counts as this process's memory. Names
and layouts are transformers': its GGUF loader's name map and tensor processors (llama's q/k rows,
which llama.cpp interleaves for its rotary kernel, put back, Granite's and SmolLM3's too; Gemma's
norms less one), so each tensor equals that of transformers' fp32 conversion of the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from exporters.builder.tensors import CHUNK_BYTES, TensorSource
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie in the file and how they decode."""

    gguf_name: str
    qtype: int  # gguf.GGMLQuantizationType
    offset: int
    row_bytes: int
    # HF row i is stored row row_map[i] (a processor that only reorders rows); None: the same order.
    row_map: np.ndarray | None
    whole: bool  # the processor changes values or shape: read and process the whole tensor


class GgufWeights(TensorSource):
    """The tensors of `path`, named as transformers names those of the model `folder`'s config.json describes."""

    def __init__(self, path: Path, folder: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        from workbench.gguf_llama_like import tensor_processor
        from workbench.sources import CONFIG_TENSORS, read_gguf_source

        self.path = Path(path)
        source = read_gguf_source(folder)  # the tensor table, read once when the folder was made
        architecture = source["architecture"]
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        # transformers' map over the whole model's names at once: it would also walk every submodule (for
        # checkpoints saved from a bare base model, Bloom's), building gguf-py's name table each time, which
        # takes seconds and adds nothing for the decoders here.
        whole = SimpleNamespace(state_dict=lambda: expected, named_children=lambda: [])
        try:
            # The file's own architecture names its tensors (llama.cpp writes Mistral as llama).
            names = get_gguf_hf_weights_map(whole, model_type=architecture, num_layers=config.num_hidden_layers)
        except NotImplementedError as error:
            raise WorkbenchError(f"{self.path.name}: the tensors of GGUF architecture {architecture!r} cannot be "
                                 f"named ({error}).") from error
        self.config = config.to_dict()
        self.processor = tensor_processor(architecture)(config=self.config)
        self.names = names
        self.shapes = {}
        self.stored: dict[str, Stored] = {}
        for gguf_name, (qtype, offset, size, dims) in source["tensors"].items():
            if gguf_name in CONFIG_TENSORS:  # the source's config.json has their rotary scaling
                continue
            name = names.get(gguf_name)
            if name is None:
                raise WorkbenchError(f"{self.path.name}: tensor {gguf_name} is no weight of a {architecture} model; "
                                     "the file does not match its own metadata.")
            shape = tuple(reversed(dims))
            if expected.get(name, shape) != shape:
                raise WorkbenchError(f"{self.path.name}: tensor {gguf_name} has shape {shape}, but the model's "
                                     f"{name} has {expected[name]}; the file does not match its own metadata.")
            rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
            row_map, whole_tensor = self._row_order(gguf_name, shape)
            self.shapes[name] = shape
            self.stored[name] = Stored(gguf_name, qtype, offset, size // rows, row_map, whole_tensor)

    def _row_order(self, gguf_name: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, bool]:
        """What the processor does to a 2-D tensor's rows, learnt by running it on the row numbers."""
        if len(shape) != 2:
            return None, True
        probe = np.arange(shape[0], dtype=np.float64).reshape(shape[0], 1)
        try:
            moved = self._process(probe, gguf_name)
        except (ValueError, IndexError):  # it needs the real shape: process whole tensors
            return None, True
        if moved.shape != probe.shape or not np.array_equal(np.sort(moved[:, 0]), probe[:, 0]):
            return None, True  # it changes values, not just their order
        order = moved[:, 0].astype(np.int64)
        return (None if np.array_equal(order, probe[:, 0]) else order), False

    def _process(self, weights: np.ndarray, gguf_name: str) -> np.ndarray:
        return self.processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self.names,
                                      parsed_parameters={"config": self.config}).weights

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored rows start..stop of a tensor (all of a 1-D one), dequantized to float32."""
        import gguf

        stored, shape = self.stored[name], self.shapes[name]
        raw = np.empty((stop - start) * stored.row_bytes, np.uint8)
        with open(self.path, "rb") as handle:
            handle.seek(stored.offset + start * stored.row_bytes)
            if handle.readinto(memoryview(raw)) != raw.size:
                raise WorkbenchError(f"{self.path.name} ends inside tensor {stored.gguf_name}; download or copy "
                                     "it again.")
        qtype = gguf.GGMLQuantizationType(stored.qtype)
        byte_shape = gguf.quant_shape_to_byte_shape((stop - start, shape[-1]) if len(shape) > 1 else shape, qtype)
        try:
            values = gguf.dequantize(raw.reshape(byte_shape), qtype)
        except NotImplementedError as error:
            raise WorkbenchError(f"{self.path.name}: tensor {stored.gguf_name} is stored as {qtype.name}, which "
                                 "cannot be read as floating point.") from error
        return values.reshape((stop - start, *shape[1:]) if len(shape) > 1 else shape)

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        shape = self.shape(name)
        stored = self.stored[name]
        if stored.whole:
            array = self._process(self._rows(name, 0, shape[0] if len(shape) > 1 else 1), stored.gguf_name)
            array = array[rows if rows is not None else slice(None)]
        else:
            wanted = np.arange(shape[0])[rows if rows is not None else slice(None)]
            source = wanted if stored.row_map is None else stored.row_map[wanted]
            low, high = int(source.min()), int(source.max()) + 1
            array = self._rows(name, low, high)
            if stored.row_map is not None:
                array = array[source - low]
        if cols is not None:
            array = array[:, cols]
        return np.ascontiguousarray(array, dtype=np.float32)

    def transposed_chunks(self, name: str) -> Iterator[np.ndarray]:
        """Columns cut across every quantized block: dequantize the tensor once, then hand out its transpose."""
        whole = self.read(name)
        rows, cols = whole.shape
        step = max(1, CHUNK_BYTES // (4 * rows))
        for start in range(0, cols, step):
            yield np.ascontiguousarray(whole[:, start:start + step].T)
