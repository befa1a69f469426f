"""The digits task with a certification set that is never held in memory: a ``DataLoader`` over noisy
copies of the held-out digits, each computed when it is read (``lidgate-streamed.yaml``).

The training and search splits are arrays; the certification split is ``copies`` variants of every
held-out digit, row ``i`` being digit ``i % n`` with Gaussian pixel noise drawn from a generator seeded
by ``i`` (so every reading gives the same rows, as a certification set must). With
``certification.memory_mb`` lidgate reads it batch by batch; nothing here knows that.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from examples.digits.data import load_digits_8x8


class NoisyDigits(Dataset):
    """``copies`` noisy variants of each of the digits ``x`` (float32, values clipped to [0, 1])."""

    def __init__(self, x: np.ndarray, y: np.ndarray, copies: int, noise: float, seed: int) -> None:
        self.x, self.y, self.copies, self.noise, self.seed = x, y, copies, noise, seed

    def __len__(self) -> int:
        return len(self.y) * self.copies

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        base = i % len(self.y)
        rng = np.random.default_rng([self.seed, i])
        pixels = np.clip(self.x[base] + rng.normal(0.0, self.noise, self.x.shape[1]), 0.0, 1.0).astype(np.float32)
        return torch.from_numpy(pixels), int(self.y[base])


def load_streamed(copies: int = 12, noise: float = 0.05, batch_size: int = 256, seed: int = 0) -> dict:
    """``{"train": (x, y), "search": (x, y), "certification": DataLoader}``: half the digits to train on, a
    quarter to search on, and ``copies`` noisy variants of the last quarter (``batch_size`` rows a batch)
    to certify on — disjoint from the search's digits."""
    x, y = load_digits_8x8()
    order = np.random.default_rng(seed).permutation(len(y))
    train, search, held = np.split(order, [len(y) // 2, 3 * len(y) // 4])
    certification = NoisyDigits(x[held], y[held], copies, noise, seed)
    return {"train": (x[train], y[train]), "search": (x[search], y[search]),
            "certification": DataLoader(certification, batch_size=batch_size, shuffle=False)}
