"""Soundness of the linear margin bound (``bound_margins(..., "linear")``) by sampling and by attack.

DESIGN.md soundness rule 2 for the second bound method: 10^4 parameter vectors per case (half random
vertices, half uniform), plain forward passes in the certified dtype, every sampled margin
``z_y − z_j`` at or above its bound, no tolerance in certification mode; a projected-gradient
attack inside the box looks for the worst margin directly. Plus: zero-width boxes reproduce the
nominal margins, the bound is never looser than IBP and clearly tighter on weight-shared
convolutions, and bad input gets a clear error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lid_engine as le
from examples.mnist.model import cnn
from lid_engine import bound_margins
from lid_engine.errors import LidError, UnsupportedLayerError
from tests.helpers.bounds import (
    LINEAR_ZOO, assert_below, inputs, labels, linear_zoo, make_box, sampled_margins, seeded_bn,
)
from tests.helpers.sampling import sample_parameters, sampled_outputs

N_SAMPLES = 10_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("box_kind", ["absolute", "relative", "asymmetric"])
@pytest.mark.parametrize("name", LINEAR_ZOO)
def test_certify_mode_linear_margins_hold_for_every_sampled_forward(name, box_kind, dtype) -> None:
    model, shape = linear_zoo(name)
    model = model.to(dtype)
    box = make_box(model, box_kind, seed=3).to(dtype=dtype)
    x = inputs(shape, dtype, seed=4)
    y = labels(model, x)
    bound = bound_margins(model, box, x, y, "linear", dtype=dtype)
    assert bound.dtype == dtype and bound.shape == model(x).shape
    assert bool(torch.isinf(bound.gather(1, y[:, None])).all())
    outs = sampled_outputs(model, sample_parameters(box, N_SAMPLES, seed=5), x)
    assert_below(bound, sampled_margins(outs, y))

    # certified accuracy and the per-example mask are sound, and never below IBP's
    cert = le.certified_accuracy(model, box, x, y, method="linear", dtype=dtype)
    assert cert <= float((outs.argmax(-1) == y).to(dtype).mean(-1).min())
    assert cert >= le.certified_accuracy(model, box, x, y, dtype=dtype)
    mask = le.certified_examples(model, box, x, y, method="linear", dtype=dtype)
    assert bool((outs.argmax(-1)[:, mask] == y[mask]).all())


@pytest.mark.parametrize("name", ["mlp", "conv", "conv_geometry", "taskmask"])
def test_search_mode_linear_margins_hold_up_to_rounding(name) -> None:
    model, shape = linear_zoo(name)
    box = make_box(model, "asymmetric", seed=7)
    x = inputs(shape, torch.float32, seed=8)
    y = labels(model, x)
    bound = bound_margins(model, box, x, y, "linear", mode="search")
    margins = sampled_margins(sampled_outputs(model, sample_parameters(box, N_SAMPLES, seed=9), x), y)
    assert_below(bound - 1e-5 * (1 + bound.abs()), margins)
    # the fast search kernels compute the same bound as the rigorous certify pass, up to its slack
    exact = bound_margins(model, box, x, y, "linear", dtype=torch.float64)
    finite = torch.isfinite(exact)
    torch.testing.assert_close(bound.double()[finite], exact[finite], rtol=1e-4, atol=1e-5)


def _attack(model: nn.Module, box: le.Box, x: torch.Tensor, y: torch.Tensor, j: torch.Tensor, steps: int = 60) -> torch.Tensor:
    """Projected sign-gradient descent on θ inside the box, minimising each example's margin to class j."""
    worst = torch.full((len(x),), torch.inf, dtype=x.dtype)
    for i in range(len(x)):
        m = copy.deepcopy(model)
        le.load_parameters_(m, box.vertex(torch.Generator().manual_seed(i)))
        step = {n: (box.upper[n] - box.lower[n]) / 10 for n in box.names}
        for _ in range(steps):
            z = m(x[i : i + 1])[0]
            margin = z[y[i]] - z[j[i]]
            worst[i] = torch.minimum(worst[i], margin.detach())
            m.zero_grad()
            margin.backward()
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.sub_(step[n] * p.grad.sign())
            box.project_(m)
    return worst


