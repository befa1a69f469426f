"""Task data by reference: ``"mnist:2,3"`` names Split-MNIST's digits 2 and 3.

Flow parameters must be JSON, so flows pass references, and every worker loads the same arrays
from the packages the Makefile installs. Each task has three disjoint parts with distinct jobs:
``train`` (the update), ``search`` (shapes the LID) and ``cert`` (held out: certifies it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from components.datasets import load_digits_8x8, load_mnist, split_tasks

DATASETS = {
    "mnist": {"feature_shape": (1, 28, 28), "n_classes": 10, "value_range": (0.0, 1.0)},
    "digits": {"feature_shape": (64,), "n_classes": 10, "value_range": (0.0, 1.0)},
}


@dataclass
class TaskData:
    ref: str
    dataset: str
    classes: tuple[int, ...]
    train: tuple[Tensor, Tensor]
    search: tuple[Tensor, Tensor]
    cert: tuple[Tensor, Tensor]

    @property
    def name(self) -> str:
        return "t" + "".join(str(c) for c in self.classes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return DATASETS[self.dataset]["feature_shape"]


def parse_ref(ref: str) -> tuple[str, tuple[int, ...]]:
    try:
        dataset, classes = ref.split(":")
        parsed = tuple(int(c) for c in classes.split(","))
    except ValueError:
        raise ValueError(f"task reference {ref!r} must look like 'mnist:2,3' (dataset:class,class,...)") from None
    if dataset not in DATASETS:
        raise ValueError(f"task reference {ref!r}: unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    n = DATASETS[dataset]["n_classes"]
    if not parsed or any(not 0 <= c < n for c in parsed) or len(set(parsed)) != len(parsed):
        raise ValueError(f"task reference {ref!r}: classes must be distinct integers in 0..{n - 1}")
    return dataset, parsed


def _select(x: np.ndarray, y: np.ndarray, classes, limit: int | None, seed: int) -> tuple[Tensor, Tensor]:
    idx = split_tasks(y, [classes])[0]
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    return torch.from_numpy(np.ascontiguousarray(x[idx])), torch.from_numpy(np.ascontiguousarray(y[idx]))


def load_task(ref: str, *, max_train: int | None = None, max_eval: int | None = None, seed: int = 0) -> TaskData:
    """Load a task's train / search / cert parts (disjoint splits of the underlying dataset)."""
    dataset, classes = parse_ref(ref)
    if dataset == "mnist":
        parts = {"train": load_mnist("train"), "search": load_mnist("valid"), "cert": load_mnist("test")}
    else:
        x, y = load_digits_8x8()
        perm = np.random.default_rng(1234).permutation(len(x))  # fixed split, independent of `seed`
        a, b = int(0.5 * len(x)), int(0.75 * len(x))
        parts = {"train": (x[perm[:a]], y[perm[:a]]), "search": (x[perm[a:b]], y[perm[a:b]]),
                 "cert": (x[perm[b:]], y[perm[b:]])}
    limits = {"train": max_train, "search": max_eval, "cert": max_eval}
    loaded = {k: _select(*v, classes, limits[k], seed) for k, v in parts.items()}
    return TaskData(ref, dataset, classes, loaded["train"], loaded["search"], loaded["cert"])
