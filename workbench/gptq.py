"""GPTQ (Frantar et al. 2022) on a PyTorch causal LM, producing MatMulNBits' block layout.

The decoder layers are quantized one after another: the inputs of each layer are the outputs
of the layers before it with their weights already quantized, so later layers see (and
compensate) the error of earlier ones. For each layer, one forward pass over the calibration
batch gathers H = 2 X^T X for the inputs of every planned linear; linears fed by the same tensor
(q/k/v, gate/up) share one Hessian and are solved together, their rows stacked. Groups are the
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
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from workbench.blockquant import QuantizedWeight, grid_params
from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress

log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
LAZY_COLUMNS = 128  # columns per lazy batch update (the paper's B)
CHUNK_TOKENS = 2048  # calibration tokens per forward chunk
HESSIAN_SPLIT = 512  # X^T X of wider inputs is accumulated as upper blocks of about this size
SUB_COLUMNS = 16  # columns per sub-block inside a lazy batch (divides every block size)
# Rows solved at a time. A sub-block's rank-1 update then stays under torch's parallel grain
# (32768 elements) and runs on one thread: cheap even when other processes hold the cores.
ROW_CHUNK = 2048
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")
_ROUNDING = 1.5 * 2.0**23  # adding and subtracting it rounds a small float32 to an integer


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the inputs are captured."""


@dataclass
class _Captured:
    """What the model hands each decoder layer, per calibration chunk."""

    hidden: list[torch.Tensor]  # layer 0's input hidden states, one per chunk
    calls: dict[int, list[tuple[tuple, dict, bool]]]  # layer -> per chunk (args after hidden, kwargs, hidden as kw)
    order: list[int]  # layer indices in the order the model runs them


@dataclass
class _Group:
    """Planned linears that read the same input tensor: one Hessian, rows solved together."""

    names: list[str]
    modules: list[nn.Linear]
    bits: list[int]
    hessian: torch.Tensor | None = None
    tokens: int = 0
    upper_only: bool = False


@dataclass
class _Plan:
    layers: nn.ModuleList
    per_layer: dict[int, dict[str, tuple[nn.Linear, int]]] = field(default_factory=dict)
    head: tuple[str, nn.Linear, int] | None = None


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
) -> dict[str, QuantizedWeight]:
    """Quantize the linears named in `plan` (module name -> 4 or 8 bits) with GPTQ.

    `calibration` holds token ids, int64 (samples, tokens). Returns a `QuantizedWeight` per
    planned module, in PyTorch's (out, in) layout, which is MatMulNBits' (N, K). The model's
    weights are the same afterwards as before.
    """
    _validate(calibration, block_size, damp)
    resolved = _resolve_plan(model, plan)
    results: dict[str, QuantizedWeight] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _run(model, calibration, resolved, results, block_size, symmetric, act_order, damp, progress, cancelled)
    finally:
        model.train(was_training)
    progress(1.0, "done")
    return results


# --- plan and model structure ---------------------------------------------------------------