@pytest.mark.parametrize("name", ["conv", "mlp"])
def test_linear_bound_survives_a_gradient_attack_inside_the_box(name) -> None:
    model, shape = linear_zoo(name)
    model = model.double()
    box = le.Box.relative_around(model, 0.3)
    x = inputs(shape, torch.float64, seed=21, n=8)
    y = labels(model, x)
    bound = bound_margins(model, box, x, y, "linear")
    j = bound.argmin(1)  # the competitor the bound fears most
    found = _attack(model, box, x, y, j)
    assert bool((bound.gather(1, j[:, None]).squeeze(1) <= found).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", LINEAR_ZOO)
def test_zero_width_box_gives_the_nominal_margins(name, dtype) -> None:
    model, shape = linear_zoo(name)
    model = model.to(dtype)
    x = inputs(shape, dtype, seed=10)
    y = labels(model, x)
    with torch.no_grad():
        z = model(x)
    nominal = z.gather(1, y[:, None]) - z
    bound = bound_margins(model, le.Box.point(model), x, y, "linear")
    finite = torch.isfinite(bound)
    assert bool((bound[finite] <= nominal[finite]).all())
    # the rounding allowance stays tiny: far below any useful margin (the ±1e4 TaskMask fill is exact)
    tol = (1e-3 if dtype == torch.float32 else 1e-10) + 1e-6 * nominal[finite].abs()
    assert bool((nominal[finite] - bound[finite] <= tol).all())


def test_linear_is_much_tighter_than_ibp_on_shared_convolution_weights() -> None:
    """The reason the method exists: a kernel used at every position, its width counted once."""
    torch.manual_seed(0)
    model = cnn(10).double()
    box = le.Box.around(model, 0.003, names=["0.weight", "2.weight"])
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    y = labels(model, x)
    ibp = bound_margins(model, box, x, y, "ibp")
    lin = bound_margins(model, box, x, y, "linear")
    finite = torch.isfinite(ibp)
    assert bool((lin[finite] >= ibp[finite]).all())
    gap = float((lin - ibp)[finite].mean())
    spread = float((ibp - bound_margins(model, le.Box.point(model), x, y, "ibp"))[finite].abs().mean())
    assert gap > 0.5 * spread, f"linear recovers only {gap:.3g} of IBP's {spread:.3g} loss"


def test_linear_bounds_tighten_as_the_domain_shrinks() -> None:
    model, shape = linear_zoo("conv")
    outer = make_box(model, "asymmetric", seed=11)
    inner = le.Box({n: outer.lower[n] + 0.5 * outer.width(n) * 0.5 for n in outer.names},
                   {n: outer.upper[n] - 0.5 * outer.width(n) * 0.5 for n in outer.names})
    assert inner.is_subset(outer)
    x = inputs(shape, torch.float32, seed=13)
    y = labels(model, x)
    o = bound_margins(model, outer, x, y, "linear")
    i = bound_margins(model, inner, x, y, "linear")
    finite = torch.isfinite(o)
    assert bool((i[finite] >= o[finite]).all())


@st.composite
def random_linear_model(draw):
    """MLPs and CNNs of the supported layers, random widths, biases, strides and box radii."""
    if draw(st.booleans()):
        depth = draw(st.integers(1, 4))
        widths = [draw(st.integers(2, 10)) for _ in range(depth + 1)]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
            if i < depth - 1 and draw(st.booleans()):
                layers.append(nn.ReLU())
        shape = (widths[0],)
    else:
        c = draw(st.integers(1, 3))
        k, stride, pad = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1]))
        size = (8 + 2 * pad - k) // stride + 1
        layers = [nn.Conv2d(c, 3, k, stride=stride, padding=pad, bias=draw(st.booleans())), nn.ReLU(),
                  nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * size * size, 3)]
        shape = (c, 8, 8)
    radius = draw(st.sampled_from([0.0, 1e-3, 0.02, 0.2]))
    return nn.Sequential(*layers).eval().double(), shape, radius, draw(st.booleans()), draw(st.integers(0, 10_000))


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_linear_model())
def test_random_compositions_are_sound(case) -> None:
    model, shape, radius, relative, seed = case
    box = le.Box.around(model, radius, relative=relative)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = labels(model, x)
    bound = bound_margins(model, box, x, y, "linear")
    assert_below(bound, sampled_margins(sampled_outputs(model, sample_parameters(box, 4000, seed), x), y))


def test_float32_model_certified_in_float64_holds_for_its_own_float32_forward() -> None:
    """The certificate covers the model's own arithmetic: counts are taken in float64 *and* float32."""
    from lid_engine.certificate import certified_counts

    model, shape = linear_zoo("conv")
    box = le.Box.relative_around(model, 0.05)
    x = inputs(shape, torch.float32, seed=14, n=40)
    y = labels(model, x)
    n, k, _, dtypes = certified_counts(model, box, x, y, dtype=torch.float64, method="linear")
    assert dtypes == ["float64", "float32"] and 0 < k <= n
    outs = sampled_outputs(model, sample_parameters(box, N_SAMPLES, seed=15), x)
    mask = le.certified_examples(model, box, x, y, method="linear", dtype=torch.float32)
    assert int(mask.sum()) >= k and bool((outs.argmax(-1)[:, mask] == y[mask]).all())


