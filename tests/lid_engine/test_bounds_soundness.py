"""Soundness of the IBP bound engine by sampling (DESIGN.md soundness rule 2).

For every layer type and for random deep compositions: 10^4 parameter vectors per case (half random
vertices, half uniform inside the box), plain forward passes, every output inside [lo, hi]; certified
accuracy ≤ every sampled accuracy. In certification mode there is no tolerance at all.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lid_engine as le
from lid_engine.spec import certified_mask
from tests.helpers.bounds import assert_enclosed, inputs, make_box, seeded_bn
from tests.helpers.sampling import sample_parameters, sampled_outputs

N_SAMPLES = 10_000


def model_zoo(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Small models covering every supported layer, with their input shape."""
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # str hash() differs per process
    if name == "linear":
        return nn.Sequential(nn.Linear(6, 4)), (6,)
    if name == "mlp":
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), (6,)
    if name == "conv":
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(18, 4),
        ), (1, 8, 8)
    if name == "bn_pool":
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), seeded_bn(nn.BatchNorm2d(4), 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 3, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 5),
        ).eval(), (2, 8, 8)
    if name == "bn1d_nested":
        return nn.Sequential(
            nn.Linear(5, 8), seeded_bn(nn.BatchNorm1d(8), 2),
            nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Sequential(nn.Linear(8, 8))),
            nn.Identity(), nn.ReLU(), nn.Linear(8, 4),
        ).eval(), (5,)
    if name == "taskmask":
        return nn.Sequential(
            nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 6), le.TaskMask(6, [[0, 1], [2, 3], [4, 5]]).set_task(1)
        ), (4,)
    raise KeyError(name)


