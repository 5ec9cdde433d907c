"""Layer-by-layer calibration on a PyTorch causal LM: the machinery GPTQ and AWQ share.

The model runs once up to its first decoder layer, with every layer's forward swapped for the
identity, to record what it hands each layer (hidden states, masks, rotary embeddings). Then the
decoder layers run one after another on those recorded arguments: a method gets each layer with
its inputs, gathers statistics of the inputs of the planned linears (`collect_inputs`), does its
work and hands back the layer's outputs, which become the next layer's inputs. Linears fed by
the same tensor (q/k/v, gate/up) form one `InputGroup` with one set of statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check

SUPPORTED_BITS = (4, 8)
CHUNK_TOKENS = 2048  # calibration tokens per forward chunk
FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the inputs are captured."""


@dataclass
class Captured:
    """What the model hands each decoder layer, per calibration chunk."""

    hidden: list[torch.Tensor]  # layer 0's input hidden states, one per chunk
    calls: dict[int, list[tuple[tuple, dict, bool]]]  # layer -> per chunk (args after hidden, kwargs, hidden as kw)
    order: list[int]  # layer indices in the order the model runs them


@dataclass
class Plan:
    """The planned linears, found in the model: per decoder layer, and the lm_head apart."""

    layers_name: str
    layers: nn.ModuleList
    per_layer: dict[int, dict[str, tuple[nn.Linear, int]]] = field(default_factory=dict)
    head: tuple[str, nn.Linear, int] | None = None


class Stats(Protocol):
    """Statistics of one input tensor, accumulated chunk by chunk."""

    def add(self, x: torch.Tensor) -> None: ...


@dataclass
class InputGroup:
    """Planned linears that read the same input tensor, with that tensor's statistics."""

    names: list[str]
    modules: list[nn.Linear]
    bits: list[int]
    stats: Stats


@dataclass
class LayerStep:
    """One decoder layer with what it receives, handed to a method by `run_layers`."""

    position: int  # 0-based place in the order the model runs its layers
    count: int  # decoder layers in the model
    index: int  # index in the ModuleList
    layer: nn.Module
    targets: dict[str, tuple[nn.Linear, int]]  # planned linears of this layer: name -> (module, bits)
    hidden: list[torch.Tensor]  # input hidden states per chunk
    calls: list[tuple[tuple, dict, bool]]  # the other arguments per chunk
    needs_output: bool  # whether the method must return the layer's outputs


# --- checks and the model's structure -----------------------------------------------------------


# Arguments the pipeline always gets right (it builds them from checked settings): a wrong one is a
# caller's bug, so ValueError rather than WorkbenchError.
def validate_calibration(calibration: torch.Tensor, method: str) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(
            f"{method} needs calibration token ids as a (samples, tokens) tensor with at least one token."
        )
    if calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Calibration must hold integer token ids, not {calibration.dtype}.")


def validate_block_size(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"Block size {block_size} is not supported; use a power of two of at least 16.")


def decoder_layers(model: nn.Module, method: str) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers: the ModuleList holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise WorkbenchError(f"Could not find the decoder layers of {type(model).__name__}; {method} cannot run on it.")
    return best[1], best[2]


def output_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def resolve_plan(model: nn.Module, plan: dict[str, int], method: str) -> Plan:
    """Find each planned linear (module name -> 4 or 8 bits) in a decoder layer or as the lm_head."""
    layers_name, layers = decoder_layers(model, method)
    modules = dict(model.named_modules())
    head = output_embeddings(model)
    resolved = Plan(layers_name=layers_name, layers=layers)
    for name, bits in plan.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):  # the plan is made from the model's own linears
            raise ValueError(
                f"{name!r} is not a linear layer of this model; {method} quantizes nn.Linear modules only."
            )
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}: {bits} bits is not supported; use 4 or 8.")
        if module is head:
            resolved.head = (name, module, bits)
            continue
        prefix = f"{layers_name}."
        index = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        if not index.isdigit():
            raise WorkbenchError(
                f"{name!r} is neither inside a decoder layer ({layers_name}.N) nor the lm_head; "
                f"{method} cannot quantize it. Use round-to-nearest for it."
            )
        resolved.per_layer.setdefault(int(index), {})[name] = (module, bits)
    return resolved


def final_norm(model: nn.Module, layers: nn.ModuleList, method: str) -> tuple[str, nn.Module]:
    """The norm applied between the last decoder layer and the lm_head, with its module name."""
    for owner_name, owner in model.named_modules():
        if any(child is layers for child in owner.children()):
            for attribute in FINAL_NORM_NAMES:
                norm = getattr(owner, attribute, None)
                if isinstance(norm, nn.Module):
                    return f"{owner_name}.{attribute}" if owner_name else attribute, norm
    raise WorkbenchError(
        f"Could not find the final norm of {type(model).__name__}, so its lm_head cannot be quantized with "
        f"{method}; leave the lm_head out of {method} (round-to-nearest or fp32)."
    )


# --- the layer-by-layer driver ------------------------------------------------------------------


