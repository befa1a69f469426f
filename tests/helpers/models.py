"""Model factories for the tests, also by import path (``ModelSpec("tests.helpers.models:mlp", ...)``).

The tests' own models, so that registry, gate and engine tests do not depend on the example user
code under ``examples/`` (which configuration files and demos may change).
"""

from __future__ import annotations

from torch import nn


def mlp(sizes: list[int]) -> nn.Sequential:
    """Fully connected ReLU network with the given layer sizes (input first).

    Args:
        sizes: widths from the input to the output, e.g. ``[2, 16, 4]``.

    Returns:
        ``Linear``–``ReLU``– … –``Linear`` (no activation after the last layer).
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
