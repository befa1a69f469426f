"""The linear bound over traced graphs: sound by sampling for every rule (affine, ReLU, element moves,
sums and pooling, per-op IBP fallback), tighter than IBP where it relaxes the convolutions of a residual
net, and the ops it crossed with IBP recorded in the certificate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lid_engine as le
from examples.resnet.model import resnet
from lid_engine.bounds import ibp, linear, margin_bounds
from lid_engine.bounds.linear_graph import fallback_ops, graph_linear_margins
from lid_engine.errors import CertificateError
from lid_engine.testing import check_soundness
from tests.helpers.models import fitted


class Mixed(nn.Module):
    """Every rule at once: affine (2-D and per-token), ReLU, ± of activations, a parameter and a number
    added directly, slicing, reshape, convolution, mean, transpose, cat — and LayerNorm and a product by
    a number, which have no relaxation here (IBP intervals)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 12)
        self.conv, self.norm = nn.Conv2d(2, 3, 3, padding=1), nn.LayerNorm(12)
        self.tok = nn.Linear(4, 4)
        self.shift = nn.Parameter(torch.randn(12) * 0.1)
        self.head = nn.Linear(12 + 12 + 4, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        g = h - F.relu(self.b(h)) + self.shift
        g = self.norm(g) * 0.5 + g
        img = g[:, :8].reshape(-1, 2, 2, 2)
        c = F.relu(self.conv(img)).transpose(2, 3).flatten(1)
        tokens = F.relu(self.tok(g.view(-1, 3, 4))).mean(dim=1)
        return self.head(torch.cat([g, c, tokens], dim=1)) + 1.0


class BatchMixing(nn.Module):
    """Centres over the batch (row r depends on every example): the walk must not treat it per row."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.head(h - h.mean(0, keepdim=True))


def data(n, shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


BN = ["blocks.0.bn1 (BatchNorm2d)", "blocks.0.bn2 (BatchNorm2d)"]
CASES = {  # model, input shape, classes, (ops the walk crosses with IBP, ops without a rule)
    "mixed": (Mixed, (6,), 4, (["mul (operator.mul)"], ["norm (LayerNorm)", "mul (operator.mul)"])),
    "resnet": (lambda: resnet(4, channels=4, blocks=1, norm=False), (1, 28, 28), 4, ([], [])),
    "resnet-bn": (lambda: resnet(4, channels=4, blocks=1, norm=True), (1, 28, 28), 4, (BN[1:], BN)),
    "batch-mixing": (BatchMixing, (6,), 3, (["mean (.mean())"], [])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_ops_crossed_with_ibp_are_named(name):
    build, shape, classes, expected = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x, y = data(4, shape, classes)
    graph = linear.walk(model, ibp.check_supported(model))
    found: list[str] = []
    graph_linear_margins(model, graph, le.Box.around(model, 0.01), x, y, certify=True, fallbacks=found)
    crossed, without_rule = expected
    assert found == crossed  # the walk stops at the product by 0.5 (the second BatchNorm) and never reaches
    # the LayerNorm (the first BatchNorm) behind it
    assert fallback_ops(graph) == without_rule  # the batch mean has a rule, refused by the walk's row check


@pytest.mark.parametrize("radius", [0.003, 0.03])
@pytest.mark.parametrize("name", list(CASES))
def test_linear_margins_on_graphs_are_sound_by_sampling(name, radius):
    build, shape, classes, _ = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x, y = data(12, shape, classes)
    report = check_soundness(model, le.Box.around(model, radius), x, y=y, method="linear", samples=300)
    assert report.violations == 0 and report.nominal_enclosed, report
    # not vacuous: the linear bound was computed, and at zero width it is the nominal margin up to rounding
    lo, hi, lin = margin_bounds(model, le.Box.point(model), x, y, "linear")
    z = model(x).detach()
    nominal = z.gather(1, y[:, None]) - z
    finite = torch.isfinite(lin)
    assert finite.sum() == len(x) * (classes - 1)
    assert torch.allclose(lin[finite], nominal[finite], atol=1e-4)


def test_on_a_residual_cnn_the_linear_bound_is_tighter_than_ibp():
    torch.manual_seed(0)
    model = resnet(4, channels=4, blocks=1, norm=False).eval()
    x, y = data(64, (1, 28, 28), 4)
    for radius in (0.001, 0.003):  # small radii: the linear bound closes over half of IBP's gap to zero
        lo, hi, lin = margin_bounds(model, le.Box.around(model, radius), x, y, "linear")
        ibp_margin = lo.gather(1, y[:, None]) - hi
        finite = torch.isfinite(lin)
        gain = lin[finite] - ibp_margin[finite]
        assert float(gain.mean()) > 0.5 * float(ibp_margin[finite].abs().mean())  # much tighter on average
        assert float((gain > 0).float().mean()) > 0.9


class SmallResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = h + F.relu(self.b(h))
        return self.head(h + 0.1 * self.norm(h))


def test_a_lid_with_the_linear_bound_on_a_graph_records_its_fallbacks(tmp_path):
    torch.manual_seed(0)
    x, _ = data(700, (6,), 3)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    cx, cy, x, y = x[500:], y[500:], x[:500], y[:500]
    model = fitted(SmallResidual(), x, y, 150)
    tau = le.accuracy(model, x, y) - 0.1
    lid = le.compute_lid(model, x, y, tau, cert_x=cx, cert_y=cy, method="linear", iterations=10, checkpoints=1,
                         finalize_steps=4, progress=False, keep="all")
    cert = lid.certificate(0)
    assert cert.bound_method == "linear" and cert.linear_fallbacks == ["mul (operator.mul)"]
    assert "IBP intervals at mul (operator.mul)" in cert.statement()
    assert lid.width_sum()[0] > 0
    assert le.verify(lid.save(tmp_path / "lid"), model, cx, cy).ok
    # a certificate written before the field existed still loads; the field is refused with IBP bounds
    d = cert.to_dict()
    del d["linear_fallbacks"]
    assert le.Certificate.from_dict(d).linear_fallbacks == []
    with pytest.raises(CertificateError, match="linear_fallbacks"):
        le.Certificate.from_dict({**cert.to_dict(), "bound_method": "ibp"})
