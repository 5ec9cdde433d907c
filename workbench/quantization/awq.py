"""AWQ (Lin et al. 2023) on a PyTorch causal LM, producing MatMulNBits' block layout.

Input channels that carry large activations matter most, so before rounding each group of
linears reading one tensor gets per-channel scales s on its inputs: its weight columns are
multiplied by s and s is divided out of whatever produced the tensor (a norm's gain, or the
output rows of the linear before), which leaves the fp32 function unchanged. As in llm-awq and
AutoAWQ the folds per Llama-style decoder layer are input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up, up_proj -> down_proj and v_proj -> o_proj (only without
grouped-query attention, where o_proj's inputs map one to one onto v_proj's outputs); an untied
lm_head adds final norm -> lm_head. s = mean|x|^alpha, alpha on AutoAWQ's 20-point grid, chosen
to minimize the linears' output error after round-to-nearest on ONNX Runtime's grid; then each
weight block's range is shrunk where that lowers its output error (AutoAWQ's clipping search).
AutoAWQ leaves q/k unclipped; on the off-grid reference clipping them too lowered the perplexity
increase from +21.2 % to +19.7 %, so every linear is clipped here.

Both searches score the output error with the block-diagonal part of X^T X (one block_size
square per block along K): rounding errors of different blocks are independent, so the
cross-block terms average out, and a candidate costs N*K*block_size multiply-adds instead of
N*K*K, which for 20 candidates per fold would take longer on a few CPU cores than the whole
calibration forward pass.

The model is never written: the scaled and clipped weights are copies, quantized right away.
Each layer's outputs, the next layer's inputs, are those of its fp32 weights, which folding
leaves unchanged (AutoAWQ, too, computes them before scaling). The result holds a
`QuantizedWeight` per planned linear and the new values of the norms' gains (and of biases of
linears whose output rows were scaled) by parameter name, for `quantize_onnx(overrides=...)`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from workbench.quantization.blockquant import QuantizedWeight, rtn_quantize
from workbench.quantization.eval_mode import evaluating
from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.quantization.layerwise import (
    LayerStep,
    Plan,
    collect_inputs,
    decoder_layers,
    final_norm,
    output_embeddings,
    resolve_plan,
    run_layer,
    run_layers,
    validate_block_size,
    validate_calibration,
)

log = logging.getLogger(__name__)

METHOD = "AWQ"
SCALE_GRID = 20  # alpha = 0, 1/20, ..., 19/20 (alpha = 0: no scaling, plain round-to-nearest)
CLIP_GRID = 20  # clipping ratios 1, 0.95, ..., 0.55: CLIP_STEPS steps of 1/CLIP_GRID (AutoAWQ)
CLIP_STEPS = 10
SCALE_ROWS = 512  # weight rows that score each scale candidate (see _search_scales)
CHUNK_ELEMENTS = 2**19  # weights per piece in the searches: bounds their temporaries (an lm_head has millions)
# A Llama-style decoder layer: (source of the tensor, linears reading it). A source that is a
# linear has its output rows divided by the scales, a norm its gain (and bias).
LAYER_FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclass(frozen=True)
class AwqResult:
    precomputed: dict[str, QuantizedWeight]  # planned linear -> its quantized (scaled, clipped) weight
    overrides: dict[str, np.ndarray]  # parameter name -> new fp32 value (norm gains, scaled biases)


@dataclass(frozen=True)
class Fold:
    """Per-channel scales on the inputs of `linears`, divided out of `source` (module names)."""

    source: str
    linears: tuple[str, ...]


def awq_quantize(
    model: nn.Module,
    calibration: torch.Tensor,
    plan: dict[str, int],
    *,
    block_size: int,
    symmetric: bool,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> AwqResult:
    """Quantize the linears named in `plan` (module name -> 4 or 8 bits) with AWQ.

    `calibration` holds token ids, int64 (samples, tokens). A fold is used only when every
    linear it changes is planned (an fp32 linear would keep its unscaled weight in the graph).
    A tied lm_head shares its tensor with the embeddings, so it is rounded to nearest as they
    are. The model's parameters are not changed.
    """
    validate_calibration(calibration, METHOD)
    validate_block_size(block_size)
    resolved = resolve_plan(model, plan, METHOD)
    modules = dict(model.named_modules())
    folds = {index: _usable(_layer_folds(model, resolved, index), plan, modules)
             for index in resolved.per_layer}
    results: dict[str, QuantizedWeight] = {}
    overrides: dict[str, np.ndarray] = {}
    head_fold = None
    if resolved.head is not None:
        name, module, bits = resolved.head
        if _is_tied(model, module):
            results[name] = rtn_quantize(module.weight.detach().float().cpu().numpy(), bits, block_size, symmetric)
            resolved.head = None  # and no need to run the layers for its inputs
        else:
            head_fold = _head_fold(model, resolved, name)
    quantizer = _Quantizer(model, modules, block_size, symmetric, results, overrides, cancelled)
    with evaluating(model):
        run_layers(
            model, calibration, resolved, method=METHOD,
            process_layer=lambda step: quantizer.layer(step, folds.get(step.index, [])),
            process_head=lambda hidden: quantizer.head(hidden, resolved.head, head_fold),
            progress=progress, cancelled=cancelled,
        )
    progress(1.0, "done")
    return AwqResult(precomputed=results, overrides=overrides)


def awq_folds(model: nn.Module) -> list[Fold]:
    """Every fold of the model, layer by layer, then final norm -> lm_head when the head is untied."""
    layers_name, layers = decoder_layers(model, METHOD)
    resolved = Plan(layers_name=layers_name, layers=layers)
    folds = [fold for index in range(len(layers)) for fold in _layer_folds(model, resolved, index)]
    head = output_embeddings(model)
    if isinstance(head, nn.Linear) and not _is_tied(model, head):
        folds.append(_head_fold(model, resolved, _module_name(model, head)))
    return folds


def fold_scales(model: nn.Module, scales: Mapping[Fold, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New values of the parameters that the folds change, by name, applied in order.

    The model is not changed; folds that touch the same parameter (up_proj's columns for
    gate/up, its rows for down_proj) compose.
    """
    modules = dict(model.named_modules())
    values: dict[str, torch.Tensor] = {}

    def current(module_name: str, attribute: str) -> torch.Tensor | None:
        parameter = getattr(modules[module_name], attribute, None)
        if parameter is None:
            return None
        return values.get(f"{module_name}.{attribute}", parameter.detach())

    for fold, s in scales.items():
        source = modules[fold.source]
        s = s.to(torch.float32)
        if isinstance(source, nn.Linear):
            values[f"{fold.source}.weight"] = current(fold.source, "weight") / s[:, None]
        else:
            values[f"{fold.source}.weight"] = current(fold.source, "weight") / s
        bias = current(fold.source, "bias")
        if bias is not None:
            values[f"{fold.source}.bias"] = bias / s
        for linear in fold.linears:
            values[f"{linear}.weight"] = current(linear, "weight") * s
    return values


