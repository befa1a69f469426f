"""Model factories for the tests, also by import path (``ModelSpec("tests.helpers.models:mlp", ...)``).

A stable import path for the registry and gate tests; the architecture itself is the digits
example's (one implementation of the MLP in the repository).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.digits.model import mlp

__all__ = ["fitted", "mlp"]


def fitted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """``model`` trained full-batch with Adam (lr 0.01) for ``steps`` steps, in eval mode."""
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()
