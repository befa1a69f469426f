"""Plain supervised training and evaluation helpers shared by the demo, benchmarks and flows."""

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
    """Adam + cross-entropy; ``optimizer`` may be a ``ProjectedOptimizer`` to keep updates safe."""
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


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    model.eval()
    correct = sum(int((model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum()) for s in range(0, len(x), batch_size))
    return correct / len(x)