# --- structure ----------------------------------------------------------------------------------


def _is_tied(model: nn.Module, head: nn.Module) -> bool:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings is not None and head.weight is embeddings.weight


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _layer_folds(model: nn.Module, plan: Plan, index: int) -> list[Fold]:
    """The folds of one decoder layer; WorkbenchError when it is not laid out like Llama's."""
    layer = plan.layers[index]
    prefix = f"{plan.layers_name}.{index}."
    found = dict(layer.named_modules())
    expected = [source for source, _ in LAYER_FOLDS] + [name for _, names in LAYER_FOLDS for name in names]
    missing = sorted({name for name in expected if name not in found})
    if missing:
        raise WorkbenchError(
            f"AWQ needs Llama-style decoder layers (input_layernorm, self_attn.q/k/v/o_proj, "
            f"post_attention_layernorm, mlp.gate/up/down_proj); layer {index} of this "
            f"{type(model).__name__} has no {', '.join(missing)}. Use GPTQ or round-to-nearest."
        )
    not_linear = sorted({name for _, names in LAYER_FOLDS for name in names if not isinstance(found[name], nn.Linear)})
    if not_linear:
        raise WorkbenchError(
            f"AWQ scales nn.Linear layers only; in layer {index} of this {type(model).__name__}, "
            f"{', '.join(not_linear)} {'is' if len(not_linear) == 1 else 'are'} not. Use round-to-nearest."
        )
    folds = []
    for source, linears in LAYER_FOLDS:
        if isinstance(found[source], nn.Linear):
            # v_proj -> o_proj: o_proj's inputs are v_proj's outputs only without grouped-query
            # attention; a scaled v head shared by several query heads has no place to go.
            if found[source].out_features != found[linears[0]].in_features:
                continue
        else:
            _check_foldable(found[source], f"{prefix}{source}", model)
        folds.append(Fold(f"{prefix}{source}", tuple(f"{prefix}{name}" for name in linears)))
    return folds