def test_search_mode_is_differentiable_and_widening_hurts() -> None:
    model, shape = linear_zoo("conv")
    base = le.Box.around(model, 0.01)
    lower = {n: t.clone().requires_grad_(True) for n, t in base.lower.items()}
    upper = {n: t.clone().requires_grad_(True) for n, t in base.upper.items()}
    x = inputs(shape, torch.float32, 1)
    y = labels(model, x)
    m = bound_margins(model, le.Box(lower, upper), x, y, "linear", mode="search")
    m[torch.isfinite(m)].sum().backward()
    for n in lower:
        assert torch.isfinite(upper[n].grad).all() and torch.isfinite(lower[n].grad).all()
        assert bool((upper[n].grad <= 1e-6).all()) and bool((lower[n].grad >= -1e-6).all()), n


def test_competitors_limit_the_work_but_never_loosen_below_ibp() -> None:
    torch.manual_seed(1)
    model = cnn(10)
    box = le.Box.around(model, 0.002)
    x = torch.rand(8, 1, 28, 28)
    y = labels(model, x)
    full = bound_margins(model, box, x, y, "linear", mode="search")
    two = bound_margins(model, box, x, y, "linear", mode="search", competitors=2)
    ibp = bound_margins(model, box, x, y, "ibp", mode="search")
    assert bool((two >= ibp).all()) and bool((two <= full + 1e-5).all())
    # the two classes IBP fears most get the linear bound
    fear = ibp.argsort(1)[:, :2]
    torch.testing.assert_close(two.gather(1, fear), full.gather(1, fear))


# ------------------------------------------------------------------------------------ overflow
def test_overflowed_ibp_margins_never_make_a_hidden_class_a_competitor() -> None:
    """Float32 logits near 2e38: IBP margins of kept classes overflow to inf and must still rank
    ahead of the classes a TaskMask hides (bounding a hidden class's raw logit ignores the fill)."""
    head = nn.Linear(1, 3)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([-3e38, -2e38, 2e38]))
    model = nn.Sequential(head, le.TaskMask(3, [[1, 2], [0]]).set_task(0))  # class 0 hidden
    box = le.Box.around(model, 1e30)
    x, y = torch.ones(1, 1), torch.tensor([2])
    bound = bound_margins(model, box, x, y, "linear", dtype=torch.float32)
    outs = sampled_outputs(model, sample_parameters(box, 2_000, seed=1), x)
    assert_below(bound, sampled_margins(outs, y))


