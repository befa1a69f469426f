"""Plain (nominal) evaluation metrics: what the model does at its own parameters, with no bound."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096, *, balanced: bool = False) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (argmax of the logits).

    Puts the model in eval mode, so the number is the one an evaluation would report; the sound
    counterpart over a whole domain is :func:`lid_engine.certified_accuracy`.

    Args:
        model: the classifier; its output is (batch, classes) logits.
        x: inputs, batched along dimension 0 (moved to the model's device and dtype).
        y: integer labels, one per input.
        batch_size: examples per forward pass (bounds the memory, not the result).
        balanced: the mean over the classes present in ``y`` of the per-class accuracy instead.

    Returns:
        The (balanced) accuracy in [0, 1].
    """
    model.eval()
    p = next(model.parameters(), None)
    right = []
    for s in range(0, len(x), batch_size):
        xb = x[s: s + batch_size]
        if p is not None:
            xb = xb.to(p.device, p.dtype)
        right.append((model(xb).argmax(1).cpu() == y[s: s + batch_size].cpu()))
    correct = torch.cat(right).double()
    if not balanced:
        return float(correct.mean())
    classes = torch.unique(y.cpu())
    return float(sum(correct[y.cpu() == c].mean() for c in classes) / len(classes))
