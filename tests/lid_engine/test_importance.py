"""Importance scores and masks for lookahead / retrospective biasing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lid_engine as le
from benchmarks.training import train_classifier
from lid_engine.importance import fisher_importance, importance_mask, si_importance
from tests.helpers.models import mlp


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    model = mlp([4, 8, 3])
    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    return model, x, y


def test_fisher_matches_a_per_example_loop(model_and_data):
    model, x, y = model_and_data
    fisher = fisher_importance(model, x, y, batch_size=10)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.pow(2) / len(x)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-7)


def test_si_is_nonnegative_and_leaves_model_untouched(model_and_data):
    model, x, y = model_and_data
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    si = si_importance(model, x, y, steps=20)
    assert all(bool((s >= 0).all()) for s in si.values())
    assert any(float(s.sum()) > 0 for s in si.values())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.825, 0.95])
def test_masks_freeze_the_right_fraction_and_coordinates(model_and_data, fraction):
    model, x, y = model_and_data
    scores = fisher_importance(model, x, y)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    look = importance_mask(scores, fraction, "lookahead")
    retro = importance_mask(scores, fraction, "retrospective")
    n = flat.numel()
    assert sum(int(m.sum()) for m in look.values()) == round(fraction * n)
    assert sum(int(m.sum()) for m in retro.values()) == round(fraction * n)
    frozen = torch.cat([m.reshape(-1) for m in look.values()])
    if 0 < fraction:
        assert float(flat[frozen].max()) <= float(flat[~frozen].min())  # lookahead freezes the least important
    frozen_r = torch.cat([m.reshape(-1) for m in retro.values()])
    if 0 < fraction:
        assert float(flat[frozen_r].min()) >= float(flat[~frozen_r].max())  # retrospective freezes the most important


def test_mask_feeds_compute_lid(model_and_data):
    model, x, y = model_and_data
    train_classifier(model, x, y, epochs=30, batch_size=16, lr=1e-2)
    mask = importance_mask(si_importance(model, x, y, steps=10), 0.8)
    lid = le.compute_lid(model, x, y, tau=0.3, iterations=10, checkpoints=1, progress=False, mask=mask,
                         keep="all", cert_fraction=0.5)
    for n, m in mask.items():
        assert bool((lid.members[0].width(n)[m] == 0).all())


def test_bad_mask_arguments(model_and_data):
    model, x, y = model_and_data
    scores = fisher_importance(model, x, y)
    with pytest.raises(le.InvalidInputError, match="mode"):
        importance_mask(scores, 0.5, "sideways")
    with pytest.raises(le.InvalidInputError, match="frozen_fraction"):
        importance_mask(scores, 1.0)
