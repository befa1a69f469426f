"""Data of the continual-learning protocol (METHOD.md §5): task splits, the blobs toy, hold-outs.

Dataset-agnostic helpers: continual-learning task splits (Split-MNIST, METHOD.md §5.1), the toy
blobs of METHOD.md §5.0, and disjoint search/certification hold-outs (soundness rule 5: the
population claim uses certification data the search never saw). The MNIST images themselves come
from ``examples.mnist.data``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["blobs", "holdout_split", "split_mnist_tasks", "split_tasks"]


def blobs(
    n: int = 2000, n_classes: int = 6, radius: float = 10.0, std: float = 1.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Toy data of METHOD.md §5.0: isotropic Gaussian blobs with centres evenly spaced on a circle.

    Class k is centred at ``radius * (cos 2πk/K, sin 2πk/K)``; classes are balanced (sizes differ by at
    most one) and the rows are shuffled. Returns ``x`` float32 (n, 2), ``y`` int64. Reproducible per seed.
    """
    if n < 0 or n_classes < 1:
        raise ValueError(f"need n >= 0 and n_classes >= 1, got n={n}, n_classes={n_classes}")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % n_classes
    rng.shuffle(y)
    angles = 2.0 * np.pi * np.arange(n_classes) / n_classes
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    x = centres[y] + std * rng.standard_normal((n, 2))
    return x.astype(np.float32), y


def split_tasks(
    y: np.ndarray, tasks: Sequence[Sequence[int]], *, allow_overlap: bool = False
) -> list[np.ndarray]:
    """Index arrays (int64, ascending) of the examples whose label lies in each task's class set.

    Dataset-agnostic continual-learning split: ``split_tasks(y, [(0, 1), (2, 3)])``. Tasks must
    share no class unless ``allow_overlap`` (overlap is almost always a configuration mistake in
    class-incremental learning); a task that selects no example at all raises, since it would
    silently train and certify on nothing.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    seen: dict[int, int] = {}
    out: list[np.ndarray] = []
    for t, classes in enumerate(tasks):
        classes = [int(c) for c in classes]
        if not classes:
            raise ValueError(f"task {t} has no classes")
        for c in classes:
            if c in seen and seen[c] != t and not allow_overlap:
                raise ValueError(f"class {c} is in task {seen[c]} and task {t}; pass allow_overlap=True")
            seen.setdefault(c, t)
        idx = np.flatnonzero(np.isin(y, classes)).astype(np.int64)
        if idx.size == 0:
            raise ValueError(f"task {t} (classes {classes}) selects no example")
        out.append(idx)
    return out


def split_mnist_tasks(seed: int | None = None) -> list[tuple[int, int]]:
    """The 5 Split-MNIST class pairs.

    ``seed=None`` gives the classic (0,1), (2,3), (4,5), (6,7), (8,9). With a seed, as in the paper
    (METHOD.md §5.1), each task pairs one even with one odd digit, drawn at random and in random
    task order, reproducibly per seed; each pair is (even, odd).
    """
    if seed is None:
        return [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    rng = np.random.default_rng(seed)
    evens = rng.permutation(np.arange(0, 10, 2))
    odds = rng.permutation(np.arange(1, 10, 2))
    return [(int(e), int(o)) for e, o in zip(evens, odds)]


def holdout_split(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Disjoint random index sets of ``range(n)`` with the given fractions (e.g. search/certification).

    The sets never share an index, so certification data stay unseen by the search (soundness rule 5).
    Sizes are ``floor(f * n)``; when the fractions sum to 1 the leftover indices go to the parts with
    the largest remainders, so the sets cover ``range(n)`` exactly. Each set is sorted (int64);
    reproducible per seed.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fr = [float(f) for f in fractions]
    if not fr or any(not math.isfinite(f) or f < 0 for f in fr):
        raise ValueError(f"fractions must be a non-empty list of finite numbers >= 0, got {fractions}")
    total = math.fsum(fr)
    if total > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to {total} > 1")
    exact = [f * n for f in fr]
    sizes = [math.floor(e) for e in exact]
    if abs(total - 1.0) <= 1e-9:
        leftover = n - sum(sizes)
        by_remainder = sorted(range(len(fr)), key=lambda i: exact[i] - sizes[i], reverse=True)
        for i in by_remainder[:leftover]:
            sizes[i] += 1
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(perm[a:b]).astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:])]