def _head_fold(model: nn.Module, plan: Plan, head_name: str) -> Fold:
    norm_name, norm = final_norm(model, plan.layers, METHOD)
    _check_foldable(norm, norm_name, model)
    return Fold(norm_name, (head_name,))


def _check_foldable(norm: nn.Module, name: str, model: nn.Module) -> None:
    """A norm must compute gain * f(x) (+ bias * 1) so that dividing gain and bias by s divides its output by s."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise WorkbenchError(
            f"AWQ folds its scales into the norms before the linears, but {name} of this "
            f"{type(model).__name__} has no per-channel gain. Use GPTQ or round-to-nearest."
        )
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, weight.shape[0], generator=generator).to(weight)
    s = torch.rand(weight.shape[0], generator=generator).to(weight) + 0.5
    parameters = {"weight": weight / s}
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        parameters["bias"] = norm.bias / s
    with torch.no_grad():
        expected = norm(probe) / s
        actual = torch.func.functional_call(norm, parameters, (probe,))
    if not torch.allclose(actual, expected, rtol=1e-4, atol=1e-5):
        raise WorkbenchError(
            f"AWQ folds its scales into the norms before the linears, but {name} "
            f"({type(norm).__name__}) does not multiply its output by its weight (e.g. it uses "
            f"1 + weight). Use GPTQ or round-to-nearest."
        )


def _usable(folds: list[Fold], plan: dict[str, int], modules: dict[str, nn.Module]) -> list[Fold]:
    """Folds whose changed linears are all planned: an fp32 linear keeps its unscaled weight."""
    return [
        fold for fold in folds
        if all(name in plan for name in fold.linears)
        and (fold.source in plan or not isinstance(modules[fold.source], nn.Linear))
    ]


# --- statistics and searches --------------------------------------------------------------------


class _BlockStats:
    """Per-channel mean |x| and the block-diagonal of X^T X, blocks of `block_size` along K."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.gram: torch.Tensor | None = None  # (blocks, block_size, block_size)
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        blocks = _pad(x, self.block_size).view(x.shape[0], -1, self.block_size).transpose(0, 1)
        if self.gram is None:
            self.gram = torch.zeros(blocks.shape[0], self.block_size, self.block_size, device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], device=x.device)
        self.gram.baddbmm_(blocks.transpose(1, 2), blocks)
        self.abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def scaled_gram(self, s: torch.Tensor | None) -> torch.Tensor:
        """The Gram blocks of x / s (the inputs as a linear sees them once its columns carry s)."""
        if s is None:
            return self.gram
        inverse = _pad(1.0 / s[None, :], self.block_size, value=1.0).view(-1, self.block_size)
        return self.gram * inverse[:, :, None] * inverse[:, None, :]


