"""GPTQ (Frantar et al. 2022) on a PyTorch causal LM, producing MatMulNBits' block layout.

The decoder layers are quantized one after another: the inputs of each layer are the outputs
of the layers before it with their weights already quantized, so later layers see (and
compensate) the error of earlier ones. For each layer, one forward pass over the calibration
batch gathers H = 2 X^T X for the inputs of every planned linear; linears fed by the same tensor
(q/k/v, gate/up) share one Hessian and are solved together, their rows stacked (the capture and
the layer-by-layer walk are `workbench.quantization.layerwise`, shared with AWQ). Groups are the
`block_size` blocks along K; their scale and zero point follow ONNX Runtime's rules
(`blockquant.grid_params`), so the result is a plain `QuantizedWeight` per linear.

The model is changed only briefly: a layer's quantized weights are written in for the pass
that computes the next layer's inputs and put back right after it (and in any case before this
returns, also when the job is cancelled or fails), so at most one layer's weights are copied.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import MutableMapping

import numpy as np
import torch
from torch import nn

from workbench.quantization.blockquant import QuantizedWeight, grid_params
from workbench.quantization.eval_mode import evaluating
from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.quantization.layerwise import (
    InputGroup,
    LayerStep,
    Plan,
    collect_inputs,
    final_norm,
    resolve_plan,
    run_layer,
    run_layers,
    validate_block_size,
    validate_calibration,
)

log = logging.getLogger(__name__)

METHOD = "GPTQ"
LAZY_COLUMNS = 128  # columns per lazy batch update (the paper's B)
HESSIAN_SPLIT = 512  # X^T X of wider inputs is accumulated as upper blocks of about this size
SUB_COLUMNS = 16  # columns per sub-block inside a lazy batch (divides every block size)
# Rows solved at a time. A sub-block's rank-1 update then stays under torch's parallel grain
# (32768 elements) and runs on one thread: cheap even when other processes hold the cores.
ROW_CHUNK = 2048
_ROUNDING = 1.5 * 2.0**23  # adding and subtracting it rounds a small float32 to an integer


class _Hessian:
    """X^T X of one input tensor; only the upper block triangle for wide inputs."""

    def __init__(self) -> None:
        self.matrix: torch.Tensor | None = None
        self.tokens = 0
        self.upper_only = False

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        k = x.shape[1]
        if self.matrix is None:
            self.matrix = torch.zeros(k, k, dtype=torch.float32, device=x.device)
        parts = max(1, k // HESSIAN_SPLIT)
        bounds = [k * p // parts for p in range(parts + 1)]
        for a, b in itertools.pairwise(bounds):
            self.matrix[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
        self.tokens += x.shape[0]
        self.upper_only = parts > 1

    def finished(self) -> torch.Tensor:
        """2 X^T X / tokens, mirrored when only the upper block triangle was accumulated; computed in place
        (the statistics are spent), so a wide input's K x K matrix is not copied."""
        h, self.matrix = self.matrix, None
        if self.upper_only:
            h.triu_()
            h.add_(torch.triu(h, 1).T)
        return h.mul_(2.0 / max(self.tokens, 1))


def gptq_quantize(
    model: nn.Module,
    calibration: torch.Tensor,
    plan: dict[str, int],
    *,
    block_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
    results: MutableMapping[str, QuantizedWeight] | None = None,
) -> MutableMapping[str, QuantizedWeight]:
    """Quantize the linears named in `plan` (module name -> 4 or 8 bits) with GPTQ.

    `calibration` holds token ids, int64 (samples, tokens). Returns a `QuantizedWeight` per
    planned module, in PyTorch's (out, in) layout, which is MatMulNBits' (N, K). The model's
    weights are the same afterwards as before. `results` may be a mapping that keeps them elsewhere
    (workbench.quantization.streamed.SpilledWeights).
    """
    validate_calibration(calibration, METHOD)
    validate_block_size(block_size)
    if not 0 < damp < 1:
        raise ValueError(f"GPTQ dampening must be between 0 and 1 (usually 0.01), not {damp}.")
    resolved = resolve_plan(model, plan, METHOD)
    results = {} if results is None else results
    with evaluating(model):
        _run(model, calibration, resolved, results, block_size, symmetric, act_order, damp, progress, cancelled)
    progress(1.0, "done")
    return results


