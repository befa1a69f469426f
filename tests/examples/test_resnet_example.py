"""The residual-CNN example: its generated data and its model, as the configuration uses them."""

from __future__ import annotations

import numpy as np
import torch

import lid_engine as le
from components.config import load_config
from examples.resnet.data import CLASSES, generate, golden, write_new
from examples.resnet.model import resnet
from lid_engine.bounds import ibp
from lid_engine.model_graph import ModelGraph
from tests.helpers.paths import REPO


def test_generated_shapes_are_reproducible_balanced_and_in_range():
    x, y = generate(200, seed=3)
    x2, y2 = generate(200, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert x.shape == (200, 1, 28, 28) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert np.bincount(y, minlength=len(CLASSES)).tolist() == [20] * 10
    parts = golden(n_train=100, n_search=50, n_certification=50)
    assert not np.array_equal(parts["search"][0], parts["certification"][0])
    drifted, _ = generate(200, seed=3, drift=1.0)
    assert drifted.mean() > x.mean() + 0.1  # brighter background, thicker strokes


def test_write_new_gives_flat_rows_the_configuration_reshapes(tmp_path):
    path = write_new(tmp_path / "new.npz", n=40)
    with np.load(path) as f:
        assert f["x"].shape == (40, 784) and f["y"].shape == (40,)
    cfg = load_config(REPO / "examples" / "resnet" / "lidgate.yaml")
    assert tuple(cfg.data.shape) == (1, 28, 28)


def test_the_residual_cnn_is_traced_and_its_bounds_are_sound():
    torch.manual_seed(0)
    model = resnet(10, channels=4, blocks=1).eval()
    assert isinstance(ibp.check_supported(model), ModelGraph)
    x = torch.from_numpy(generate(8, seed=1)[0])
    report = le.testing.check_soundness(model, le.Box.around(model, 0.005), x, samples=100)
    assert report.violations == 0 and report.nominal_enclosed, report