def test_a_linear_bound_that_overflows_leaves_ibp_bound_instead_of_nan() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(),
                          nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.tensor([[1e160, 1e160], [-1e160, -1e160]], dtype=torch.float64))
    box = le.Box.around(model, 0.0)
    x, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0])
    linear = bound_margins(model, box, x, y, "linear")
    assert not bool(torch.isnan(linear).any())
    assert torch.equal(linear, bound_margins(model, box, x, y, "ibp"))


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("build,shape,crossed", [
    (lambda: nn.Sequential(nn.Linear(4, 6), seeded_bn(nn.BatchNorm1d(6), 0), nn.ReLU(), nn.Linear(6, 3)), (4,),
     ["1 (BatchNorm1d)"]),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)), (1, 4, 4),
     ["0 (Conv2d)"]),  # uneven 'same' padding: no relaxation here
])
def test_a_chain_layer_without_relaxation_is_crossed_with_its_ibp_interval(build, shape, crossed) -> None:
    from lid_engine.bounds import ibp, linear
    from lid_engine.bounds.linear_graph import graph_linear_margins
    from lid_engine.testing import check_soundness

    torch.manual_seed(0)
    model = build().eval()
    x, y = torch.randn(8, *shape), torch.randint(0, 3, (8,))
    box = le.Box.around(model, 0.01)
    walked = linear.walk(model, ibp.check_supported(model))  # the chain walk cannot: the traced graph instead
    found: list[str] = []
    graph_linear_margins(model, walked, box, x, y, certify=True, fallbacks=found)
    assert found == crossed
    ibp_only = bound_margins(model, box, x, y, "ibp")
    assert bool((bound_margins(model, box, x, y, "linear") >= ibp_only).all())  # intersected with IBP
    report = check_soundness(model, box, x, y=y, method="linear", samples=200)
    assert report.violations == 0 and report.nominal_enclosed, report


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "zonotope"}, r"bound_margins: 'method' must be one of \('ibp', 'linear'\)"),
    ({"method": "linear", "competitors": 2}, r"'competitors' only speeds up mode='search'"),
    ({"method": "linear", "mode": "search", "competitors": 0}, r"'competitors' must be a positive int"),
    ({"method": "linear", "mode": "fast"}, r"'mode' must be one of"),
])
def test_bad_arguments_are_named(kwargs, match) -> None:
    model, shape = linear_zoo("mlp")
    with pytest.raises(LidError, match=match):
        bound_margins(model, le.Box.around(model, 0.01), torch.randn(3, *shape), torch.zeros(3, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("y,match", [
    (torch.tensor([0, 1]), r"'y' must be an integer tensor of shape \(3,\)"),
    (torch.tensor([0.0, 1.0, 2.0]), r"'y' must be an integer tensor"),
    (torch.tensor([0, 1, 7]), r"labels must lie in 0\.\.2"),
    (torch.tensor([True, False, True]), r"'y' must be an integer tensor .*got torch.bool"),
])
def test_bad_labels_are_named(y, match) -> None:
    model, shape = linear_zoo("mlp")
    with pytest.raises(LidError, match=match):
        bound_margins(model, le.Box.around(model, 0.01), torch.randn(3, *shape), y, "linear")


def test_any_integer_label_dtype_gives_the_same_bound() -> None:
    model, shape = linear_zoo("mlp")
    box, x, y = le.Box.around(model, 0.01), torch.randn(3, *shape), torch.tensor([0, 1, 2])
    expected = bound_margins(model, box, x, y, "linear")
    for dtype in (torch.int32, torch.uint8):
        torch.testing.assert_close(bound_margins(model, box, x, y.to(dtype), "linear"), expected)


@pytest.mark.parametrize("name,x_shape,match", [
    ("mlp", (3, 5), r"layer '0' \(Linear\) expects inputs of shape \(N, 6\)"),
    ("conv", (3, 2, 8, 8), r"layer '0' \(Conv2d\) expects inputs of shape \(N, 1, H, W\)"),
])
def test_a_wrong_input_shape_is_named_by_layer(name, x_shape, match) -> None:
    model, _ = linear_zoo(name)
    with pytest.raises(UnsupportedLayerError, match=match):
        bound_margins(model, le.Box.around(model, 0.01), torch.randn(*x_shape), torch.zeros(3, dtype=torch.long),
                      "linear")


def test_an_infinite_task_mask_fill_is_refused() -> None:
    with pytest.raises(LidError, match=r"TaskMask: 'fill' must be a finite number"):
        le.TaskMask(3, [[0, 1], [2]], fill=float("-inf"))


def test_search_config_rejects_an_unknown_method() -> None:
    """SearchConfig.method used to be accepted and ignored; now it is checked and used."""
    model, shape = linear_zoo("mlp")
    with pytest.raises(LidError, match=r"invalid 'method' = 'crown'"):
        le.compute_lid(model, torch.randn(20, *shape), torch.zeros(20, dtype=torch.long), tau=0.5, method="crown",
                       progress=False)


# ------------------------------------------------------------------------ search and certificates
def test_linear_lid_is_certified_with_the_linear_bound_and_verifies(tmp_path) -> None:
    """compute_lid(method="linear"): searched and certified with the same bound, recorded in every
    certificate, re-checked by verify, and sound for sampled models on the certification data."""
    model, shape = linear_zoo("conv")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, *shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model is right on its own predictions: τ = 0.9 is feasible
    lid = le.compute_lid(model, x[:200], y[:200], tau=0.9, cert_x=x[200:], cert_y=y[200:], method="linear",
                         iterations=40, checkpoints=4, batch_size=100, progress=False)
    assert {c.bound_method for certs in lid.certificates for c in certs.values()} == {"linear"}
    assert lid.search_config["method"] == "linear"
    for i, box in enumerate(lid.members):
        cert = lid.certificate(i)
        assert cert.certified_accuracy >= 0.9
        assert cert.certified >= int(le.certified_examples(model, box, x[200:], y[200:]).sum())  # never below IBP
        outs = sampled_outputs(model, sample_parameters(box, 2000, seed=i), x[200:])
        assert cert.certified <= int((outs.argmax(-1) == y[200:]).sum(-1).min())
    lid.save(tmp_path / "lid")
    report = le.verify(tmp_path / "lid", model, x[200:], y[200:])
    assert report.ok, report.summary()
    assert le.LID.load(tmp_path / "lid").certificate(0).bound_method == "linear"