def _run(model, calibration, plan: Plan, results, block_size, symmetric, act_order, damp,
         progress: Progress, cancelled: Cancelled) -> None:
    """Sequential GPTQ: each layer's outputs come from its quantized weights, written in only
    for that pass."""
    solve = {"block_size": block_size, "symmetric": symmetric, "act_order": act_order, "damp": damp}

    def process_layer(step: LayerStep) -> list[torch.Tensor] | None:
        writes: list[tuple[nn.Linear, torch.Tensor]] = []
        if step.targets:
            groups, _ = collect_inputs(step, _Hessian, cancelled, keep_outputs=False, method=METHOD)
            errors = []
            for group in groups:
                check(cancelled)
                errors.append(_quantize_group(group, results, writes, **solve))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("layer %d/%d: mean squared output error %.3e (relative %.3e)", step.position + 1,
                          step.count, np.mean([e[0] for e in errors]), np.mean([e[1] for e in errors]))
        if not step.needs_output:
            return None
        # The quantized weights are swapped in and the originals back, not copied: no second copy of the layer.
        originals = [(module, module.weight.data) for module, _ in writes]
        try:
            for module, weight in writes:
                module.weight.data = weight.to(module.weight.dtype)
            return run_layer(step.layer, step.hidden, step.calls, cancelled)
        finally:
            for module, weight in originals:
                module.weight.data = weight

    def process_head(hidden: list[torch.Tensor]) -> None:
        name, module, bits = plan.head
        _, norm = final_norm(model, plan.layers, METHOD)
        group = InputGroup(names=[name], modules=[module], bits=[bits], stats=_Hessian())
        for h in hidden:
            group.stats.add(norm(h))
        hidden.clear()  # the activations are spent: the lm_head's rows are solved next
        error = _quantize_group(group, results, None, **solve)
        log.debug("lm_head: mean squared output error %.3e (relative %.3e)", *error)

    run_layers(model, calibration, plan, method=METHOD, process_layer=process_layer, process_head=process_head,
               progress=progress, cancelled=cancelled)


def _quantize_group(group: InputGroup, results, writes, block_size, symmetric, act_order, damp) -> tuple[float, float]:
    """GPTQ on the stacked rows of a group: results get a QuantizedWeight per module, `writes` (unless None)
    (module, dequantized weight) pairs. Returns the mean squared and relative output error (only computed
    when debug logging is on).

    The rows are solved a chunk at a time and each chunk's results go straight into their module's arrays
    (codes as uint8): a large lm_head costs its weight plus one chunk, not four float copies of it.
    """
    hessian = group.stats.finished()
    weights = [m.weight.detach() for m in group.modules]
    row_bits = np.concatenate([np.full(w.shape[0], b, np.int64) for w, b in zip(weights, group.bits)])
    blocks = math.ceil(weights[0].shape[1] / block_size)
    codes = [np.empty((w.shape[0], blocks * block_size), np.uint8) for w in weights]
    scales = [np.empty((w.shape[0], blocks), np.float32) for w in weights]
    zeros = [None if symmetric else np.empty((w.shape[0], blocks), np.uint8) for w in weights]
    dequantized = None if writes is None else [torch.empty(w.shape, dtype=torch.float32, device=w.device)
                                                for w in weights]
    debug = log.isEnabledFor(logging.DEBUG)
    error = signal = 0.0
    bounds = np.cumsum([0] + [w.shape[0] for w in weights])
    for start, (q, scale, zero, values) in _solve_chunks(lambda a, b: _stacked_rows(weights, a, b), len(row_bits),
                                                         hessian, row_bits, block_size=block_size,
                                                         symmetric=symmetric, act_order=act_order, damp=damp,
                                                         consume=not debug):
        stop = start + len(q)
        for index in range(len(weights)):  # the chunk's rows that belong to this module
            a, b = max(start, bounds[index]), min(stop, bounds[index + 1])
            if a >= b:
                continue
            into, chunk = slice(a - bounds[index], b - bounds[index]), slice(a - start, b - start)
            codes[index][into] = q[chunk].cpu().numpy()
            scales[index][into] = scale[chunk].cpu().numpy()
            if zeros[index] is not None:
                zeros[index][into] = zero[chunk].cpu().numpy()
            if dequantized is not None:
                dequantized[index][into] = values[chunk]
        if debug:
            original = _stacked_rows(weights, start, stop).to(torch.float32)
            delta = original - values
            error += float(((delta @ hessian) * delta).sum())
            signal += float(((original @ hessian) * original).sum())
    for index, (name, module, weight, bits) in enumerate(zip(group.names, group.modules, weights, group.bits)):
        results[name] = QuantizedWeight(q=codes[index], scales=scales[index], zero_points=zeros[index], bits=bits,
                                        block_size=block_size, k=weight.shape[1])
        if writes is not None:
            writes.append((module, dequantized[index]))
    count = len(row_bits) * weights[0].shape[1]
    return error / 2 / count, error / signal if signal else 0.0