def run_layers(
    model: nn.Module,
    calibration: torch.Tensor,
    plan: Plan,
    *,
    method: str,
    process_layer: Callable[[LayerStep], list[torch.Tensor] | None],
    process_head: Callable[[list[torch.Tensor]], None],
    progress: Progress,
    cancelled: Cancelled,
) -> None:
    """Hand each decoder layer that matters to `process_layer`, in the order the model runs them.

    `process_layer` returns the layer's outputs per chunk when `step.needs_output` (the next
    layer's inputs). Layers after the last planned one are skipped unless the lm_head is
    planned; then `process_head` gets the last layer's outputs (before the final norm).
    """
    if not plan.per_layer and plan.head is None:
        return
    device = next(model.parameters()).device
    chunk = max(1, CHUNK_TOKENS // calibration.shape[1])
    batches = [calibration[i:i + chunk].to(device=device, dtype=torch.long) for i in range(0, len(calibration), chunk)]
    progress(0.0, "capturing the first layer's inputs")
    captured = capture(model, plan.layers, batches, cancelled, method)
    order = captured.order
    skipped = sorted(set(plan.per_layer) - set(order))
    if skipped:
        raise WorkbenchError(
            f"Decoder layer(s) {skipped} never ran during calibration, so {method} cannot quantize them."
        )
    needed = len(order) if plan.head is not None else 1 + max(order.index(i) for i in plan.per_layer)
    units = needed + (1 if plan.head is not None else 0)
    # Handed over, not kept: the first layer's inputs are freed once its outputs replace them (an 8B model's: 128 MiB).
    hidden, captured.hidden = captured.hidden, []
    for position, index in enumerate(order[:needed]):
        check(cancelled)
        progress(position / units, f"layer {position + 1}/{len(order)}")
        step = LayerStep(
            position=position, count=len(order), index=index, layer=plan.layers[index],
            targets=plan.per_layer.get(index, {}), hidden=hidden, calls=captured.calls[index],
            needs_output=position + 1 < needed or plan.head is not None,
        )
        outputs = process_layer(step)
        if step.needs_output:
            hidden = outputs
    if plan.head is not None:
        check(cancelled)
        progress(needed / units, "lm_head")
        process_head(hidden)


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict, bool]):
    args, kwargs, hidden_kw = call
    return layer(*args, hidden_states=hidden, **kwargs) if hidden_kw else layer(hidden, *args, **kwargs)


def layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def run_layer(layer: nn.Module, hidden: list[torch.Tensor], calls, cancelled: Cancelled) -> list[torch.Tensor]:
    """The layer's outputs for each chunk."""
    outputs = []
    for h, call in zip(hidden, calls):
        check(cancelled)
        outputs.append(layer_output(call_layer(layer, h, call)))
    return outputs


def capture(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor], cancelled: Cancelled,
            method: str = "Calibration") -> Captured:
    """Record what the model passes each decoder layer, without running the layers.

    Every layer's forward is swapped for the identity while a forward pre-hook records its
    arguments; the pass stops at the last layer (or, as a backstop, at the lm_head). Layers can
    get different arguments (sliding-window masks, local rotary embeddings), so each is kept.
    """
    captured = Captured(hidden=[], calls={}, order=[])
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
    head = output_embeddings(model)
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
                raise WorkbenchError(
                    f"{type(model).__name__} did not run its decoder layers; {method} cannot run on it."
                )
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


def collect_inputs(
    step: LayerStep,
    new_stats: Callable[[], Stats],
    cancelled: Cancelled,
    *,
    keep_outputs: bool,
    method: str,
) -> tuple[list[InputGroup], list[torch.Tensor] | None]:
    """One forward pass of the layer over all chunks, accumulating statistics per distinct input tensor.

    With `keep_outputs` the layer runs to the end and its outputs come back; otherwise the pass
    of a chunk stops as soon as every planned linear has seen its input (the rest of the layer,
    typically down_proj and the residual, is not needed) and None comes back.
    """
    targets = step.targets
    leader: dict[str, str] = {}
    groups: dict[str, InputGroup] = {}
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
                    group = groups[lead]
                    if name not in group.names:
                        group.names.append(name)
                        group.modules.append(module)
                        group.bits.append(bits)
                    break
            else:
                if leader.setdefault(name, name) != name:
                    raise RuntimeError(f"{name} changed which tensor it shares its input with")
                group = groups.setdefault(
                    name, InputGroup(names=[name], modules=[module], bits=[bits], stats=new_stats())
                )
                seen.append((x, name))
                group.stats.add(x)
            if not keep_outputs and len(reached) == len(targets):
                raise _Stop

        return hook

    handles = [module.register_forward_pre_hook(make_hook(name, module, bits))
               for name, (module, bits) in targets.items()]
    outputs = [] if keep_outputs else None
    try:
        for h, call in zip(step.hidden, step.calls):
            check(cancelled)
            seen.clear()
            reached.clear()
            try:
                output = call_layer(step.layer, h, call)
            except _Stop:
                continue
            if outputs is not None:
                outputs.append(layer_output(output))
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    missing = [name for name in targets if name not in leader]
    if missing:
        raise WorkbenchError(f"{', '.join(missing)} never ran during calibration, so {method} cannot quantize it.")
    return list(groups.values()), outputs
