"""Pure numeric helpers for block-wise weight quantization in MatMulNBits' layout.

A weight is the PyTorch layout (N outputs, K inputs); blocks of `block_size` run along K.
Values are unsigned, `q` in [0, 2**bits - 1], and dequantize to `(q - zero_point) * scale`;
without stored zero points MatMulNBits uses 2**(bits - 1) (symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantizedWeight:
    q: np.ndarray  # uint8 (N, K padded to whole blocks)
    scales: np.ndarray  # float32 (N, blocks)
    zero_points: np.ndarray | None  # uint8 or float32 (N, blocks); None: symmetric
    bits: int
    block_size: int
    k: int  # K before padding

    @property
    def n(self) -> int:
        return self.q.shape[0]

    @property
    def blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        zero = self.zero_points if self.zero_points is not None else np.float32(2 ** (self.bits - 1))
        zero = np.repeat(np.asarray(zero, np.float32), self.block_size, axis=1) if np.ndim(zero) else zero
        scales = np.repeat(self.scales, self.block_size, axis=1)
        return ((self.q.astype(np.float32) - zero) * scales)[:, : self.k]

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: (N, blocks, block_size * bits / 8) uint8, low nibble first."""
        return pack_values(self.q, self.bits).reshape(self.n, self.blocks, -1)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' zero_points: packed like B for integers, as is for float zero points."""
        if self.zero_points is None:
            return None
        if self.zero_points.dtype != np.uint8:
            return self.zero_points.astype(np.float32).reshape(-1)
        return pack_values(self.zero_points, self.bits, pad_to_byte=True)

    @property
    def nbytes(self) -> int:
        zp = self.packed_zero_points()
        return self.packed().nbytes + self.scales.nbytes + (zp.nbytes if zp is not None else 0)


def pack_values(values: np.ndarray, bits: int, pad_to_byte: bool = False) -> np.ndarray:
    """Pack unsigned `bits`-bit values along the last axis, first value in the low bits.

    An odd count (zero points) is padded with the default zero point 8, as ONNX Runtime does.
    """
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    if bits != 4:
        raise ValueError(f"only 4 and 8 bits are packed, not {bits}")
    if values.shape[-1] % 2:
        if not pad_to_byte:
            raise ValueError("an odd number of 4-bit values needs pad_to_byte")
        values = np.concatenate([values, np.full(values.shape[:-1] + (1,), 8, np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def unpack_values(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :count]
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(packed.shape[:-1] + (-1,))[..., :count]


def pad_to_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    pad = (-weight.shape[1]) % block_size
    return np.pad(weight, ((0, 0), (0, pad))) if pad else weight


def grid_params(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for each row of `blocks` (..., block_size), as ONNX Runtime picks them.

    Symmetric: the value of largest magnitude maps to -2**(bits-1) exactly (the grid is one step
    longer on the negative side). Asymmetric: min and max (widened to include 0) map to 0 and
    2**bits - 1. Zero points come back as float32 holding integers.
    """
    qmax = 2**bits - 1
    if symmetric:
        index = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, index, axis=-1)[..., 0]
        scale = extreme / -(2 ** (bits - 1))
        zero = np.full_like(scale, 2 ** (bits - 1))
    else:
        low = np.minimum(blocks.min(axis=-1), 0.0)
        high = np.maximum(blocks.max(axis=-1), 0.0)
        scale = (high - low) / qmax
        safe = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.round(-low / safe), 0, qmax)
    return scale.astype(np.float32), zero.astype(np.float32)


def quantize_to_grid(values: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Round values (..., block) onto the grid given per row by scale and zero (...,)."""
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    return np.clip(np.round(values / safe + zero[..., None]), 0, 2**bits - 1)


def rtn_quantize(weight: np.ndarray, bits: int, block_size: int, symmetric: bool) -> QuantizedWeight:
    """Round-to-nearest block quantization of a (N, K) weight."""
    n, k = weight.shape
    padded = pad_to_blocks(np.asarray(weight, np.float32), block_size)
    blocks = padded.reshape(n, -1, block_size)
    scale, zero = grid_params(blocks, bits, symmetric)
    q = quantize_to_grid(blocks, scale, zero, bits).astype(np.uint8).reshape(n, -1)
    return QuantizedWeight(
        q=q,
        scales=scale,
        zero_points=None if symmetric else zero.astype(np.uint8),
        bits=bits,
        block_size=block_size,
        k=k,
    )
