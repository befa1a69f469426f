"""A fully connected ReLU classifier, as a certifiable ``nn.Sequential``."""

from __future__ import annotations

from torch import nn


def mlp(sizes: list[int]) -> nn.Sequential:
    """Fully connected ReLU network with the given layer sizes (input first).

    Args:
        sizes: widths from the input to the output, e.g. ``[64, 32, 10]`` for the 8x8 digits.

    Returns:
        ``Linear``–``ReLU``– … –``Linear`` (no activation after the last layer).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
