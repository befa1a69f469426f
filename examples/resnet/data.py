"""Procedural 28×28 greyscale images of ten shape classes ("shapes"): data generated here, so a
model certified on it was not tuned on MNIST.

Each image is one shape drawn at a random centre, size, rotation, stroke and brightness, with
Gaussian pixel noise and a random background level; values in [0, 1]. Classes:

0 disc · 1 ring · 2 filled square · 3 square outline · 4 triangle · 5 plus sign · 6 horizontal bars ·
7 vertical bars · 8 diagonal line · 9 checkerboard patch.

Rotation is small (±15°) so that bars stay horizontal or vertical. Every sample is a pure function
of (seed, index), so the splits are reproducible and disjoint by construction (different seeds).
The ``drift`` option of :func:`write_new` shifts the generator (thicker strokes, a brighter
background), giving new data that differs from the golden task as a retrain's data would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("disc", "ring", "square", "frame", "triangle", "plus", "hbars", "vbars", "diagonal", "checker")
SIZE = 28


def _shape(kind: int, u: np.ndarray, v: np.ndarray, r: float, stroke: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of shape ``kind`` on rotated, centred coordinates (u, v), radius ``r``."""
    soft = lambda d: np.clip(0.5 - d / 1.2, 0.0, 1.0)  # noqa: E731 — anti-aliased edge of a signed distance
    rad = np.hypot(u, v)
    box = np.maximum(np.abs(u), np.abs(v))
    if kind == 0:
        return soft(rad - r)
    if kind == 1:
        return soft(np.abs(rad - r) - stroke)
    if kind == 2:
        return soft(box - r)
    if kind == 3:
        return soft(np.abs(box - r) - stroke)
    if kind == 4:  # triangle: three half-planes
        d = np.maximum.reduce([-v - r * 0.6, 0.866 * u + 0.5 * v - r * 0.45, -0.866 * u + 0.5 * v - r * 0.45])
        return soft(d)
    if kind == 5:
        return soft(np.maximum(np.minimum(np.abs(u), np.abs(v)) - stroke, box - r))
    if kind in (6, 7):
        t = v if kind == 6 else u
        period = max(2.0 * stroke + 2.0, r / 1.5)
        stripes = np.abs(((t / period) % 1.0) - 0.5) * period - period / 4
        return soft(np.maximum(stripes, box - r))
    if kind == 8:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return soft(np.maximum(np.abs(u - sign * v) / 1.414 - stroke, box - r))
    cell = max(2.0, r / 2.0)  # 9: checkerboard patch
    chk = ((np.floor(u / cell) + np.floor(v / cell)) % 2 == 0).astype(np.float64)
    return chk * soft(box - r)


def generate(n: int, seed: int, drift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, 1, 28, 28)`` float32 in [0, 1] and labels ``(n,)`` int64, balanced over the
    ten classes in random order. ``drift`` ∈ [0, 1] thickens strokes and brightens the background."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = np.empty((n, 1, SIZE, SIZE), dtype=np.float32)
    for i, kind in enumerate(y):
        cx, cy = rng.uniform(10, 18, size=2)
        r = rng.uniform(6.0, 10.0)
        angle = np.deg2rad(rng.uniform(-15, 15))
        stroke = rng.uniform(0.8, 1.8) + 1.2 * drift
        u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
        v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
        ink = _shape(int(kind), u, v, r, stroke, rng) * rng.uniform(0.7, 1.0)
        background = rng.uniform(0.0, 0.15) + 0.25 * drift
        img = background + (1 - background) * ink + rng.normal(0, 0.05, size=ink.shape)
        out[i, 0] = np.clip(img, 0.0, 1.0)
    return out, y


def golden(n_train: int = 6000, n_search: int = 1000, n_certification: int = 1000,
           seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The golden task for a configuration's ``data.loader``: three disjoint generated parts
    (``{"train", "search", "certification"}`` → ``(x (n, 1, 28, 28), y)``)."""
    return {part: generate(n, seed * 1000 + k)
            for k, (part, n) in enumerate((("train", n_train), ("search", n_search), ("certification", n_certification)))}


def write_new(path: str | Path, n: int = 3000, seed: int = 7, drift: float = 0.5) -> Path:
    """Write ``n`` drifted images to an ``.npz`` (``x`` (n, 784), ``y``) for ``lidgate retrain --data``."""
    x, y = generate(n, seed, drift)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x.reshape(n, -1), y=y)
    return path
