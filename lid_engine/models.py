"""Left for flows/ and their tests until they switch over; delete then.

The architectures moved out of the engine: ``examples.mnist.model.cnn`` (the paper's CNN) and
``examples.digits.model.mlp``.
"""

from __future__ import annotations

from torch import nn


def mnist_cnn(n_classes: int = 10) -> nn.Sequential:
    """Conv(1→8,k5,p1)–ReLU–Conv(8→1,k5,p1)–ReLU–Flatten–Linear(576→n): 6,179 parameters at n = 10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, padding=1), nn.ReLU(),
        nn.Conv2d(8, 1, 5, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(576, n_classes),
    )


def mlp(sizes: list[int]) -> nn.Sequential:
    """Fully connected ReLU network with the given layer sizes (input first)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
