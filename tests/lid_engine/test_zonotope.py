"""Zonotope domains: sound bounds by sampling, exactness along a segment, projection, persistence.

DESIGN.md soundness rule 2 for the zonotope: parameter vectors drawn inside the zonotope and at
its vertices (coefficients at the ends of their ranges, residual offsets at ±r), written in the
model's dtype as a projection writes them, plain forward passes, every margin at or above the
linear bound and every logit inside IBP's bounds, no tolerance. Then what a user relies on: a
segment of the last layer is certified exactly (an example is certified iff it is right at both
ends), where the box over the same move certifies next to nothing; the projection is the
Euclidean one and lands inside; bad input is refused by name.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

import lid_engine as le
from lid_engine.errors import DomainMismatchError, InvalidDomainError, LidError
from tests.helpers.bounds import LINEAR_ZOO, assert_below, assert_enclosed, inputs, labels, linear_zoo, sampled_margins
from tests.helpers.sampling import sampled_outputs

N_SAMPLES = 4_000


def random_zonotope(model: nn.Module, *, k: int, scale: float, residual: float, seed: int) -> le.Zonotope:
    """K generators on every parameter, coefficient ranges around 0, a random residual box."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    gens = {n: scale * torch.randn((k, *p.shape), generator=g, dtype=torch.float64) for n, p in params.items()}
    res = {n: residual * torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    lo = -torch.rand(k, generator=g, dtype=torch.float64)
    hi = torch.rand(k, generator=g, dtype=torch.float64) * 2
    return le.Zonotope({n: p.detach() for n, p in params.items()}, gens, lo, hi, res)


def zonotope_samples(z: le.Zonotope, n: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stacked points of ``z``: half vertices, half uniform, cast to the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    points = [z.vertex(g) if i % 2 else z.sample(g) for i in range(n)]
    return {name: torch.stack([p[name] for p in points]).to(dtype) for name in z.names}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", LINEAR_ZOO)
def test_bounds_over_a_zonotope_hold_for_every_sampled_forward(name, dtype) -> None:
    model, shape = linear_zoo(name)
    model = model.to(dtype)
    z = random_zonotope(model, k=2, scale=0.004, residual=0.002, seed=1)
    x = inputs(shape, dtype, seed=4)
    y = labels(model, x)
    outs = sampled_outputs(model, zonotope_samples(z, N_SAMPLES, seed=5, dtype=dtype), x)
    lo, hi = le.bound_logits(model, z, x, dtype=dtype)
    assert_enclosed(outs, lo, hi)
    bound = le.bound_margins(model, z, x, y, "linear", dtype=dtype)
    assert_below(bound, sampled_margins(outs, y))
    mask = le.certified_examples(model, z, x, y, method="linear", dtype=dtype)
    assert bool((outs.argmax(-1)[:, mask] == y[mask]).all())
    assert int(mask.sum()) > 0  # the case is not vacuous: something is certified


@st.composite
def zonotope_case(draw):
    widths = draw(st.lists(st.integers(2, 7), min_size=1, max_size=3))
    torch.manual_seed(draw(st.integers(0, 10_000)))
    layers: list[nn.Module] = []
    for a, b in zip([3, *widths], widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], draw(st.integers(2, 4))))
    z = random_zonotope(model, k=draw(st.integers(1, 4)), scale=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
                        residual=draw(st.sampled_from([0.0, 1e-3, 1e-2])), seed=draw(st.integers(0, 10_000)))
    return model, z


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(zonotope_case())
def test_random_zonotopes_on_random_mlps_are_sound(case) -> None:
    model, z = case
    x = inputs((3,), torch.float32, seed=7, n=16)
    y = labels(model, x)
    outs = sampled_outputs(model, zonotope_samples(z, 1_000, seed=8, dtype=torch.float32), x)
    assert_below(le.bound_margins(model, z, x, y, "linear"), sampled_margins(outs, y))


def moved_head(model: nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """The last Linear layer's parameters moved by a random step: a target for a segment."""
    g = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()][-2:]
    params = dict(model.named_parameters())
    return {n: params[n].detach() + scale * torch.randn(params[n].shape, generator=g) for n in names}