def _stacked_rows(weights: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of the weights stacked one after another, without stacking them whole."""
    pieces, offset = [], 0
    for weight in weights:
        a, b = max(start - offset, 0), min(stop - offset, weight.shape[0])
        if a < b:
            pieces.append(weight[a:b])
        offset += weight.shape[0]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


# --- the GPTQ solver ----------------------------------------------------------------------------


def gptq_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    row_bits: np.ndarray | int,
    *,
    block_size: int,
    symmetric: bool,
    act_order: bool = False,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one (N, K) weight given H (K, K) of its inputs; rows may differ in bits.

    Returns float32 tensors: codes (N, K padded to blocks) holding integers, scales and zero
    points (N, blocks), and the dequantized weight (N, K). Without act_order each block's scale
    and zero point are chosen when the loop reaches its first column, from the weights as GPTQ
    has updated them so far; with act_order the columns go in order of decreasing H diagonal
    and the block parameters are fixed up front from the original weights (static groups), so
    the layout stays plain blocks along K.
    """
    n = weight.shape[0]
    row_bits = np.broadcast_to(np.asarray(row_bits, np.int64), (n,))
    parts = [part for _, part in _solve_chunks(lambda a, b: weight[a:b], n, hessian, row_bits, block_size=block_size,
                                               symmetric=symmetric, act_order=act_order, damp=damp)]
    return tuple(torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts))  # type: ignore[return-value]


def _solve_chunks(rows, n: int, hessian: torch.Tensor, row_bits: np.ndarray, *, block_size: int, symmetric: bool,
                  act_order: bool, damp: float, consume: bool = False):
    """gptq_solve's results a chunk of about ROW_CHUNK rows at a time, as (first row, (codes, scales, zero
    points, dequantized)); `rows(start, stop)` gives the weight's rows. Each row's solution depends on H
    alone, so the chunks equal the whole. `consume`: H may be changed (it is not copied)."""
    dead = hessian.diagonal() == 0
    inverse, perm = _prepare_hessian(hessian, damp, act_order, consume=consume)
    size = math.ceil(n / math.ceil(n / ROW_CHUNK))
    for r in range(0, n, size):
        yield r, _solve_rows(rows(r, min(r + size, n)), inverse, perm, dead, row_bits[r:r + size], block_size,
                             symmetric)


def _prepare_hessian(hessian: torch.Tensor, damp: float, act_order: bool,
                     consume: bool = False) -> tuple[torch.Tensor, list[int] | None]:
    """Upper Cholesky factor U of H^-1 = U^T U (dampened, dead columns fixed), permuted when act_order.

    With J the order reversal, chol(J H J) = L gives U = J L^-1 J: one factorization and one
    triangular inverse instead of inverting H and factorizing again.
    """
    h = hessian.to(torch.float32)
    if not consume and h is hessian:
        h = h.clone()
    del hessian
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    perm = None
    if act_order:
        order = torch.argsort(diagonal, descending=True)
        h = h[order[:, None], order]
        perm = order.tolist()
    mean = float(h.diagonal().mean())
    # Dampened on the diagonal in place (the same sums as adding mean * eye): at K = 8192 every K x K
    # temporary is 256 MiB, so no more of them are made than the factorization needs.
    reversed_h = h.flip(0, 1)
    del h
    undamped = reversed_h.diagonal().clone()
    factor = damp
    for _ in range(6):
        reversed_h.diagonal().copy_(undamped).add_(factor * mean)
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if int(info) == 0:
            if factor != damp:
                log.warning("GPTQ: the Hessian needed dampening %.3g instead of %.3g", factor, damp)
            del reversed_h
            eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            del lower, eye
            return inverse.flip(0, 1), perm
        del lower
        factor *= 10
    raise WorkbenchError("GPTQ failed: the calibration data's Hessian is not positive definite even with "
                         "strong dampening; use more or more varied calibration text.")


def _segments(row_bits: np.ndarray) -> list[tuple[int, int, int]]:
    """Runs of equal bits as (start, stop, bits)."""
    edges = np.flatnonzero(np.diff(row_bits)) + 1
    starts = [0, *edges.tolist()]
    stops = [*edges.tolist(), len(row_bits)]
    return [(a, b, int(row_bits[a])) for a, b in zip(starts, stops)]