def _pad(x: torch.Tensor, block_size: int, value: float = 0.0) -> torch.Tensor:
    pad = (-x.shape[-1]) % block_size
    return nn.functional.pad(x, (0, pad), value=value) if pad else x


def _fake_quantize(blocks: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Round (..., block) values to nearest on ONNX Runtime's grid (`grid_params`' rules), dequantized."""
    qmax = 2**bits - 1
    if symmetric:
        extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        scale = extreme / -(2 ** (bits - 1))
        zero: torch.Tensor | float = float(2 ** (bits - 1))
        safe = torch.where(scale == 0, 1.0, scale)
    else:
        low = blocks.amin(-1, keepdim=True).clamp_(max=0.0)
        high = blocks.amax(-1, keepdim=True).clamp_(min=0.0)
        scale = (high - low) / qmax
        safe = torch.where(scale == 0, 1.0, scale)
        zero = (-low / safe).round_().clamp_(0, qmax)
    q = (blocks / safe).add_(zero).round_().clamp_(0, qmax)
    return q.sub_(zero).mul_(scale)


def _block_errors(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) output error of weight errors `delta` (rows, blocks, block): d^T G_b d."""
    weighted = torch.bmm(delta.transpose(0, 1), gram).transpose(0, 1)
    return (weighted * delta).sum(-1)


def _scale_loss(weight: torch.Tensor, s: torch.Tensor, bits: int, stats: _BlockStats, symmetric: bool) -> float:
    """Output error of round-to-nearest of weight * s, the scales divided back out."""
    block_size = stats.block_size
    s_padded = _pad(s[None, :], block_size, value=1.0).view(1, -1, block_size)
    total = 0.0
    for rows in _row_chunks(weight, block_size):
        delta = _fake_quantize(rows * s_padded, bits, symmetric).div_(s_padded).sub_(rows)
        total += float(_block_errors(delta, stats.gram).sum())
    return total