@pytest.mark.parametrize("name,scale", [("mlp", 1.0), ("conv", 0.1)])
def test_a_segment_of_the_last_layer_certifies_exactly_the_examples_right_at_both_ends(name, scale) -> None:
    """Along a segment of the head (everything else fixed) the margins are linear, so the linear
    bound is exact up to rounding: the box over the same move keeps every corner and certifies
    far less. This is the Domain-IL case of benchmarks/results/cl_notes.md."""
    model, shape = linear_zoo(name)
    target = moved_head(model, scale, seed=2)
    x = inputs(shape, torch.float32, seed=4, n=400)
    with torch.no_grad():
        y = model(x).argmax(1)
    far = copy.deepcopy(model)
    le.load_parameters_(far, {**dict(model.named_parameters()), **target})
    with torch.no_grad():
        right_at_both_ends = far(x).argmax(1) == y
    z = le.Zonotope.segment(model, target)
    certified = le.certified_examples(model, z, x, y, method="linear")
    assert not bool((certified & ~right_at_both_ends).any())
    assert int(certified.sum()) >= int(right_at_both_ends.sum()) - 2  # only near-ties may be lost to rounding
    assert int(right_at_both_ends.sum()) >= 40
    box_certified = le.certified_examples(model, z.bounding_box(), x, y, method="linear")
    assert int(box_certified.sum()) < int(certified.sum()) / 2


def test_a_box_as_a_zonotope_certifies_what_the_box_certifies() -> None:
    model, shape = linear_zoo("conv")
    box = le.Box.around(model, 0.01)
    x = inputs(shape, torch.float32, seed=4, n=64)
    y = labels(model, x)
    z = le.Zonotope.from_box(box)
    assert z.contains(model) and z.n_generators == 0
    for method in ("ibp", "linear"):
        assert le.certified_accuracy(model, z, x, y, method=method) == le.certified_accuracy(model, box, x, y, method=method)
    assert z.bounding_box().is_subset(box.to(dtype=torch.float64), atol=1e-6)


def test_the_segment_contains_both_ends_and_the_bounding_box_contains_the_segment() -> None:
    model, _ = linear_zoo("mlp")
    target = moved_head(model, 1.0, seed=3)
    z = le.Zonotope.segment(model, target, residual=0.01)
    assert z.contains(model) and z.contains_centre()
    far = {**{n: p.detach() for n, p in model.named_parameters()}, **target}
    assert z.contains(far)
    box = z.bounding_box()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert box.contains(z.vertex(g)) and box.contains(z.sample(g))
    assert not z.contains({n: t + 0.5 for n, t in far.items()})


def _scipy_projection(z: le.Zonotope, params: dict[str, torch.Tensor]) -> float:
    names = z.names
    G = torch.cat([z.generators[n].reshape(z.n_generators, -1) for n in names], 1).numpy()
    d = torch.cat([(params[n].double() - z.centre[n]).reshape(-1) for n in names]).numpy()
    r = torch.cat([z.residual[n].reshape(-1) for n in names]).numpy()
    result = minimize(lambda e: float((np.maximum(np.abs(d - e @ G) - r, 0) ** 2).sum()), np.zeros(z.n_generators),
                      bounds=list(zip(z.coeff_lower.numpy(), z.coeff_upper.numpy())), method="L-BFGS-B",
                      options={"ftol": 1e-15, "gtol": 1e-12})
    return float(result.fun)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_is_the_euclidean_projection_and_lands_inside(seed) -> None:
    model, _ = linear_zoo("mlp")
    z = random_zonotope(model.double(), k=3, scale=1.0, residual=0.01, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    before = {n: p.detach().clone() for n, p in moved.named_parameters()}
    assert not z.contains(moved)
    expected = _scipy_projection(z, before)
    z.project_(moved)
    assert z.contains(moved)
    moved_by = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in moved.named_parameters())
    assert moved_by == pytest.approx(expected, rel=1e-6)
    assert z.distance2(moved) <= 1e-20
    again = {n: p.detach().clone() for n, p in moved.named_parameters()}
    z.project_(moved)  # a point inside stays where it is
    assert all(torch.allclose(p.detach(), again[n], rtol=0, atol=1e-12) for n, p in moved.named_parameters())


