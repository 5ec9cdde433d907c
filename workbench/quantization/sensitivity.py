"""Which linear layers suffer most from 4 bits, and which to keep at 8 bits within a size budget.

A layer's sensitivity is the mean KL divergence between the original model's next-token
distributions and those of the same model with only that layer rounded to 4 bits
(round-to-nearest at the run's block size and symmetry), per calibration token. Rerunning the
model once per layer costs hours on a laptop for a model of a few hundred layers, so the KL is
taken to second order, which is accurate for changes as small as one layer's rounding:
KL ~ E[dz^T F dz] / 2, with dz the change of the layer's output and F the Fisher information
of the next-token distribution with respect to that output. One forward pass gives every dz;
each of a few random probes is one backward pass that gives an unbiased sample of F for every
layer at once. The model's weights are never written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from workbench.quantization.blockquant import rtn_quantize
from workbench.quantization.eval_mode import evaluating
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress
from workbench.quantization.int4_graph import layer_plan
from workbench.quantization.sizes import estimate_int4
from workbench.settings import QuantSettings
from workbench.sources import ModelInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

METHOD = "The sensitivity measurement"
SENSITIVITY_TOKENS = 512  # enough to rank layers; the cost grows linearly with it
PROBES = 6  # backward passes, each a sample of every layer's Fisher information; more: steadier figures
TOP_LAYERS = 10  # the most sensitive layers listed in run.json


def measure_sensitivity(
    model: nn.Module,
    calibration: torch.Tensor,
    layers: list[str],
    *,
    block_size: int,
    symmetric: bool,
    probes: int = PROBES,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> dict[str, float]:
    """Mean KL(original || only this layer at 4 bits) per token, for each named linear.

    `calibration` holds token ids, int64 (samples, tokens); `layers` are module names of linears
    in the decoder layers or the lm_head.
    """
    from workbench.quantization.layerwise import (
        resolve_plan,
        validate_block_size,
        validate_calibration,
    )

    validate_calibration(calibration, METHOD)
    validate_block_size(block_size)
    plan = resolve_plan(model, dict.fromkeys(layers, 4), METHOD)
    with evaluating(model, no_grad=False):  # the Fisher probes need gradients
        return _measure(model, calibration, plan, block_size, symmetric, probes, progress, cancelled)


def _measure(model, calibration, plan, block_size, symmetric, probes, progress: Progress, cancelled: Cancelled):
    """One forward pass per chunk keeps each planned linear's output change `dz` (its input times
    the rounding error of its weight); then each probe is one backward pass of a random vector r
    with E[r r^T] = diag(p) - p p^T at the logits, the Hessian of the KL there, so that
    E[(g . dz)^2] / 2 with g the gradient at the linear's output is the KL's second-order term."""
    import torch

    from workbench.quantization.layerwise import CHUNK_TOKENS

    modules = {name: module for layer in plan.per_layer.values() for name, (module, _) in layer.items()}
    if plan.head is not None:
        modules[plan.head[0]] = plan.head[1]
    device = next(model.parameters()).device
    chunk = max(1, CHUNK_TOKENS // calibration.shape[1])
    batches = [calibration[i:i + chunk].to(device=device, dtype=torch.long) for i in range(0, len(calibration), chunk)]
    generator = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(modules, 0.0)
    tokens = 0
    for number, batch in enumerate(batches):
        changes: dict[str, torch.Tensor] = {}
        handles = [module.register_forward_hook(_keep_change(name, block_size, symmetric, changes, totals, cancelled))
                   for name, module in modules.items()]
        embeddings: list[torch.Tensor] = []
        handles.append(model.get_input_embeddings().register_forward_hook(_gradients_from_here(embeddings)))
        try:
            progress(number / len(batches), "the model's outputs and each layer's rounding error")
            with torch.enable_grad():
                logits = model(input_ids=batch, use_cache=False).logits.float()
            probabilities = torch.softmax(logits.detach(), dim=-1)
            for probe in range(probes):
                check(cancelled)
                progress((number + (probe + 1) / (probes + 1)) / len(batches), f"probe {probe + 1}/{probes}")
                noise = torch.randn(logits.shape, generator=generator).to(logits) * probabilities.sqrt()
                direction = noise - probabilities * noise.sum(dim=-1, keepdim=True)
                torch.autograd.grad(logits, embeddings, direction, retain_graph=probe + 1 < probes)
        finally:
            for handle in handles:
                handle.remove()
        tokens += batch.numel()
    return {name: total / (2 * probes * tokens) for name, total in totals.items()}


def _gradients_from_here(kept: list[torch.Tensor]):
    """Forward hook of the input embeddings: gradients start there, so none reach the weights."""

    def hook(module, args, output):
        kept.append(output.detach().requires_grad_())
        return kept[-1]

    return hook


def _keep_change(name: str, block_size: int, symmetric: bool, changes: dict, totals: dict, cancelled: Cancelled):
    """Forward hook of one linear: keep how its output would change with 4-bit weights, and add
    (g . dz)^2 to its total whenever a probe's gradient g reaches its output."""

    import torch

    def hook(module, args, output):
        check(cancelled)
        weight = module.weight.detach()
        rounded = rtn_quantize(weight.float().cpu().numpy(), 4, block_size, symmetric).dequantize()
        error = torch.from_numpy(rounded).to(weight) - weight
        changes[name] = torch.nn.functional.linear(args[0].detach(), error)

        def on_gradient(gradient):
            check(cancelled)
            totals[name] += float(((gradient * changes[name]).sum(dim=-1) ** 2).sum())

        output.register_hook(on_gradient)

    return hook


