"""PyTorch models run for measurement: evaluation mode, no autograd, the caller's mode restored."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module, *, no_grad: bool = True) -> Iterator[None]:
    """`model` in eval mode for the block (without autograd unless `no_grad` is False), then back
    in the training mode it had, whatever happens in the block."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)
