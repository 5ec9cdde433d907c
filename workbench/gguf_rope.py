"""Llama 3's rotary scaling, recovered from the `rope_freqs` tensor llama.cpp writes in its place.

llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors) does not put a Llama
3.x model's `rope_scaling` ("rope_type": "llama3") in the GGUF's metadata: it writes the divisor of
each rotary frequency that scaling gives, as the tensor `rope_freqs.weight`, and llama.cpp's rotary
kernel divides by them. transformers' GGUF loader reads neither, so the config it makes from such a
file has plain rotary frequencies. The divisors are 1 for the high frequencies, `factor` for the low
ones and a smooth blend between, so the parameters can be read back and checked to give the tensor.

Only the ratios original length / low_freq_factor and original length / high_freq_factor show in
the divisors; the original length is taken as the converter's (8192, Llama 3's, the converter's
default), which makes the factors those of the model's own config.
"""

from __future__ import annotations

import math

import numpy as np

ORIGINAL_CONTEXT = 8192  # the converter's `original_max_position_embeddings` (Llama 3's)
LLAMA3_FACTORS = (1.0, 4.0)  # Llama 3.1/3.2's low and high frequency factors: the guess where the divisors cannot tell
SIGNIFICANT = 6  # the factors of a config are short decimals; float32 divisors carry about 7 digits of them
# The converter's float32 arithmetic, evaluated in another order, differs from this module's in the last bit.
MATCH_RTOL = 1e-6


def llama3_divisors(rope_theta: float, head_dim: int, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original: int = ORIGINAL_CONTEXT) -> np.ndarray:
    """The `rope_freqs` llama.cpp's converter writes for this scaling, computed in float32 as it does."""
    import torch

    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelengths = 2 * math.pi / freqs
    smooth = (original / wavelengths - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelengths > original / low_freq_factor, torch.tensor(factor, dtype=torch.float32),
                           blended)
    return torch.where(wavelengths < original / high_freq_factor, torch.ones_like(divisors), divisors).numpy()


def llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int) -> dict | None:
    """The `rope_scaling` whose divisors are `divisors`; None when they are all 1 (no scaling), ValueError
    when no Llama 3 scaling gives them."""
    divisors = np.asarray(divisors, np.float64).reshape(-1)
    if divisors.size != head_dim // 2:
        raise ValueError(f"{divisors.size} rotary divisors for heads of {head_dim} (expected {head_dim // 2})")
    if np.all(divisors == 1.0):
        return None
    factor = _rounded(divisors.max())  # the lowest frequencies are divided by the whole factor
    wavelengths = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    blended = (divisors > 1.0) & (divisors < factor)
    # Where blended: original / wavelength = low + smooth * (high - low), smooth from the divisor.
    smooth = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
    reach = ORIGINAL_CONTEXT / wavelengths[blended]
    if smooth.size >= 2:
        (low, high), *_ = np.linalg.lstsq(np.stack([1 - smooth, smooth], axis=1), reach, rcond=None)
    elif smooth.size == 1:  # one equation for two factors: Llama 3's low factor, the high one from it
        low = LLAMA3_FACTORS[0]
        high = low + (reach[0] - low) / smooth[0]
    else:  # any factors between the last divisor of 1 and the first of `factor` give the same: Llama 3's
        low, high = LLAMA3_FACTORS
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": _rounded(low),
               "high_freq_factor": _rounded(high), "original_max_position_embeddings": ORIGINAL_CONTEXT}
    expected = llama3_divisors(rope_theta, head_dim, factor, scaling["low_freq_factor"], scaling["high_freq_factor"])
    if not np.allclose(expected, divisors, rtol=MATCH_RTOL, atol=0):
        raise ValueError("the divisors are not those of Llama 3's rotary scaling for any factors")
    return scaling


def _rounded(value: float) -> float:
    return float(f"{float(value):.{SIGNIFICANT}g}")
