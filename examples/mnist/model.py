"""The paper's MNIST classifier (METHOD.md §5), as a certifiable ``nn.Sequential``."""

from __future__ import annotations

from torch import nn


def cnn(n_classes: int = 10) -> nn.Sequential:
    """Conv(1→8,k5,p1)–ReLU–Conv(8→1,k5,p1)–ReLU–Flatten–Linear(576→n): 6,179 parameters at n = 10.

    Args:
        n_classes: outputs of the linear head.

    Returns:
        The untrained network (PyTorch's default initialisation, drawn from the global RNG).
    """
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=1), nn.ReLU(),
        nn.Conv2d(8, 1, 5, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(576, n_classes),
    )
