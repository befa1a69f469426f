"""Model factories for the CLI tests (``--model tests.helpers.cli_models:mlp``)."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def broken() -> nn.Module:
    raise RuntimeError("the factory failed")


def not_a_model():
    return 42


def bn_mlp() -> nn.Module:
    """A BatchNorm model: the linear bound crosses the BatchNorm with its IBP interval (and records it)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()
