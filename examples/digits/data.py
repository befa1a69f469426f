"""scikit-learn's bundled 8x8 digits: small and instant, so demos and tests train real classifiers."""

from __future__ import annotations

import numpy as np


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images): ``x`` float32 (n, 64) in [0, 1], ``y`` int64.

    Small and instant, so tests and demos can train real classifiers without MNIST.

    Returns:
        ``(x, y)``: pixel intensities scaled from 0..16 to [0, 1], and the digit labels.
    """
    from sklearn.datasets import load_digits  # local import: sklearn is heavy and only needed here

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / np.float32(16.0)  # pixel values are 0..16
    y = np.asarray(digits.target, dtype=np.int64)
    return x, y