def _validate(calibration: torch.Tensor, block_size: int, damp: float) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise WorkbenchError("GPTQ needs calibration token ids as a (samples, tokens) tensor with at least one token.")
    if calibration.dtype not in (torch.int64, torch.int32):
        raise WorkbenchError(f"Calibration must hold integer token ids, not {calibration.dtype}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise WorkbenchError(f"Block size {block_size} is not supported; use a power of two of at least 16.")
    if not 0 < damp < 1:
        raise WorkbenchError(f"GPTQ dampening must be between 0 and 1 (usually 0.01), not {damp}.")


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers: the ModuleList holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise WorkbenchError(f"Could not find the decoder layers of {type(model).__name__}; GPTQ cannot run on it.")
    return best[1], best[2]


def _resolve_plan(model: nn.Module, plan: dict[str, int]) -> _Plan:
    layers_name, layers = _decoder_layers(model)
    modules = dict(model.named_modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    resolved = _Plan(layers=layers)
    for name, bits in plan.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise WorkbenchError(
                f"{name!r} is not a linear layer of this model; GPTQ quantizes nn.Linear modules only."
            )
        if bits not in SUPPORTED_BITS:
            raise WorkbenchError(f"{name}: {bits} bits is not supported; use 4 or 8.")
        if module is head:
            resolved.head = (name, module, bits)
            continue
        prefix = f"{layers_name}."
        index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        if not index.isdigit():
            raise WorkbenchError(
                f"{name!r} is neither inside a decoder layer ({layers_name}.N) nor the lm_head; "
                "GPTQ cannot quantize it. Use round-to-nearest for it."
            )
        resolved.per_layer.setdefault(int(index), {})[name] = (module, bits)
    return resolved


def _final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The norm applied between the last decoder layer and the lm_head."""
    for owner in model.modules():
        if any(child is layers for child in owner.children()):
            for attribute in FINAL_NORM_NAMES:
                norm = getattr(owner, attribute, None)
                if isinstance(norm, nn.Module):
                    return norm
    raise WorkbenchError(
        f"Could not find the final norm of {type(model).__name__}, so its lm_head cannot be quantized with "
        "GPTQ; leave the lm_head out of GPTQ (round-to-nearest or fp32)."
    )


# --- the layer-by-layer driver ----------------------------------------------------------------


def _run(model, calibration, plan: _Plan, results, block_size, symmetric, act_order, damp,
         progress: Progress, cancelled: Cancelled) -> None:
    if not plan.per_layer and plan.head is None:
        return
    device = next(model.parameters()).device
    chunk = max(1, CHUNK_TOKENS // calibration.shape[1])
    batches = [calibration[i:i + chunk].to(device=device, dtype=torch.long) for i in range(0, len(calibration), chunk)]
    progress(0.0, "capturing the first layer's inputs")
    captured = _capture(model, plan.layers, batches, cancelled)
    order = captured.order
    skipped = sorted(set(plan.per_layer) - set(order))
    if skipped:
        raise WorkbenchError(f"Decoder layer(s) {skipped} never ran during calibration, so GPTQ cannot quantize them.")
    needed = len(order) if plan.head is not None else 1 + max(order.index(i) for i in plan.per_layer)
    units = needed + (1 if plan.head is not None else 0)
    hidden = captured.hidden
    for step, index in enumerate(order[:needed]):
        check(cancelled)
        progress(step / units, f"layer {step + 1}/{len(order)}")
        layer = plan.layers[index]
        targets = plan.per_layer.get(index, {})
        calls = captured.calls[index]
        writes: list[tuple[nn.Linear, torch.Tensor]] = []
        if targets:
            groups = _collect_hessians(layer, targets, hidden, calls, cancelled)
            errors = []
            for group in groups:
                check(cancelled)
                errors.append(_quantize_group(group, results, writes, block_size, symmetric, act_order, damp))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("layer %d/%d: mean squared output error %.3e (relative %.3e)", step + 1, len(order),
                          np.mean([e[0] for e in errors]), np.mean([e[1] for e in errors]))
        if step + 1 < needed or plan.head is not None:
            originals = [(module, module.weight.detach().clone()) for module, _ in writes]
            try:
                for module, weight in writes:
                    module.weight.copy_(weight.to(module.weight.dtype))
                outputs = []
                for h, (args, kwargs, hidden_kw) in zip(hidden, calls):
                    check(cancelled)
                    outputs.append(_layer_output(layer(h, *args, **kwargs) if not hidden_kw
                                                 else layer(*args, hidden_states=h, **kwargs)))
                hidden = outputs
            finally:
                for module, weight in originals:
                    module.weight.copy_(weight)
    if plan.head is not None:
        check(cancelled)
        progress(needed / units, "lm_head")
        name, module, bits = plan.head
        norm = _final_norm(model, plan.layers)
        group = _Group(names=[name], modules=[module], bits=[bits])
        for h in hidden:
            _accumulate(group, norm(h))
        error = _quantize_group(group, results, [], block_size, symmetric, act_order, damp)
        log.debug("lm_head: mean squared output error %.3e (relative %.3e)", *error)


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _capture(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], cancelled: Cancelled) -> _Captured:
    """Record what the model passes each decoder layer, without running the layers.

    Every layer's forward is swapped for the identity while a forward pre-hook records its
    arguments; the pass stops at the last layer (or, as a backstop, at the lm_head). Layers can
    get different arguments (sliding-window masks, local rotary embeddings), so each is kept.
    """
    captured = _Captured(hidden=[], calls={}, order=[])
    current: dict[int, tuple[tuple, dict, bool]] = {}
    first: list[torch.Tensor] = []

    def make_hook(index: int):
        def hook(module, args, kwargs):
            hidden_kw = not args
            hidden = kwargs["hidden_states"] if hidden_kw else args[0]
            rest = dict(kwargs)
            rest.pop("hidden_states", None)
            for key in CACHE_KWARGS:
                if key in rest:
                    rest[key] = None
            if "use_cache" in rest:
                rest["use_cache"] = False
            if not current:
                first.append(hidden)
            current[index] = (tuple(args[1:]), rest, hidden_kw)
            if index == len(layers) - 1:
                raise _Stop

        return hook

    def stop(module, args):
        raise _Stop

    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        handles.append(head.register_forward_pre_hook(stop))
    saved = [layer.__dict__.get("forward") for layer in layers]
    try:
        for layer in layers:
            layer.forward = identity
        for batch in batches:
            check(cancelled)
            current.clear()
            first.clear()
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            if not first:
                raise WorkbenchError(f"{type(model).__name__} did not run its decoder layers; GPTQ cannot run on it.")
            order = list(current)
            if captured.order and order != captured.order:
                raise WorkbenchError("The model ran its decoder layers differently for two calibration batches.")
            captured.order = order
            captured.hidden.append(first[0])
            for index, call in current.items():
                captured.calls.setdefault(index, []).append(call)
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
        for handle in handles:
            handle.remove()
    return captured


def _collect_hessians(layer: nn.Module, targets: dict[str, tuple[nn.Linear, int]], hidden, calls,
                      cancelled: Cancelled) -> list[_Group]:
    """One forward pass of `layer` over all chunks, accumulating X^T X per distinct input tensor.

    The pass of a chunk stops as soon as every planned linear has seen its input: the rest of
    the layer (typically down_proj and the residual) is not needed here.
    """
    leader: dict[str, str] = {}
    groups: dict[str, _Group] = {}
    seen: list[tuple[torch.Tensor, str]] = []
    reached: set[str] = set()

    def make_hook(name: str, module: nn.Linear, bits: int):
        def hook(mod, args):
            x = args[0]
            reached.add(name)
            for tensor, lead in seen:
                if tensor is x:
                    if leader.setdefault(name, lead) != lead:
                        raise RuntimeError(f"{name} changed which tensor it shares its input with")
                    if name not in groups[lead].names:
                        groups[lead].names.append(name)
                        groups[lead].modules.append(module)
                        groups[lead].bits.append(bits)
                    break
            else:
                if leader.setdefault(name, name) != name:
                    raise RuntimeError(f"{name} changed which tensor it shares its input with")
                group = groups.setdefault(name, _Group(names=[name], modules=[module], bits=[bits]))
                seen.append((x, name))
                _accumulate(group, x)
            if len(reached) == len(targets):
                raise _Stop

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, module, bits))
               for name, (module, bits) in targets.items()]
    try:
        for h, (args, kwargs, hidden_kw) in zip(hidden, calls):
            check(cancelled)
            seen.clear()
            reached.clear()
            try:
                if hidden_kw:
                    layer(*args, hidden_states=h, **kwargs)
                else:
                    layer(h, *args, **kwargs)
            except _Stop:
                pass
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    missing = [name for name in targets if name not in leader]
    if missing:
        raise WorkbenchError(f"{', '.join(missing)} never ran during calibration, so GPTQ cannot quantize it.")
    return list(groups.values())


def _accumulate(group: _Group, x: torch.Tensor) -> None:
    """Add x^T x to the group's Hessian; only the upper block triangle for wide inputs."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float32)
    k = x.shape[1]
    if group.hessian is None:
        group.hessian = torch.zeros(k, k, dtype=torch.float32, device=x.device)
    parts = max(1, k // HESSIAN_SPLIT)
    bounds = [k * p // parts for p in range(parts + 1)]
    for a, b in itertools.pairwise(bounds):
        group.hessian[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])
    group.tokens += x.shape[0]
    group.upper_only = parts > 1


def _finished_hessian(group: _Group) -> torch.Tensor:
    """2 X^T X / tokens, mirrored when only the upper block triangle was accumulated."""
    h = group.hessian
    if group.upper_only:
        h = torch.triu(h)
        h = h + torch.triu(h, 1).T
    return h * (2.0 / max(group.tokens, 1))


def _quantize_group(group: _Group, results, writes, block_size, symmetric, act_order, damp) -> tuple[float, float]:
    """GPTQ on the stacked rows of a group: results get a QuantizedWeight per module, `writes`
    (module, dequantized weight) pairs. Returns the mean squared and relative output error
    (only computed when debug logging is on)."""
    hessian = _finished_hessian(group)
    weights = [m.weight.detach() for m in group.modules]
    stacked = torch.cat([w.to(torch.float32) for w in weights]) if len(weights) > 1 else weights[0].to(torch.float32)
    row_bits = np.concatenate([np.full(w.shape[0], b, np.int64) for w, b in zip(weights, group.bits)])
    codes, scales, zeros, dequantized = gptq_solve(stacked, hessian, row_bits, block_size=block_size,
                                                   symmetric=symmetric, act_order=act_order, damp=damp)
    start = 0
    for name, module, weight, bits in zip(group.names, group.modules, weights, group.bits):
        stop = start + weight.shape[0]
        results[name] = QuantizedWeight(
            q=codes[start:stop].cpu().numpy().astype(np.uint8),
            scales=scales[start:stop].cpu().numpy().astype(np.float32),
            zero_points=None if symmetric else zeros[start:stop].cpu().numpy().astype(np.uint8),
            bits=bits,
            block_size=block_size,
            k=weight.shape[1],
        )
        writes.append((module, dequantized[start:stop]))
        start = stop
    if not log.isEnabledFor(logging.DEBUG):
        return 0.0, 0.0
    delta = stacked - dequantized
    error = float(((delta @ hessian) * delta).sum()) / 2 / delta.numel()
    signal = float(((stacked @ hessian) * stacked).sum()) / 2 / delta.numel()
    return error, error / signal if signal else 0.0


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
    inverse, perm = _prepare_hessian(hessian, damp, act_order)
    dead = hessian.diagonal() == 0
    size = math.ceil(n / math.ceil(n / ROW_CHUNK))
    parts = [_solve_rows(weight[r:r + size], inverse, perm, dead, row_bits[r:r + size], block_size, symmetric)
             for r in range(0, n, size)]
    return tuple(torch.cat(p) if len(p) > 1 else p[0] for p in zip(*parts))  # type: ignore[return-value]


def _prepare_hessian(hessian: torch.Tensor, damp: float, act_order: bool) -> tuple[torch.Tensor, list[int] | None]:
    """Upper Cholesky factor U of H^-1 = U^T U (dampened, dead columns fixed), permuted when act_order.

    With J the order reversal, chol(J H J) = L gives U = J L^-1 J: one factorization and one
    triangular inverse instead of inverting H and factorizing again.
    """
    h = hessian.to(torch.float32).clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0
    perm = None
    if act_order:
        order = torch.argsort(diagonal, descending=True)
        h = h[order][:, order]
        perm = order.tolist()
    mean = float(h.diagonal().mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    reversed_h = h.flip(0, 1)
    factor = damp
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(reversed_h + (factor * mean) * eye)
        if int(info) == 0:
            if factor != damp:
                log.warning("GPTQ: the Hessian needed dampening %.3g instead of %.3g", factor, damp)
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1), perm
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
