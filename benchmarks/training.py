"""Plain supervised training for the benchmarks and tests: Adam + cross-entropy, seeded minibatch order.

Not the paper's continual-learning recipe (that one, with its L2 and "unbias" regularisers, is
``benchmarks/cl/training.py``); ``benchmarks/lid.py`` states which set-up its numbers used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = False,
) -> nn.Module:
    """Adam + cross-entropy; ``optimizer`` may be a ``ProjectedOptimizer`` to keep updates safe.

    Args:
        model: the classifier to train in place.
        x: training inputs, batched along dimension 0.
        y: integer labels.
        epochs: passes over ``(x, y)``.
        batch_size: examples per step (the last batch of an epoch may be smaller).
        lr: Adam's learning rate; ignored when ``optimizer`` is given.
        seed: seeds the minibatch order (not the model's initialisation).
        optimizer: used instead of a fresh Adam, e.g. a ``ProjectedOptimizer``.
        progress: show a tqdm bar.

    Returns:
        ``model``, trained and in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training", unit="step", leave=False)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return model.eval()
