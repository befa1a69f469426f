"""Partial domains and LoRA adapters: width only where the user says, sound by sampling, trainable
inside the LID, verifiable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lid_engine as le
from lid_engine.errors import InvalidInputError
from lid_engine.testing import check_soundness
from tests.helpers.models import fitted


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def masked_box(model, mask, radius):
    """θ ± radius on the coordinates the mask leaves free, zero width elsewhere."""
    lo, hi = {}, {}
    for n, p in model.named_parameters():
        r = radius * (~mask[n]).to(p.dtype)
        lo[n], hi[n] = p.detach() - r, p.detach() + r
    return le.Box(lo, hi)


def test_add_lora_keeps_the_outputs_and_names_bad_targets():
    model = mlp()
    x, _ = data(50)
    before = model(x)
    le.add_lora(model, ["0", "2"], rank=2)
    assert isinstance(model[0], le.LoRALinear) and isinstance(model[2], le.LoRALinear)
    assert torch.allclose(model(x), before)
    with pytest.raises(InvalidInputError, match="'1' is GELU"):
        le.add_lora(mlp(), ["1"])
    with pytest.raises(InvalidInputError, match="rank"):
        le.add_lora(mlp(), ["0"], rank=0)
    with pytest.raises(InvalidInputError, match="name no parameter"):
        le.width_mask(mlp(), ["head"])
    with pytest.raises(InvalidInputError, match="add_lora first"):
        le.lora_mask(mlp())


@pytest.mark.parametrize("radius", [0.01, 0.2])
def test_a_domain_over_lora_factors_is_sound_by_sampling(radius):
    model = le.add_lora(mlp(), ["0", "2", "4"], rank=3)
    with torch.no_grad():  # non-zero B, as after some adapter training
        for m in model.modules():
            if isinstance(m, le.LoRALinear):
                m.lora_B.normal_(0, 0.1)
    mask = le.lora_mask(model)
    assert {n for n, m in mask.items() if not bool(m.all())} == {f"{i}.lora_{f}" for i in (0, 2, 4) for f in "AB"}
    box = masked_box(model, mask, radius)
    report = check_soundness(model, box, data(32)[0], samples=2000)
    assert report.violations == 0 and report.nominal_enclosed, report


def test_width_mask_covers_modules_and_single_parameters():
    model = mlp()
    mask = le.width_mask(model, ["2", "4.bias"])
    assert not bool(mask["2.weight"].any()) and not bool(mask["2.bias"].any()) and not bool(mask["4.bias"].any())
    assert bool(mask["0.weight"].all()) and bool(mask["4.weight"].all())


def test_lid_over_adapters_trains_only_adapters_and_verifies(tmp_path):
    x, y = data(900)
    model = fitted(mlp(), x[:600], y[:600], steps=200)
    le.add_lora(model, ["2", "4"], rank=2)
    tau = le.accuracy(model, x[600:750], y[600:750]) - 0.08
    lid = le.compute_lid(model, x[600:750], y[600:750], tau=tau, cert_x=x[750:], cert_y=y[750:],
                         mask=le.lora_mask(model), iterations=60, checkpoints=3, progress=False)
    member = lid.members[0]
    widths = {n: float((member.upper[n] - member.lower[n]).max()) for n in member.names}
    assert all(w == 0 for n, w in widths.items() if "lora_" not in n)
    assert sum(w for n, w in widths.items() if "lora_" in n) > 0
    cert = lid.certificate(0)
    assert cert.certified_accuracy >= tau
    tuned = copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if "lora_" not in n}
    opt = le.ProjectedOptimizer(torch.optim.Adam(tuned.parameters(), 1e-2), tuned, lid)
    xs, ys = data(300, seed=5)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(tuned(xs), (ys + 1) % 3).backward()
        opt.step()
    assert lid.member_index(tuned) is not None
    assert all(torch.equal(p, frozen[n]) for n, p in tuned.named_parameters() if "lora_" not in n)
    assert le.accuracy(tuned, x[750:], y[750:]) >= lid.certificate(lid.member_index(tuned)).certified_accuracy
    lid.save(tmp_path / "lid")
    assert le.verify(tmp_path / "lid", tuned, x[750:], y[750:], allow_update=True).ok