def _block_params(values: torch.Tensor, segments, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_params (ONNX Runtime's scale and zero point) for rows of `values` (..., block)."""
    array = values.detach().cpu().numpy()
    scales, zeros = [], []
    for start, stop, bits in segments:
        scale, zero = grid_params(array[start:stop], bits, symmetric)
        scales.append(scale)
        zeros.append(zero)
    scale = np.concatenate(scales) if len(scales) > 1 else scales[0]
    zero = np.concatenate(zeros) if len(zeros) > 1 else zeros[0]
    return torch.from_numpy(scale).to(values.device), torch.from_numpy(zero).to(values.device)


def _round_to_grid(values: torch.Tensor, qmax: float | torch.Tensor) -> torch.Tensor:
    """clamp(round_half_even(values), 0, qmax) in place, as numpy's round and clip do.

    Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to the nearest
    integer, ties to even; clamping first keeps values in that range without changing the result.
    torch's round_ is avoided because it runs as a parallel region even on short vectors, which
    costs milliseconds per column when the cores are shared with other processes.
    """
    if isinstance(qmax, float):
        values.clamp_(-1.0, qmax + 1.0)
    else:
        torch.minimum(values.clamp_(min=-1.0), qmax + 1.0, out=values)
    values.add_(_ROUNDING).sub_(_ROUNDING)
    if isinstance(qmax, float):
        return values.clamp_(0.0, qmax)
    return torch.minimum(values.clamp_(min=0.0), qmax, out=values)


def _solve_rows(weight, inverse, perm, dead, row_bits, block_size, symmetric):
    """The column loop, on the transposed weight (K, n) so that a column is a contiguous row.

    Error propagation is blocked twice: within a sub-block of SUB_COLUMNS columns one rank-1
    update per column, to the rest of the lazy batch once per sub-block, to the columns after
    the batch once per batch; the result is the same as updating everything after each column.
    """
    n, k = weight.shape
    blocks = math.ceil(k / block_size)
    segments = _segments(row_bits)
    device = weight.device
    wt = weight.to(torch.float32).t().contiguous()
    wt[dead] = 0
    qmax_rows = torch.from_numpy((2.0 ** row_bits - 1).astype(np.float32)).to(device)
    qmax: float | torch.Tensor = float(qmax_rows[0]) if len(segments) == 1 else qmax_rows
    scales = torch.zeros(blocks, n, dtype=torch.float32, device=device)
    zeros = torch.zeros(blocks, n, dtype=torch.float32, device=device)
    codes = torch.empty(blocks * block_size, n, dtype=torch.float32, device=device)
    dequantized = torch.empty(k, n, dtype=torch.float32, device=device)
    if perm is not None:
        padded = torch.nn.functional.pad(wt.t(), (0, blocks * block_size - k)).reshape(n, blocks, block_size)
        scale_nb, zero_nb = _block_params(padded, segments, symmetric)
        scales, zeros = scale_nb.t().contiguous(), zero_nb.t().contiguous()
        safes = torch.where(scales == 0, torch.ones_like(scales), scales)
        wt = wt[perm]
        lazy = LAZY_COLUMNS
    else:
        lazy = block_size * math.ceil(LAZY_COLUMNS / block_size)  # a block never straddles two batches
    scale = safe = zero = None
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        count = i2 - i1
        w1 = wt[i1:i2]
        inverse1 = inverse[i1:i2, i1:i2]
        errors = torch.empty(count, n, dtype=torch.float32, device=device)
        diagonal = inverse1.diagonal().tolist()
        for s1 in range(0, count, SUB_COLUMNS):
            s2 = min(s1 + SUB_COLUMNS, count)
            for i in range(s1, s2):
                column = i1 + i
                if perm is not None:
                    original = perm[column]
                    group = original // block_size
                    scale, safe, zero = scales[group], safes[group], zeros[group]
                else:
                    original = column
                    if column % block_size == 0:  # at a sub-block start: the block is fully updated
                        group = column // block_size
                        scale, zero = _block_params(w1[i:i + block_size].t(), segments, symmetric)
                        scales[group], zeros[group] = scale, zero
                        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
                current = w1[i]
                q = torch.div(current, safe).add_(zero)
                q = _round_to_grid(q, qmax)
                codes[original] = q
                value = q.sub_(zero).mul_(scale)
                dequantized[original] = value
                error = torch.sub(current, value, out=errors[i]).div_(diagonal[i])
                if i + 1 < s2:
                    w1[i + 1:s2].addr_(inverse1[i, i + 1:s2], error, alpha=-1.0)
            if s2 < count:
                w1[s2:].addmm_(inverse1[s1:s2, s2:].t(), errors[s1:s2], alpha=-1.0)
        if i2 < k:
            wt[i2:].addmm_(inverse[i1:i2, i2:].t(), errors, alpha=-1.0)
    if blocks * block_size > k:
        codes[k:] = zeros[-1:]
    return codes.t(), scales.t(), zeros.t(), dequantized.t()


def quantize_with_settings(model: nn.Module, calibration: torch.Tensor, plan: dict[str, int], settings, *,
                           progress: Progress, cancelled: Cancelled) -> tuple[dict[str, QuantizedWeight], None]:
    """GPTQ as workbench.quantization.methods calls a method."""
    return gptq_quantize(model, calibration, plan, block_size=settings.block_size, symmetric=settings.symmetric,
                         act_order=settings.act_order, progress=progress, cancelled=cancelled), None