ZOO = ["linear", "mlp", "conv", "bn_pool", "bn1d_nested", "taskmask"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("box_kind", ["absolute", "relative", "asymmetric"])
@pytest.mark.parametrize("name", ZOO)
def test_certify_mode_encloses_every_sampled_forward(name: str, box_kind: str, dtype: torch.dtype) -> None:
    model, shape = model_zoo(name)
    model = model.to(dtype)
    box = make_box(model, box_kind, seed=3).to(dtype=dtype)
    x = inputs(shape, dtype, seed=4)
    lo, hi = le.bound_logits(model, box, x)
    assert lo.dtype == dtype and lo.shape == hi.shape == model(x).shape
    params = sample_parameters(box, N_SAMPLES, seed=5)
    outs = sampled_outputs(model, params, x)
    assert_enclosed(outs, lo, hi)

    # certified accuracy is a lower bound on the accuracy of every sampled parameter vector
    y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % lo.shape[1]
    cert = le.certified_accuracy(model, box, x, y, dtype=dtype)
    sampled_acc = (outs.argmax(-1) == y).to(dtype).mean(-1)
    assert cert <= float(sampled_acc.min())
    # the per-example mask is sound too: certified examples are correct for every sample
    mask = certified_mask(lo, hi, y)
    assert bool((outs.argmax(-1)[:, mask] == y[mask]).all())


@pytest.mark.parametrize("name", ZOO)
def test_search_mode_encloses_sampled_forward_up_to_rounding(name: str) -> None:
    model, shape = model_zoo(name)
    box = make_box(model, "asymmetric", seed=7)
    x = inputs(shape, torch.float32, seed=8)
    lo, hi = le.bound_logits(model, box, x, mode="search")
    outs = sampled_outputs(model, sample_parameters(box, N_SAMPLES, seed=9), x)
    assert_enclosed(outs, lo, hi, tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ZOO)
def test_zero_width_box_reproduces_forward_pass(name: str, dtype: torch.dtype) -> None:
    model, shape = model_zoo(name)
    model = model.to(dtype)
    box = le.Box.point(model)
    x = inputs(shape, dtype, seed=10)
    with torch.no_grad():
        y = model(x)
    lo, hi = le.bound_logits(model, box, x, mode="search")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(lo, y, atol=tol, rtol=tol)
    torch.testing.assert_close(hi, y, atol=tol, rtol=tol)
    clo, chi = le.bound_logits(model, box, x)
    assert bool((clo <= y).all() and (y <= chi).all())
    # the rounding widening stays tiny: far below any useful box width
    assert float((chi - clo).max()) < (1e-3 if dtype == torch.float32 else 1e-11)


@pytest.mark.parametrize("mode", ["certify", "search"])
@pytest.mark.parametrize("name", ZOO)
def test_bounds_shrink_with_the_domain(name: str, mode: str) -> None:
    model, shape = model_zoo(name)
    outer = make_box(model, "asymmetric", seed=11)
    # a random box inside the outer one
    g = torch.Generator().manual_seed(12)
    lower, upper = {}, {}
    for n in outer.names:
        a = torch.rand(outer.lower[n].shape, generator=g) * 0.5
        b = torch.rand(outer.lower[n].shape, generator=g) * 0.5
        w = outer.width(n)
        lower[n] = outer.lower[n] + a * w
        upper[n] = outer.upper[n] - b * w
    inner = le.Box(lower, upper)
    assert inner.is_subset(outer)
    x = inputs(shape, torch.float32, seed=13)
    olo, ohi = le.bound_logits(model, outer, x, mode=mode)
    ilo, ihi = le.bound_logits(model, inner, x, mode=mode)
    tol = 1e-6 * (1 + olo.abs())
    assert bool((ilo >= olo - tol).all() and (ihi <= ohi + tol).all())
    assert float((ihi - ilo).sum()) < float((ohi - olo).sum())


# ----------------------------------------------------------------------------- random compositions
@st.composite
def random_mlp(draw):
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(2, 12)) for _ in range(depth + 1)]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
        if i < depth - 1:
            extra = draw(st.sampled_from(["relu", "relu+bn", "relu+dropout", "none"]))
            if extra == "relu+bn":
                layers += [seeded_bn(nn.BatchNorm1d(widths[i + 1]), i), nn.ReLU()]
            elif extra == "relu+dropout":
                layers += [nn.ReLU(), nn.Dropout(0.5)]
            elif extra == "relu":
                layers.append(nn.ReLU())
    if draw(st.booleans()):
        layers = [nn.Sequential(*layers[: len(layers) // 2]), nn.Sequential(*layers[len(layers) // 2 :])]
    radius = draw(st.sampled_from([0.0, 1e-3, 0.02, 0.2]))
    relative = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return nn.Sequential(*layers).eval(), widths[0], radius, relative, seed


@st.composite
def random_cnn(draw):
    c1 = draw(st.integers(1, 3))
    c2 = draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 2]))
    pad = draw(st.sampled_from([0, 1]))
    pool = draw(st.sampled_from(["none", "max", "avg"]))
    layers: list[nn.Module] = [nn.Conv2d(c1, c2, k, stride=stride, padding=pad), nn.ReLU()]
    if draw(st.booleans()):
        layers.insert(1, seeded_bn(nn.BatchNorm2d(c2), 3))
    if pool == "max":
        layers.append(nn.MaxPool2d(2))
    elif pool == "avg":
        layers.append(nn.AvgPool2d(2))
    layers += [nn.Conv2d(c2, 2, 1), nn.Flatten()]
    size = 8
    size = (size + 2 * pad - k) // stride + 1
    if pool != "none":
        size //= 2
    layers.append(nn.Linear(2 * size * size, 3))
    radius = draw(st.sampled_from([1e-3, 0.05]))
    return nn.Sequential(*layers).eval(), c1, radius, draw(st.integers(0, 10_000))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_mlp())
def test_random_mlp_compositions_are_sound(case) -> None:
    model, d_in, radius, relative, seed = case
    box = le.Box.around(model, radius, relative=relative)
    x = torch.randn(8, d_in, generator=torch.Generator().manual_seed(seed))
    lo, hi = le.bound_logits(model, box, x)
    assert_enclosed(sampled_outputs(model, sample_parameters(box, N_SAMPLES, seed), x), lo, hi)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_cnn())
def test_random_cnn_compositions_are_sound(case) -> None:
    model, c_in, radius, seed = case
    box = le.Box.around(model, radius)
    x = torch.randn(6, c_in, 8, 8, generator=torch.Generator().manual_seed(seed))
    lo, hi = le.bound_logits(model, box, x)
    assert_enclosed(sampled_outputs(model, sample_parameters(box, N_SAMPLES, seed), x), lo, hi)


