"""Plain (nominal) evaluation metrics: what the model does at its own parameters, with no bound."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (argmax of the logits).

    Puts the model in eval mode, so the number is the one an evaluation would report; the sound
    counterpart over a whole domain is :func:`lid_engine.certified_accuracy`.

    Args:
        model: the classifier; its output is (batch, classes) logits.
        x: inputs, batched along dimension 0.
        y: integer labels, one per input.
        batch_size: examples per forward pass (bounds the memory, not the result).

    Returns:
        The accuracy in [0, 1].
    """
    model.eval()
    correct = sum(int((model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum()) for s in range(0, len(x), batch_size))
    return correct / len(x)
