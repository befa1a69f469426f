"""Plain (nominal) evaluation metrics: what the model does at its own parameters, with no bound."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .stream import CertificationStream, rebatch


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor | CertificationStream, y: Tensor | None = None, batch_size: int = 4096, *,
             balanced: bool = False) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (argmax of the logits).

    Puts the model in eval mode, so the number is the one an evaluation would report; the sound
    counterpart over a whole domain is :func:`lid_engine.certified_accuracy`.

    Args:
        model: the classifier; its output is (batch, classes) logits.
        x: inputs, batched along dimension 0 (moved to the model's device and dtype), or a
            ``CertificationStream`` read a chunk at a time (``y`` None: the stream holds the labels).
        y: integer labels, one per input.
        batch_size: examples per forward pass (bounds the memory, not the result).
        balanced: the mean over the classes present in ``y`` of the per-class accuracy instead.

    Returns:
        The (balanced) accuracy in [0, 1].
    """
    model.eval()
    p = next(model.parameters(), None)
    if isinstance(x, CertificationStream):
        batches = rebatch(x.chunks(), batch_size)
    else:
        batches = ((x[s: s + batch_size], y[s: s + batch_size]) for s in range(0, len(x), batch_size))
    right, labels = [], []
    for xb, yb in batches:
        if p is not None:
            xb = xb.to(p.device, p.dtype)
        right.append((model(xb).argmax(1).cpu() == yb.cpu()))
        labels.append(yb.cpu())
    correct, y = torch.cat(right).double(), torch.cat(labels)
    if not balanced:
        return float(correct.mean())
    classes = torch.unique(y.cpu())
    return float(sum(correct[y.cpu() == c].mean() for c in classes) / len(classes))