def test_search_mode_is_differentiable_in_the_box() -> None:
    model, shape = model_zoo("bn_pool")
    base = le.Box.around(model, 0.01)
    lower = {n: t.clone().requires_grad_(True) for n, t in base.lower.items()}
    upper = {n: t.clone().requires_grad_(True) for n, t in base.upper.items()}
    box = le.Box(lower, upper)
    lo, hi = le.bound_logits(model, box, inputs(shape, torch.float32, 1), mode="search")
    (hi - lo).sum().backward()
    grads = [t.grad for t in list(lower.values()) + list(upper.values())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # widening the box can only widen the output: d(width)/d(upper) ≥ 0, d(width)/d(lower) ≤ 0
    assert all(bool((upper[n].grad >= -1e-6).all()) and bool((lower[n].grad <= 1e-6).all()) for n in lower)


def test_batch_chunking_matches_single_pass() -> None:
    model, shape = model_zoo("conv")
    box = le.Box.around(model, 0.02)
    x = inputs(shape, torch.float32, 2, n=37)
    lo1, hi1 = le.bound_logits(model, box, x)
    lo2, hi2 = le.bound_logits(model, box, x, batch_size=5)
    torch.testing.assert_close(lo1, lo2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hi1, hi2, rtol=1e-6, atol=1e-6)


def test_task_mask_restricts_the_competition() -> None:
    model, shape = model_zoo("taskmask")
    box = le.Box.around(model, 0.01)
    x = inputs(shape, torch.float32, 3)
    lo, hi = le.bound_logits(model, box, x)
    assert bool((lo[:, [0, 1, 4, 5]] == -1e4).all() and (hi[:, [0, 1, 4, 5]] == -1e4).all())
    y = model(x).argmax(1)
    assert set(y.tolist()) <= {2, 3}


@pytest.mark.parametrize("radius", [0.0, 1e-3])
def test_certify_mode_encloses_float64_forward_on_large_real_batches(radius: float) -> None:
    """Regression: torch's fallback float32 conv kernel (oneDNN off) is outside the γ_n model.

    On large batches it returned pure-bias outputs ~25 ulps off; certification must not depend on
    it. The float64 forward of the nominal model stands in for real arithmetic (its own error is
    ~1e-16, far below the float32 slack), at the nominal point and at box vertices.
    """
    from examples.mnist.data import load_mnist
    from examples.mnist.model import cnn

    torch.manual_seed(0)
    model = cnn()
    with torch.no_grad():
        model[0].bias.fill_(0.0313219)  # outputs over blank borders are pure bias: lo == hi exactly
    x = torch.from_numpy(load_mnist("test", copy=False)[0][:2048].copy())  # the packaged array is read-only
    box = le.Box.around(model, radius)
    lo, hi = le.bound_logits(model, box, x, dtype=torch.float32)
    for params in [dict(model.named_parameters()), box.vertex(torch.Generator().manual_seed(1))]:
        m64 = cnn().double()
        le.load_parameters_(m64, {n: p.detach().double() for n, p in params.items()})
        with torch.no_grad():
            exact = m64(x.double())
        assert bool((lo.double() <= exact).all() and (exact <= hi.double()).all())


@pytest.mark.parametrize("shape,out_channels", [((2048, 16, 26, 26), 3), ((2048, 1, 28, 28), 24)])
def test_certification_kernels_obey_the_dot_product_error_model(shape, out_channels) -> None:
    """The γ_n bound is only as good as the kernels: measure them on the stacked CNN shapes.

    Regression: with oneDNN off, torch's CPU conv fell back to NNPACK, measured at 1.9e-4·Σ|x||w| —
    4× beyond the allowance — which made a certified MNIST LID fail its own lo ≤ hi check.
    """
    import torch.nn.functional as F

    from lid_engine import numerics as rounding

    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g)
    x[..., :10] = 0  # blank borders, as in MNIST: pure-bias outputs
    w = torch.randn(out_channels, shape[1], 5, 5, generator=g) * 0.2
    b = torch.randn(out_channels, generator=g) * 0.1
    n_terms = shape[1] * 25 + 1
    xf = x.flatten(1)[:, :576]
    wl = torch.randn(20, 576, generator=g) * 0.05
    with rounding.certification_backend():
        y = F.conv2d(x, w, b, padding=1)
        z = F.linear(xf, wl, b[:1].expand(20).contiguous())

    def excess(out, op, inp, weight, bias, n):
        exact = op(inp.double(), weight.double(), bias.double())
        mag = op(inp.double().abs(), weight.double().abs(), bias.double().abs())
        return float(((out.double() - exact).abs() - rounding.gamma(n, torch.float32) * mag).max())

    assert excess(y, lambda a, c, d: F.conv2d(a, c, d, padding=1), x, w, b, n_terms) <= 0
    assert excess(z, F.linear, xf, wl, b[:1].expand(20), 577) <= 0