def test_projected_training_stays_inside_and_keeps_what_the_segment_certifies() -> None:
    model, shape = linear_zoo("mlp")
    target = moved_head(model, 1.0, seed=2)
    z = le.Zonotope.segment(model, target)
    x = inputs(shape, torch.float32, seed=4, n=400)
    with torch.no_grad():
        y = model(x).argmax(1)
    certified = le.certified_examples(model, z, x, y, method="linear")
    trained = copy.deepcopy(model)
    opt = le.ProjectedOptimizer(torch.optim.Adam(trained.parameters(), lr=0.05), trained, z)
    g = torch.Generator().manual_seed(0)
    other_y = torch.randint(0, 3, (400,), generator=g)  # a conflicting task pulls as hard as it can
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(trained(x), other_y).backward()
        opt.step()
        assert z.contains(trained)
    with torch.no_grad():
        assert bool((trained(x).argmax(1)[certified] == y[certified]).all())
    first = dict(model.named_parameters())
    assert all(torch.equal(p, first[n]) for n, p in trained.named_parameters() if n not in target)


def test_save_and_load_round_trip(tmp_path) -> None:
    model, _ = linear_zoo("conv")
    z = random_zonotope(model, k=2, scale=0.01, residual=0.001, seed=0)
    z.save(tmp_path / "z")
    back = le.Zonotope.load(tmp_path / "z")
    assert back.names == z.names and torch.equal(back.coeff_upper, z.coeff_upper)
    assert all(torch.equal(back.generators[n], z.generators[n]) for n in z.names)
    assert all(torch.equal(back.certified_residual(n), z.certified_residual(n)) for n in z.names)
    (tmp_path / "z" / "domain.json").write_text('{"format": "lidgate.box/1"}')
    with pytest.raises(InvalidDomainError, match="expected 'lidgate.zonotope/1'"):
        le.Zonotope.load(tmp_path / "z")


def _parts(model):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return params, {n: torch.zeros((1, *p.shape)) for n, p in params.items()}


@pytest.mark.parametrize("edit,match", [
    (lambda c, g, lo, hi, r: (c, g, torch.tensor([1.0]), torch.tensor([0.0]), r), "coefficient 0 has lower > upper"),
    (lambda c, g, lo, hi, r: (c, g, torch.tensor([0.0, 0.0]), hi, r), "coeff_lower has 2 entries"),
    (lambda c, g, lo, hi, r: (c, {**g, "0.weight": torch.zeros(2, 2)}, lo, hi, r), r"generators\['0.weight'\] must have shape"),
    (lambda c, g, lo, hi, r: (c, g, lo, hi, {**r, "0.bias": -torch.ones_like(r["0.bias"])}), "negative"),
    (lambda c, g, lo, hi, r: ({**c, "0.bias": c["0.bias"] * torch.nan}, g, lo, hi, r), "NaN or inf"),
    (lambda c, g, lo, hi, r: (c, {"nope": g["0.bias"]}, lo, hi, r), "not in 'centre'"),
    (lambda c, g, lo, hi, r: (c, g, torch.tensor([[0.0]]), hi, r), "1-D floating-point"),
    (lambda c, g, lo, hi, r: ({**c, "0.bias": c["0.bias"].half()}, g, lo, hi, r), "float32 or float64"),
])
def test_malformed_zonotopes_are_refused_by_name(edit, match) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    c, g = _parts(model)
    r = {n: torch.zeros_like(t) for n, t in c.items()}
    args = edit(c, g, torch.tensor([0.0]), torch.tensor([1.0]), r)
    with pytest.raises(InvalidDomainError, match=match):
        le.Zonotope(*args)


def test_bad_use_is_refused_by_name() -> None:
    model, shape = linear_zoo("mlp")
    z = le.Zonotope.segment(model, moved_head(model, 0.1, seed=0))
    x = inputs(shape, torch.float32, seed=4)
    y = labels(model, x)
    with pytest.raises(LidError, match="mode='certify' only"):
        le.bound_margins(model, z, x, y, "linear", mode="search")
    with pytest.raises(DomainMismatchError, match="missing parameters"):
        le.certified_accuracy(nn.Sequential(nn.Linear(6, 3)), z, x, y)
    with pytest.raises(DomainMismatchError, match="unknown parameters"):
        le.Zonotope.segment(model, {"head.weight": torch.zeros(3, 16)})
    with pytest.raises(DomainMismatchError, match="must be a tensor of shape"):
        le.Zonotope.segment(model, {"4.weight": torch.zeros(2, 2)})
    with pytest.raises(InvalidDomainError, match="'residual' must be a finite number"):
        le.Zonotope.segment(model, moved_head(model, 0.1, seed=0), residual=-1.0)
    with pytest.raises(DomainMismatchError, match="projection writes float32 or float64"):
        z.project_(copy.deepcopy(model).half())


