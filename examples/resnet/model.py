"""A small residual CNN: the kind of model teams run, which is not an ``nn.Sequential`` chain.

Its forward pass has residual additions, functional activations and a custom ``forward``; lidgate
traces it with ``torch.fx`` and bounds every operation (``lid_engine.bounds.registry``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ResidualBlock(nn.Module):
    """x + Conv–BN–ReLU–Conv–BN(x), then ReLU (``norm=False``: no BatchNorm, convolutions with bias)."""

    def __init__(self, channels: int, norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        self.bn1 = nn.BatchNorm2d(channels) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        self.bn2 = nn.BatchNorm2d(channels) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResidualCNN(nn.Module):
    """Stem conv (stride 2) → ``blocks`` residual blocks → 2×2 average pooling → linear head.

    On 28×28 inputs with ``channels=8``, ``blocks=2``: 6,378 parameters at 10 classes (6,346 without
    BatchNorm). BatchNorm's 1/σ multiplies interval widths (by ~8 at a running variance of 0.015), so
    over a parameter box the norm-free variant has far tighter bounds
    (``benchmarks/results/architectures.md``).
    """

    def __init__(self, n_classes: int = 10, channels: int = 8, blocks: int = 2, norm: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(channels, norm) for _ in range(blocks)])
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(channels * 7 * 7, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = self.pool(self.blocks(h))
        return self.head(torch.flatten(h, 1))


def resnet(n_classes: int = 10, channels: int = 8, blocks: int = 2, norm: bool = True) -> ResidualCNN:
    """The configuration file's factory (``examples.resnet.model:resnet``)."""
    return ResidualCNN(n_classes, channels, blocks, norm)
