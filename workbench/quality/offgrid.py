"""The off-grid reference: the same model in a randomly rotated residual basis.

The demo model's fp32 weights came from a Q4_1 GGUF and lie exactly on a 4-bit grid, so
quantizing them again looks lossless and says nothing about quality. Rotating the residual
stream by a random orthogonal Q (as QuaRot and SliceGPT do) keeps the function and moves every
weight of the linear layers and embeddings off that grid.

With the residual h a row vector and PyTorch's (out, in) weights, the model computes on h Q:
RMSNorm gains are folded into the layers that read the norm's output (an RMSNorm without a
gain commutes with Q), readers become W diag(g) Q, writers (embeddings as rows, o_proj,
down_proj) become Q^T W and their biases Q^T b. Readers' biases live on their output side and
stay as they are.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
import uuid
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress, sub_progress

log = logging.getLogger(__name__)

# A rotation that lost accuracy somewhere is far above this; float32 rounding on the demo
# model stays near 1e-4.
MAX_LOGIT_DIFFERENCE = 1e-3

# Everything of the source folder that describes tokenization and generation, copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Ordinary English, so the verification runs on activations like the ones that matter.
VERIFICATION_TEXT = (
    "The committee met on a cold Tuesday morning to decide whether the old bridge could be "
    "repaired, or whether the town should borrow money to build a new one before winter."
)


def random_orthogonal(size: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    # Without the sign fix QR's output is not uniformly distributed over the orthogonal group.
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotate_residual_stream(
    model: nn.Module,
    seed: int = 0,
    *,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> nn.Module:
    """A deep copy of a Llama-family causal LM computing the same logits in a rotated basis.

    The copy is float32, its norm gains are 1 and its embeddings are untied from lm_head.
    Raises WorkbenchError for a model whose layout or norms this rotation does not fit.
    """
    layers = _check_rotatable(model)
    rotated = copy.deepcopy(model).float()
    decoder = rotated.model
    q = random_orthogonal(rotated.config.hidden_size, seed)

    with torch.no_grad():
        # A tied lm_head is the embedding's own Parameter: it gets its own before either changes.
        rotated.lm_head.weight = nn.Parameter(rotated.lm_head.weight.detach().clone())
        _write(decoder.embed_tokens, decoder.embed_tokens.weight.double() @ q)
        for index, layer in enumerate(decoder.layers):
            check(cancelled)
            attention, mlp = layer.self_attn, layer.mlp
            _fold_and_rotate_readers(layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj), q)
            _rotate_writer(attention.o_proj, q)
            _fold_and_rotate_readers(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), q)
            _rotate_writer(mlp.down_proj, q)
            progress((index + 1) / layers, f"rotated layer {index + 1} of {layers}")
        _fold_and_rotate_readers(decoder.norm, (rotated.lm_head,), q)

    rotated.config.tie_word_embeddings = False
    return rotated


def build_offgrid_reference(
    source_dir: Path,
    dest_dir: Path,
    seed: int = 0,
    *,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
) -> Path:
    """Write the off-grid reference of the HF folder `source_dir` to `dest_dir` and verify it.

    The folder is written under a temporary name beside `dest_dir` and renamed only once the
    saved model, loaded back, gives the source's logits within MAX_LOGIT_DIFFERENCE.
    """
    source_dir, dest_dir = Path(source_dir), Path(dest_dir)
    if dest_dir.exists():
        raise WorkbenchError(f"{dest_dir} already exists: remove it or choose another folder.")
    if not (source_dir / "config.json").is_file():
        raise WorkbenchError(f"{source_dir} is not a Hugging Face model folder (no config.json).")

    began = time.perf_counter()
    progress(0.0, "loading the source model")
    original = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    check(cancelled)
    rotated = rotate_residual_stream(original, seed, progress=sub_progress(progress, 0.2, 0.6), cancelled=cancelled)

    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its private mode would stay on the finished folder.
    staging = dest_dir.with_name(f".{dest_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        progress(0.6, "saving")
        rotated.save_pretrained(staging, safe_serialization=True)
        del rotated  # what gets verified is the saved copy; this one only costs memory now
        for name in TOKENIZER_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, staging / name)
        check(cancelled)

        progress(0.8, "verifying the saved model against the source")
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
        ids = tokenizer(VERIFICATION_TEXT, return_tensors="pt").input_ids
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        difference = max_logit_difference(original, reloaded, ids)
        log.info("off-grid reference: max |logit difference| %.2e over %d tokens", difference, ids.shape[1])
        if not difference <= MAX_LOGIT_DIFFERENCE:
            raise WorkbenchError(
                f"The rotated model's logits differ from the source's by up to {difference:.2e} "
                f"(more than {MAX_LOGIT_DIFFERENCE:.0e}); this model cannot be rotated faithfully."
            )
        staging.rename(dest_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("off-grid reference written to %s in %.1f s", dest_dir, time.perf_counter() - began)
    progress(1.0, "done")
    return dest_dir


def max_logit_difference(first: nn.Module, second: nn.Module, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        a = first(input_ids=input_ids).logits
        b = second(input_ids=input_ids).logits
    return (a - b).abs().max().item()


def _write(module: nn.Module, weight: torch.Tensor) -> None:
    module.weight.copy_(weight.to(torch.float32))


def _fold_and_rotate_readers(norm: nn.Module, readers: tuple[nn.Linear, ...], q: torch.Tensor) -> None:
    gain = norm.weight.double()
    for reader in readers:
        _write(reader, (reader.weight.double() * gain) @ q)
    norm.weight.fill_(1.0)


def _rotate_writer(writer: nn.Linear, q: torch.Tensor) -> None:
    _write(writer, q.T @ writer.weight.double())
    if writer.bias is not None:
        writer.bias.copy_((q.T @ writer.bias.double()).to(torch.float32))


def _check_rotatable(model: nn.Module) -> int:
    """The number of decoder layers; WorkbenchError when the model is not of the Llama layout."""
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not (
        layers
        and isinstance(getattr(decoder, "embed_tokens", None), nn.Embedding)
        and isinstance(getattr(model, "lm_head", None), nn.Linear)
        and hasattr(decoder, "norm")
    ):
        raise WorkbenchError(
            f"Cannot build an off-grid reference of a {kind} model: only Llama-family causal LMs "
            "(embed_tokens, decoder layers, final norm, lm_head) can be rotated."
        )
    for layer in layers:
        children = dict(layer.named_children())
        expected = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
        if not expected <= children.keys() or any("norm" in name for name in children.keys() - expected):
            raise WorkbenchError(
                f"Cannot build an off-grid reference of a {kind} model: its decoder layers are not "
                "laid out like Llama's (one norm before attention, one before the MLP, nothing else)."
            )
        attention, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(linear, nn.Linear) for linear in linears):
            raise WorkbenchError(
                f"Cannot build an off-grid reference of a {kind} model: attention and MLP must be "
                "plain q/k/v/o and gate/up/down linear layers (no fused or mixture-of-experts layers)."
            )
        _check_rms_norm(layer.input_layernorm, kind)
        _check_rms_norm(layer.post_attention_layernorm, kind)
    _check_rms_norm(decoder.norm, kind)
    return len(layers)


def _check_rms_norm(norm: nn.Module, kind: str) -> None:
    """Only `gain * x / rms(x)` can be folded; mean subtraction, a bias or `1 + gain` cannot."""
    weight = getattr(norm, "weight", None)
    if getattr(norm, "bias", None) is not None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise WorkbenchError(
            f"Cannot build an off-grid reference of a {kind} model: its {type(norm).__name__} is "
            "not an RMSNorm with a per-channel gain (a LayerNorm's mean and bias do not commute "
            "with a rotation)."
        )
    probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    with torch.no_grad():
        actual = norm(probe)
    rms = probe.pow(2).mean(-1, keepdim=True).sqrt()
    expected = weight * probe / rms
    if not torch.allclose(actual, expected, rtol=1e-2, atol=1e-3):
        raise WorkbenchError(
            f"Cannot build an off-grid reference of a {kind} model: its {type(norm).__name__} does "
            "not compute gain * x / rms(x) as Llama's RMSNorm does, so its gains cannot be folded."
        )