def test_a_zonotope_certificate_counts_what_is_certified_and_fingerprints_the_saved_domain(tmp_path) -> None:
    from lid_engine.certificate import certify_box, fingerprint_tensors

    model, shape = linear_zoo("mlp")
    z = le.Zonotope.segment(model, moved_head(model, 0.5, seed=2), residual=1e-4)
    x = inputs(shape, torch.float32, seed=4, n=300)
    with torch.no_grad():
        y = model(x).argmax(1)
    cert = certify_box(model, z, x, y, le.Spec("accuracy", 0.5), method="linear")
    assert cert.certified == int(le.certified_examples(model, z, x, y, method="linear").sum())
    assert not cert.problems() and 0 < cert.lower_bound < cert.certified_accuracy
    z.save(tmp_path / "z")
    assert cert.domain_sha256 == fingerprint_tensors(le.Zonotope.load(tmp_path / "z").tensors())
    wider = le.Zonotope.segment(model, moved_head(model, 0.5, seed=2), residual=2e-4)
    assert fingerprint_tensors(wider.tensors()) != cert.domain_sha256


@pytest.mark.parametrize("ratio", [1.0, 30.0, 1000.0])
def test_a_point_inside_is_recognised_and_left_in_place_whatever_the_generator_lengths(ratio) -> None:
    """From the review: a solver that stopped early moved interior points and rejected them."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 10)).double()
    centre = {n: p.detach().clone() for n, p in model.named_parameters()}
    g_weight = torch.zeros(2, 10, 20, dtype=torch.float64)
    g_bias = torch.zeros(2, 10, dtype=torch.float64)
    g_weight[0] = torch.randn(10, 20, dtype=torch.float64)
    g_bias[1] = torch.randn(10, dtype=torch.float64) * float(g_weight[0].norm()) / ratio / 10**0.5
    z = le.Zonotope(centre, {"0.weight": g_weight, "0.bias": g_bias}, -torch.ones(2, dtype=torch.float64),
                    torch.ones(2, dtype=torch.float64))
    le.load_parameters_(model, z.point(torch.tensor([0.3, 0.9], dtype=torch.float64)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert le.Zonotope.load(z.save(Path(tempfile.mkdtemp()) / "z")).contains(model)  # a fresh solver too
    assert torch.allclose(z.nearest_coefficients(model), torch.tensor([0.3, 0.9], dtype=torch.float64), atol=1e-9)
    z.project_(model)
    assert sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in model.named_parameters()) < 1e-24


def test_nan_or_inf_parameters_are_never_inside_and_are_not_projected() -> None:
    """From the review: one diverged step made contains() say True for every later model."""
    model, _ = linear_zoo("mlp")
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2))
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[0].weight[0, 0] = float("inf")
        broken[0].bias[0] = float("nan")
    before = {n: p.detach().clone() for n, p in broken.named_parameters()}
    assert not z.contains(broken) and z.distance2(broken) == float("inf")
    with pytest.raises(le.InvalidInputError, match="holds NaN or inf"):
        z.project_(broken)
    assert all(torch.equal(p, before[n]) or bool(torch.isnan(before[n]).any())
               for n, p in broken.named_parameters())
    far = copy.deepcopy(model)
    with torch.no_grad():
        for p in far.parameters():
            p.add_(5.0)
    assert not z.contains(far)  # the solver's warm start was not poisoned
    assert z.contains(model)


def test_points_the_parameter_dtype_cannot_hold_are_refused_not_written() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    centre = {n: p.detach().double() + 1e39 for n, p in model.named_parameters()}
    z = le.Zonotope(centre, {}, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(DomainMismatchError, match="exceed the range of torch.float32"):
        z.project_(model)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before.items())


def test_a_zonotope_whose_generators_move_nothing_still_projects() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    centre = {n: p.detach() for n, p in model.named_parameters()}
    z = le.Zonotope(centre, {}, -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                    {n: torch.full_like(c, 0.1, dtype=torch.float64) for n, c in centre.items()})
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(1.0)
    z.project_(moved)
    assert z.contains(moved) and z.distance2(moved) < 1e-12  # float32 rounding of the clamp
    with pytest.raises(InvalidDomainError, match=r"offsets\['0.bias'\] must be a floating-point tensor of shape"):
        z.point(torch.zeros(2, dtype=torch.float64), {"0.bias": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(le.InvalidInputError, match="'strategy' must be one of"):
        le.ProjectedOptimizer(torch.optim.SGD(moved.parameters(), 0.1), moved, z, strategy="bogus")


# ---------------------------------------------------------------- training in coefficient space
def _full_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def test_coefficient_training_stays_inside_and_keeps_what_the_segment_certifies() -> None:
    model, shape = linear_zoo("mlp")
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2))
    x = inputs(shape, torch.float32, seed=4, n=400)
    with torch.no_grad():
        y = model(x).argmax(1)
    certified = le.certified_examples(model, z, x, y, method="linear")
    trained = copy.deepcopy(model)
    opt = le.CoefficientOptimizer(trained, z, lr=0.05)
    far = copy.deepcopy(model)
    le.load_parameters_(far, z.point(torch.tensor([1.0], dtype=torch.float64)))
    with torch.no_grad():
        far_y = far(x).argmax(1)  # a new task that pulls to the far end and beyond
    for _ in range(100):
        opt.zero_grad()
        _full_batch_loss(trained, x, far_y).backward()
        opt.step()
        assert z.contains(trained)
    with torch.no_grad():
        assert bool((trained(x).argmax(1)[certified] == y[certified]).all())
    assert float(opt.coefficients.detach()[0]) > 0.5  # it did move along the segment


def test_coefficient_training_keeps_the_residual_box_and_every_generator_range() -> None:
    model, shape = linear_zoo("mlp")
    model = model.double()
    z = random_zonotope(model, k=3, scale=0.05, residual=0.01, seed=3)
    x = inputs(shape, torch.float64, seed=4, n=200)
    y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))
    opt = le.CoefficientOptimizer(model, z, lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        _full_batch_loss(model, x, y).backward()
        opt.step()
        assert z.contains(model)
    eps = opt.coefficients.detach()
    assert bool(((eps == z.coeff_lower) | (eps == z.coeff_upper)).any())  # lr 0.1 drives some to an end
    assert all(bool((d.detach().abs() <= z.residual[n]).all()) for n, d in opt.offsets.items())


def test_a_coefficient_step_follows_the_chain_rule() -> None:
    """One plain SGD step (lr 1, no range hit): ε' = ε − ∂L/∂ε, the derivative of the loss along
    the generators, computed here by autograd through θ(ε) = c + Σ ε_k g_k."""
    model, shape = linear_zoo("mlp")
    model = model.double()
    z = random_zonotope(model, k=2, scale=1e-3, residual=0.0, seed=5)
    z = le.Zonotope(z.centre, z.generators, torch.full((2,), -10.0, dtype=torch.float64),
                    torch.full((2,), 10.0, dtype=torch.float64), z.residual)
    x = inputs(shape, torch.float64, seed=4, n=100)
    y = torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(2))
    opt = le.CoefficientOptimizer(model, z, lr=1.0, optimizer=torch.optim.SGD)
    eps = opt.coefficients.detach().clone().requires_grad_(True)
    params = {n: z.centre[n] + (z.generators[n] * eps.reshape(-1, *[1] * z.centre[n].dim())).sum(0) for n in z.names}
    loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    (expected,) = torch.autograd.grad(loss, eps)
    opt.zero_grad()
    _full_batch_loss(model, x, y).backward()
    opt.step()
    torch.testing.assert_close(opt.coefficients.detach(), eps.detach() - expected, rtol=1e-9, atol=1e-12)
    written = z.point(opt.coefficients.detach())
    assert all(torch.equal(p.detach(), written[n]) for n, p in model.named_parameters())


def test_coefficient_training_reaches_the_optimum_along_a_segment() -> None:
    """The loss along a segment of the last layer is convex in ε: the coefficient optimizer finds
    its minimum (a grid over the segment says where it is)."""
    model, shape = linear_zoo("mlp")
    x = inputs(shape, torch.float32, seed=4, n=400)
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2))
    far = copy.deepcopy(model)
    le.load_parameters_(far, z.point(torch.tensor([1.0], dtype=torch.float64)))
    with torch.no_grad():  # half the labels from each end: the best point lies in between
        y = torch.cat([model(x[:200]).argmax(1), far(x[200:]).argmax(1)])

    def loss_at(eps: float) -> float:
        m = copy.deepcopy(model)
        le.load_parameters_(m, z.point(torch.tensor([eps], dtype=torch.float64)))
        with torch.no_grad():
            return float(_full_batch_loss(m, x, y))

    grid = torch.linspace(0, 1, 401)
    losses = [loss_at(float(e)) for e in grid]
    best = min(losses)
    assert 0.05 < float(grid[losses.index(best)]) < 0.95  # an interior optimum: no clamp does the work
    opt = le.CoefficientOptimizer(model, z, lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        _full_batch_loss(model, x, y).backward()
        opt.step()
    with torch.no_grad():
        assert float(_full_batch_loss(model, x, y)) <= best + 1e-3 < min(losses[0], losses[-1])


def test_coefficient_optimizer_state_round_trips_and_bad_use_is_refused() -> None:
    model, shape = linear_zoo("mlp")
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2), residual=1e-3)
    x = inputs(shape, torch.float32, seed=4, n=50)
    y = torch.zeros(50, dtype=torch.long)
    opt = le.CoefficientOptimizer(model, z, lr=0.05)
    state = copy.deepcopy(opt.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        _full_batch_loss(model, x, y).backward()
        opt.step()
    opt.load_state_dict(state)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    with pytest.raises(LidError, match="'zonotope' must be a Zonotope"):
        le.CoefficientOptimizer(model, z.bounding_box())
    with pytest.raises(LidError, match="'lr' must be a finite number > 0"):
        le.CoefficientOptimizer(model, z, lr=0.0)
    with pytest.raises(LidError, match="'optimizer' must be a torch optimizer class"):
        le.CoefficientOptimizer(model, z, optimizer=torch.optim.Adam([torch.zeros(1, requires_grad=True)]))
    with pytest.raises(DomainMismatchError, match="missing parameters"):
        le.CoefficientOptimizer(nn.Sequential(nn.Linear(6, 3)), z)
    opt.zero_grad()
    (_full_batch_loss(model, x, y) * float("nan")).backward()
    with pytest.raises(LidError, match="holds NaN or inf; nothing was written"):
        opt.step()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("train", ["projected", "coefficients"])
def test_training_a_float64_model_never_moves_its_zonotope(train) -> None:
    """A float64 CPU model's parameters converted 'to float64' are the same tensors: the zonotope
    built from them moved with every training step, so projection did nothing and the model left
    the certified domain while contains() said True. The zonotope now keeps its own copies."""
    model, shape = linear_zoo("mlp")
    model = model.double()
    z = le.Zonotope.segment(model, moved_head(model, 0.5, seed=2))
    frozen = copy.deepcopy(z)
    x = inputs(shape, torch.float64, seed=4, n=200)
    y = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(1))
    opt = (le.ProjectedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model, z) if train == "projected"
           else le.CoefficientOptimizer(model, z, lr=0.1))
    for _ in range(20):
        opt.zero_grad()
        _full_batch_loss(model, x, y).backward()
        opt.step()
    assert all(torch.equal(z.centre[n], frozen.centre[n]) for n in z.names)
    assert frozen.contains(model)
    first = dict(model.named_parameters())
    assert all(torch.equal(first[n].detach(), frozen.centre[n]) for n in z.names if n not in z.generators)


# ---------------------------------------------------------------- from the review of the coefficient optimizer
def _small_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), snap[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("offsets,match", [
    ({"2.bias": torch.zeros(2, 3)}, r"offsets\['2.bias'\] must be a floating-point tensor of shape \(3,\)"),
    ({"2.bias": torch.tensor(5.0)}, r"offsets\['2.bias'\] must be a floating-point tensor"),
    ({"2.bias": torch.full((3,), float("nan"))}, r"offsets\['2.bias'\] holds NaN or inf"),
    ({"head.bias": torch.zeros(3)}, "names parameters not in the zonotope"),
    ([1, 2], "'offsets' must be a mapping"),
])
def test_write_refuses_bad_offsets_before_writing_anything(offsets, match) -> None:
    """A wrongly shaped offset used to fail inside the copy loop, after the first parameters were
    written: the model was left half at one point, half at another, outside the zonotope."""
    model = _small_model()
    z = le.Zonotope.segment(model, {n: p.detach() + 1 for n, p in model.named_parameters()}, residual=0.01)
    snap = _snapshot(model)
    with pytest.raises(LidError, match=match):
        z.write_(model, torch.tensor([1.0], dtype=torch.float64), offsets)
    assert _unchanged(model, snap) and z.contains(model)


def test_the_projection_hands_out_copies_and_fails_closed_when_it_cannot_be_computed() -> None:
    model = _small_model()
    far = copy.deepcopy(model)
    with torch.no_grad():
        far[2].bias += 100
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2))
    eps = z.nearest_coefficients(far)
    eps.fill_(float("nan"))  # the caller's tensor: the next judgement must not see it
    assert not z.contains(far)
    z.tensors()["centre/2.bias"].add_(7)  # so are the tensors a certificate fingerprints
    assert z.contains(model)
    huge = le.Zonotope(dict(model.named_parameters()), {"2.bias": torch.full((1, 3), 1e160, dtype=torch.float64)},
                       torch.tensor([-1e-160], dtype=torch.float64), torch.tensor([1e-160], dtype=torch.float64))
    with pytest.raises(InvalidDomainError, match="projection is not finite"):
        huge.contains(far)  # used to say True: NaN coefficients made every comparison False


def test_coefficient_optimizer_refuses_before_touching_the_model() -> None:
    model = _small_model()
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2), residual=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # outside Z: constructing the optimizer would project it
    snap = _snapshot(model)
    for kwargs, match in [({"momentum": 0.9}, "Adam refused its arguments"), ({"lr": True}, "'lr' must be"),
                          ({"optimizer": torch.optim.LBFGS}, "LBFGS re-evaluates a closure")]:
        with pytest.raises(LidError, match=match):
            le.CoefficientOptimizer(model, z, **kwargs)
        assert _unchanged(model, snap)
    with pytest.raises(LidError, match="'model' must be a torch.nn.Module"):
        le.CoefficientOptimizer("model", z)
    model[2].weight.requires_grad_(False)
    with pytest.raises(LidError, match=r"\['2.weight'\] move with the zonotope but do not require grad"):
        le.CoefficientOptimizer(model, z)
    assert _unchanged(model, snap)


def test_coefficient_optimizer_survives_bad_states_and_overflowing_steps() -> None:
    model = _small_model()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    z = le.Zonotope.segment(model, moved_head(model, 1.0, seed=2), residual=1e-3)
    opt = le.CoefficientOptimizer(model, z, lr=0.01)
    sgd_state = le.CoefficientOptimizer(copy.deepcopy(model), copy.deepcopy(z), lr=0.01,
                                        optimizer=torch.optim.SGD).state_dict()
    two = le.Zonotope(z.centre, {n: torch.cat([g, g]) for n, g in z.generators.items()},
                      torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), z.residual)
    wrong_k = le.CoefficientOptimizer(copy.deepcopy(model), two, lr=0.01).state_dict()
    snap = _snapshot(model)
    for state, match in [(sgd_state, "is not a state of Adam"), (wrong_k, "'coefficients' must be 1 finite values"),
                         ({"optimizer": {}}, "expected the dict state_dict"), ({**opt.state_dict(),
                          "coefficients": torch.tensor([float("nan")], dtype=torch.float64)}, "finite values")]:
        with pytest.raises(LidError, match=match):
            opt.load_state_dict(state)
        assert _unchanged(model, snap)
    big = le.Zonotope(z.centre, {n: g * 1e150 for n, g in z.generators.items()}, z.coeff_lower,
                      z.coeff_upper * 1e-150, z.residual)  # the same segment, written with huge generators
    big_opt = le.CoefficientOptimizer(model, big, lr=0.01)
    snap = _snapshot(model)
    big_opt.zero_grad()
    (nn.functional.cross_entropy(model(x), y) * 1e200).backward()  # finite gradients; ⟨g, ∇θ L⟩ overflows
    with pytest.raises(LidError, match="gradient of the coefficients holds NaN or inf"):
        big_opt.step()
    assert _unchanged(model, snap)
    for _ in range(3):  # and the optimizer still works afterwards
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert z.contains(model)
    assert not _unchanged(model, snap)