def _search_scales(
    weights: list[tuple[torch.Tensor, int]], stats: _BlockStats, symmetric: bool
) -> tuple[torch.Tensor, float]:
    """AWQ's scale s = mean|x|^alpha with the alpha of least output error over the linears of a fold.

    The error is a sum over rows, so it is estimated on every n-th row, at most SCALE_ROWS in all:
    the scale search then costs about as much for an lm_head as for q/k/v.
    """
    stride = -(-sum(weight.shape[0] for weight, _ in weights) // SCALE_ROWS)
    sampled = [(weight[::stride].contiguous(), bits) for weight, bits in weights]
    x_mean = stats.mean_abs()
    best: tuple[float, float, torch.Tensor] | None = None
    for step in range(SCALE_GRID):
        alpha = step / SCALE_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1 in log scale, as AutoAWQ does
        loss = sum(_scale_loss(weight, s, bits, stats, symmetric) for weight, bits in sampled)
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    return best[2], best[1]


def _row_chunks(weight: torch.Tensor, block_size: int) -> Iterator[torch.Tensor]:
    """The weight's rows as (rows, blocks, block_size) pieces small enough to stay in cache."""
    step = max(1, CHUNK_ELEMENTS // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = _pad(weight[start:start + step], block_size)
        yield rows.view(rows.shape[0], -1, block_size)


def _clip(weight: torch.Tensor, bits: int, gram: torch.Tensor, block_size: int, symmetric: bool) -> torch.Tensor:
    """Per block, the range shrink (1, 0.95, ... 0.55 of it) with the least output error, applied."""
    clipped = []
    for rows in _row_chunks(weight, block_size):
        if symmetric:
            high = rows.abs().amax(-1, keepdim=True)
            low = -high
        else:
            low = rows.amin(-1, keepdim=True).clamp_(max=0.0)
            high = rows.amax(-1, keepdim=True).clamp_(min=0.0)
        best_error = torch.full(rows.shape[:2], float("inf"), device=rows.device)
        best_ratio = torch.ones(rows.shape[:2], device=rows.device)
        for step in range(CLIP_STEPS):
            ratio = 1.0 - step / CLIP_GRID
            delta = _fake_quantize(torch.clamp(rows, low * ratio, high * ratio), bits, symmetric).sub_(rows)
            error = _block_errors(delta, gram)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio = torch.where(better, ratio, best_ratio)
        ratio = best_ratio[..., None]
        clipped.append(torch.clamp(rows, low * ratio, high * ratio).reshape(rows.shape[0], -1))
    return torch.cat(clipped)[:, :weight.shape[1]]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The searches are thousands of small tensor ops: on two threads each op waits for the
    other, which costs more than it saves, and far more when another process holds a core
    (measured: 0.09 s on one thread, 0.3 to 17 s on two, for one fold)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- the layer-by-layer work --------------------------------------------------------------------


class _Quantizer:
    """Searches scales and clipping for each layer handed over by `run_layers`, collecting results."""

    def __init__(self, model, modules, block_size, symmetric, results, overrides, cancelled: Cancelled) -> None:
        self.model = model
        self.modules = modules
        self.block_size = block_size
        self.symmetric = symmetric
        self.results = results
        self.overrides = overrides
        self.cancelled = cancelled

    def layer(self, step: LayerStep, folds: list[Fold]) -> list[torch.Tensor] | None:
        if not step.targets:
            return run_layer(step.layer, step.hidden, step.calls, self.cancelled) if step.needs_output else None
        groups, outputs = collect_inputs(step, lambda: _BlockStats(self.block_size), self.cancelled,
                                         keep_outputs=step.needs_output, method=METHOD)
        stats = {name: group.stats for group in groups for name in group.names}
        with _one_thread():
            self._quantize(step.targets, folds, stats, f"layer {step.position + 1}/{step.count}")
        return outputs

    def head(self, hidden: list[torch.Tensor], head: tuple[str, nn.Linear, int], fold: Fold) -> None:
        name, module, bits = head
        norm = self.modules[fold.source]
        stats = _BlockStats(self.block_size)
        for h in hidden:
            check(self.cancelled)
            stats.add(norm(h))
        with _one_thread():
            self._quantize({name: (module, bits)}, [fold], {name: stats}, "lm_head")

    def _quantize(self, targets: dict[str, tuple[nn.Linear, int]], folds: list[Fold],
                  stats: dict[str, _BlockStats], where: str) -> None:
        scales: dict[Fold, torch.Tensor] = {}
        for fold in folds:
            check(self.cancelled)
            weights = [(self.modules[name].weight.detach().float(), targets[name][1]) for name in fold.linears]
            scales[fold], alpha = _search_scales(weights, stats[fold.linears[0]], self.symmetric)
            log.debug("%s: %s -> %s, alpha %.2f", where, fold.source, ", ".join(fold.linears), alpha)
        values = fold_scales(self.model, scales)
        column_scales = {name: s for fold, s in scales.items() for name in fold.linears}
        for name, (module, bits) in targets.items():
            check(self.cancelled)
            weight = values.get(f"{name}.weight", module.weight.detach()).float()
            gram = stats[name].scaled_gram(column_scales.get(name))
            weight = _clip(weight, bits, gram, self.block_size, self.symmetric)
            self.results[name] = rtn_quantize(weight.cpu().numpy(), bits, self.block_size, self.symmetric)
        for parameter, value in values.items():
            if parameter.removesuffix(".weight") not in targets:  # norms' gains, scaled biases
                self.overrides[parameter] = value.float().cpu().numpy()


def quantize_with_settings(model: nn.Module, calibration: torch.Tensor, plan: dict[str, int], settings, *,
                           progress: Progress, cancelled: Cancelled) -> tuple[dict[str, QuantizedWeight], dict]:
    """AWQ as workbench.quantization.methods calls a method."""
    result = awq_quantize(model, calibration, plan, block_size=settings.block_size, symmetric=settings.symmetric,
                          progress=progress, cancelled=cancelled)
    return result.precomputed, result.overrides