def choose_eight_bit(info: ModelInfo, settings: QuantSettings, kl: dict[str, float]) -> dict:
    """Greedily keep the layers with the most KL per extra byte at 8 bits, within the settings' budget.

    The budget is `sensitive_8bit_pct` percent of the model's size with `settings` before any
    layer is chosen. Returns the run.json section (without how long it took).
    """
    base = sum(estimate_int4(info, settings).values())
    budget = int(base * settings.sensitive_8bit_pct / 100)
    extra = {name: sum(estimate_int4(info, with_eight_bit(settings, [name])).values()) - base for name in kl}
    ranked = sorted(kl, key=lambda name: -kl[name])
    rank = {name: position + 1 for position, name in enumerate(ranked)}
    chosen: list[str] = []
    spent = 0
    for name in sorted(kl, key=lambda name: -kl[name] / max(extra[name], 1)):
        if extra[name] > 0 and spent + extra[name] <= budget:
            chosen.append(name)
            spent += extra[name]
    chosen.sort(key=rank.__getitem__)
    return {
        "chosen": [{"layer": name, "kl": _round(kl[name]), "rank": rank[name], "extra_bytes": extra[name]}
                   for name in chosen],
        "budget_pct": settings.sensitive_8bit_pct,
        "budget_bytes": budget,
        "extra_bytes": spent,
        "layers": len(kl),
        "top": [{"layer": name, "kl": _round(kl[name]), "rank": rank[name], "eight_bit": name in chosen}
                for name in ranked[:TOP_LAYERS]],
    }


@dataclass(frozen=True)
class LayerSensitivity:
    """Measured KL per linear, on a number of tokens, for one block size and symmetry."""

    kl: dict[str, float]
    tokens: int
    block_size: int
    symmetric: bool

    def section(self, info: ModelInfo, settings: QuantSettings) -> dict:
        """run.json's `sensitivity` section: how it was measured and the layers chosen for `settings`."""
        grid = f"blocks of {self.block_size}, {'symmetric' if self.symmetric else 'asymmetric'}"
        return {
            "measured": (
                f"For each linear layer alone rounded to 4 bits (round-to-nearest, {grid}), the mean KL "
                f"divergence of the next-token distributions from the original's over {self.tokens} "
                f"calibration tokens, to second order ({PROBES} Fisher probes)."
            ),
            "tokens": self.tokens,
            **choose_eight_bit(info, settings, self.kl),
        }


def measure_layers(
    model: nn.Module,
    samples: np.ndarray,
    info: ModelInfo,
    settings: QuantSettings,
    *,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> LayerSensitivity:
    """Measure the linears `settings` plan at 4 bits on the first SENSITIVITY_TOKENS calibration tokens."""
    import torch

    embeddings = {w.name for w in info.weights if w.role == "embeddings"}
    layers = [name for name, bits in layer_plan(info, settings).items() if bits == 4 and name not in embeddings]
    length = min(samples.shape[1], SENSITIVITY_TOKENS)
    tokens = torch.as_tensor(samples[: max(1, SENSITIVITY_TOKENS // length), :length])
    kl = measure_sensitivity(model, tokens, layers, block_size=settings.block_size, symmetric=settings.symmetric,
                             progress=progress, cancelled=cancelled)
    return LayerSensitivity(kl, int(tokens.numel()), settings.block_size, settings.symmetric)


def eight_bit_layers(section: dict | None) -> list[str]:
    return [entry["layer"] for entry in section["chosen"]] if section else []


def with_eight_bit(settings: QuantSettings, layers: list[str]) -> QuantSettings:
    """`settings` with these layers (exact module names) kept at 8 bits too."""
    return settings.replace(eight_bit=settings.eight_bit + tuple(layers)) if layers else settings


def _round(value: float) -> float:
    return float(f"{value:.4g}")
