"""Weights in, weights out, one tensor at a time: safetensors shards (or a GGUF file, exporters.builder.
gguf_weights) read lazily, an external data file appended to as the graph is built.

A tensor is read in its stored dtype (bf16, fp16, fp32) and handed on in row chunks of float32, so
the largest buffer is one stored tensor plus one chunk, never the model. Each read opens the shard
anew: safetensors maps the whole file, and the mapped pages a read touched count as this process's
memory until the mapping is closed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from workbench.errors import WorkbenchError

CHUNK_BYTES = 64 * 2**20  # float32 bytes per chunk of rows
ALIGN = 64 * 1024  # large tensors start on an allocation-granularity boundary, as onnx.save aligns them
ALIGN_THRESHOLD = 2**20
INLINE_BYTES = 1024  # smaller tensors stay in model.onnx, as save_model keeps them


class TensorSource:
    """Tensors by Hugging Face name, read on demand as float32: what the builder and streamed GPTQ read."""

    shapes: dict[str, tuple[int, ...]]

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.shapes:
            raise WorkbenchError(f"The weights have no tensor {name!r}; the model folder is incomplete or not the "
                                 "architecture its config.json names.")
        return self.shapes[name]

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """float32 copy of a tensor, or of a block of its rows / columns, from its stored dtype."""
        raise NotImplementedError

    def row_chunks(self, name: str) -> Iterator[np.ndarray]:
        """A 2-D tensor as float32 blocks of whole rows, about CHUNK_BYTES each."""
        rows, cols = self.shape(name)
        step = max(1, CHUNK_BYTES // (4 * cols))
        for start in range(0, rows, step):
            yield self.read(name, rows=slice(start, min(start + step, rows)))

    def transposed_chunks(self, name: str) -> Iterator[np.ndarray]:
        """A (N, K) tensor as float32 blocks of rows of its transpose (K, N): MatMul's B layout."""
        rows, cols = self.shape(name)
        step = max(1, CHUNK_BYTES // (4 * rows))
        for start in range(0, cols, step):
            yield np.ascontiguousarray(self.read(name, cols=slice(start, min(start + step, cols))).T)


def has_weights(folder: Path) -> str | None:
    """None when `open_weights` can read this folder's weights tensor by tensor, else why not."""
    from workbench.sources import gguf_of

    if gguf_of(Path(folder)) or any(Path(folder).glob("*.safetensors")):
        return None
    return "the weights are neither in safetensors files nor in a GGUF file"


def open_weights(folder: Path) -> TensorSource:
    """The weights of a Hugging Face folder: its safetensors, or the GGUF file a GGUF source's folder names."""
    from workbench.sources import gguf_of

    gguf = gguf_of(Path(folder))
    if gguf:
        stat = gguf.stat()
        return _gguf_weights(gguf, Path(folder), stat.st_size, stat.st_mtime_ns)
    return SafetensorsWeights(folder)


@functools.lru_cache(maxsize=2)
def _gguf_weights(gguf: Path, folder: Path, size: int, mtime_ns: int) -> TensorSource:
    """One reading of a GGUF's header per process (the original, the INT4 graph and GPTQ all read the
    model): gguf-py takes seconds over a large vocabulary. The file's size and mtime are in the key."""
    from exporters.builder.gguf_weights import GgufWeights

    return GgufWeights(gguf, folder)


class SafetensorsWeights(TensorSource):
    """The tensors of a Hugging Face folder's *.safetensors files, by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        shards = sorted(Path(folder).glob("*.safetensors"))
        if not shards:
            raise WorkbenchError(f"{folder} has no *.safetensors weights; the graph builder reads only those.")
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                for name in handle.keys():
                    self.files[name] = shard
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        import torch
        from safetensors import safe_open

        self.shape(name)
        with safe_open(str(self.files[name]), framework="pt") as handle:
            part = handle.get_slice(name)
            index = [slice(None)] * len(self.shapes[name])
            if rows is not None:
                index[0] = rows
            if cols is not None:
                index[1] = cols
            tensor = part[tuple(index)]
        return tensor.to(torch.float32).numpy()


class ExternalData:
    """model.onnx.data, written front to back; each tensor is appended and only its reference kept."""

    def __init__(self, folder: Path, location: str):
        self.location = location
        self.handle = open(Path(folder) / location, "wb")
        self.offset = 0

    def close(self) -> None:
        self.handle.close()

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """An initializer for `array`: inline when tiny, otherwise appended to the data file."""
        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_BYTES:
            return onnx.numpy_helper.from_array(array, name)
        return self.chunked(name, array.dtype, array.shape, [array])

    def chunked(self, name: str, dtype, shape: tuple[int, ...], chunks) -> TensorProto:
        """An initializer whose bytes arrive in consecutive chunks (rows of a row-major tensor)."""
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if expected >= ALIGN_THRESHOLD and self.offset % ALIGN:
            padding = ALIGN - self.offset % ALIGN
            self.handle.write(b"\0" * padding)
            self.offset += padding
        start = self.offset
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            self.handle.write(memoryview(chunk).cast("B"))
            self.offset += chunk.nbytes
        if self.offset - start != expected:
            raise WorkbenchError(f"Internal: {name} wrote {self.offset - start} bytes, not {expected}.")
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(expected))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def externalize(self, tensor: TensorProto) -> TensorProto:
        """Move a large in-memory initializer's bytes into the data file."""
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) <= INLINE_BYTES:
            return tensor
        return self.tensor(tensor.name, onnx.numpy_helper.to_array(tensor))
