"""The auto_LiRPA backend (IBP and CROWN under parameter perturbation) is sound and well behaved.

Soundness is checked by sampling (DESIGN.md, soundness rule 2): parameter vectors drawn uniformly
inside the box and at random vertices, plain forward pass, every logit inside the bounds.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lid_engine.bounds.lirpa import bound_logits_lirpa
from lid_engine.domains import Box, load_parameters_
from lid_engine.errors import InvalidInputError, UnsupportedLayerError

METHODS = ("ibp", "crown")
F64 = torch.float64


def _mlp(seed: int, flatten: bool) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)]
    return nn.Sequential(*layers).double()


def _inputs(seed: int, flatten: bool, batch: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 2, 3) if flatten else (batch, 6)
    return torch.randn(shape, generator=g, dtype=F64)


def _random_box(model: nn.Module, radius: float, gen: torch.Generator, contains_nominal: bool) -> Box:
    """Non-symmetric box: independent random reach below and above each coordinate.

    With ``contains_nominal=False`` the box is also shifted by up to ``radius``, so the nominal
    parameters may lie outside it.
    """
    lower, upper = {}, {}
    for name, p in model.named_parameters():
        c = p.detach().clone()
        if not contains_nominal:
            c = c + radius * (2 * torch.rand(c.shape, generator=gen, dtype=F64) - 1)
        lower[name] = c - radius * torch.rand(c.shape, generator=gen, dtype=F64)
        upper[name] = c + radius * torch.rand(c.shape, generator=gen, dtype=F64)
    return Box(lower, upper)


def _stacked_samples(box: Box, gen: torch.Generator, n_uniform: int, n_vertex: int) -> dict[str, torch.Tensor]:
    draws = [box.sample(gen) for _ in range(n_uniform)] + [box.vertex(gen) for _ in range(n_vertex)]
    return {name: torch.stack([d[name] for d in draws]) for name in box.names}


def _forward_many(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outputs for every stacked parameter vector: shape (n_samples, batch, n_outputs)."""
    return torch.vmap(lambda p: functional_call(model, p, (x,)))(params)


# ----------------------------------------------------------------------------- (a) soundness
BOXES = [("around", 1e-3), ("around", 1e-2), ("around", 5e-2), ("random", 3e-2), ("random-shifted", 2e-2)]


@pytest.mark.parametrize("flatten", [False, True], ids=["mlp", "flatten-mlp"])
@pytest.mark.parametrize("box_kind,radius", BOXES, ids=[f"{k}-{r:g}" for k, r in BOXES])
def test_bounds_contain_every_sampled_output(flatten, box_kind, radius):
    seed = 17 * len(box_kind) + int(radius * 1e4) + flatten
    model, x = _mlp(seed, flatten), _inputs(seed, flatten)
    gen = torch.Generator().manual_seed(seed)
    if box_kind == "around":
        box = Box.around(model, radius).to(dtype=F64)
    else:
        box = _random_box(model, radius, gen, contains_nominal=(box_kind == "random"))

    bounds = {m: bound_logits_lirpa(model, box, x, method=m) for m in METHODS}
    lo = torch.maximum(bounds["ibp"][0], bounds["crown"][0])
    hi = torch.minimum(bounds["ibp"][1], bounds["crown"][1])
    # (f) the intersection of two sound bounds is sound, and at least as tight as either.
    for m, (lo_m, hi_m) in bounds.items():
        assert lo_m.shape == hi_m.shape == (x.shape[0], 3) and lo_m.dtype == F64
        assert torch.isfinite(lo_m).all() and torch.isfinite(hi_m).all()
        assert (lo >= lo_m).all() and (hi <= hi_m).all(), m
    assert (lo <= hi).all()

    params = _stacked_samples(box, gen, n_uniform=6_000, n_vertex=4_000)
    for name, p in params.items():  # the samples really are in the box
        assert (p >= box.lower[name]).all() and (p <= box.upper[name]).all()
    out = _forward_many(model, params, x)
    tol = 1e-5 * (1 + out.abs())
    for m, (lo_m, hi_m) in list(bounds.items()) + [("ibp∩crown", (lo, hi))]:
        below = (out < lo_m - tol).sum().item()
        above = (out > hi_m + tol).sum().item()
        assert below == 0 and above == 0, f"{m}: {below} outputs below, {above} above the bounds"


def test_vectorised_forward_matches_loading_parameters():
    """The vmap'd forward used above agrees with a plain forward on a model loaded with the sample."""
    model, x = _mlp(3, True), _inputs(3, True)
    box = Box.around(model, 0.05)
    gen = torch.Generator().manual_seed(3)
    params = _stacked_samples(box, gen, n_uniform=3, n_vertex=3)
    out = _forward_many(model, params, x)
    probe = copy.deepcopy(model)
    for i in range(6):
        load_parameters_(probe, {n: t[i] for n, t in params.items()})
        torch.testing.assert_close(out[i], probe(x), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- (b) zero width
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("flatten", [False, True], ids=["mlp", "flatten-mlp"])
def test_zero_width_box_reproduces_forward_pass(method, flatten):
    model, x = _mlp(5, flatten), _inputs(5, flatten)
    lo, hi = bound_logits_lirpa(model, Box.point(model), x, method=method)
    with torch.no_grad():
        y = model(x)
    assert (lo - y).abs().max().item() <= 1e-9
    assert (hi - y).abs().max().item() <= 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_single_linear_layer_bounds_are_exact(method):
    """With x fixed, one Linear layer is linear in its parameters: the exact range is attained at a
    vertex. Both methods must find it, which shows the backend bounds the box it was given (a
    sampling test alone would not notice a slightly shrunken box)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    x = _inputs(9, True)
    box = _random_box(model, 0.1, torch.Generator().manual_seed(9), contains_nominal=True)
    wl, wu, bl, bu = box.lower["1.weight"], box.upper["1.weight"], box.lower["1.bias"], box.upper["1.bias"]
    xf = x.flatten(1).unsqueeze(1)  # (batch, 1, 6)
    exact_lo = torch.minimum(xf * wl, xf * wu).sum(-1) + bl
    exact_hi = torch.maximum(xf * wl, xf * wu).sum(-1) + bu
    lo, hi = bound_logits_lirpa(model, box, x, method=method)
    assert (lo - exact_lo).abs().max().item() <= 1e-9
    assert (hi - exact_hi).abs().max().item() <= 1e-9


# ----------------------------------------------------------------------------- (c) monotone
@pytest.mark.parametrize("method", METHODS)
def test_bounds_of_a_sub_box_lie_inside_the_outer_bounds(method):
    gen = torch.Generator().manual_seed(11)
    for seed, radius in [(21, 0.02), (22, 0.1), (23, 0.3)]:
        model, x = _mlp(seed, False), _inputs(seed, False)
        outer = _random_box(model, radius, gen, contains_nominal=True)
        lower, upper = {}, {}
        for n in outer.names:
            w = outer.width(n)
            a = torch.rand(w.shape, generator=gen, dtype=F64)
            b = torch.rand(w.shape, generator=gen, dtype=F64)
            lower[n] = outer.lower[n] + w * torch.minimum(a, b)
            upper[n] = torch.minimum(outer.lower[n] + w * torch.maximum(a, b), outer.upper[n])
        inner = Box(lower, upper)
        assert inner.is_subset(outer)
        lo_o, hi_o = bound_logits_lirpa(model, outer, x, method=method)
        lo_i, hi_i = bound_logits_lirpa(model, inner, x, method=method)
        assert (lo_i >= lo_o - 1e-9).all() and (hi_i <= hi_o + 1e-9).all()


# ----------------------------------------------------------------------------- (d) unsupported layers
@pytest.mark.parametrize(
    "model,path,kind",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)), "1", "Tanh"),
        (nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), nn.Linear(8, 2)), "0.0", "Conv2d"),
        (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), nn.Linear(4, 2)), "1.1", "BatchNorm1d"),
    ],
    ids=["tanh", "nested-conv2d", "nested-batchnorm"],
)
def test_unsupported_layer_is_named(model, path, kind):
    with pytest.raises(UnsupportedLayerError) as err:
        bound_logits_lirpa(model, Box.around(model, 0.01), torch.randn(2, 4), method="crown")
    msg = str(err.value)
    assert f"'{path}'" in msg and kind in msg and "Linear, ReLU, Flatten" in msg


def test_custom_container_is_rejected():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    model = nn.Sequential(nn.Linear(4, 4), Net())
    with pytest.raises(UnsupportedLayerError, match="'1'"):
        bound_logits_lirpa(model, Box.around(model, 0.01), torch.randn(2, 4), method="ibp")


def test_linear_on_unflattened_input_is_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(InvalidInputError, match="'0'.*Flatten"):
        bound_logits_lirpa(model, Box.around(model, 0.01), torch.randn(5, 2, 3), method="crown")


def test_bad_method_is_rejected():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="method"):
        bound_logits_lirpa(model, Box.around(model, 0.01), torch.randn(2, 3), method="alpha-crown")


# ----------------------------------------------------------------------------- other behaviour
@pytest.mark.parametrize("method", METHODS)
def test_float32_bias_free_and_nested_model_leaves_the_user_model_alone(method):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 8, bias=False), nn.ReLU()), nn.Linear(8, 3, bias=False))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(4, 5)
    box = Box.around(model, 0.05)
    lo, hi = bound_logits_lirpa(model, box, x, method=method)
    assert lo.dtype == hi.dtype == torch.float32 and lo.shape == (4, 3)
    assert not lo.requires_grad and not hi.requires_grad
    with torch.no_grad():
        y = model(x)
    assert (lo <= y).all() and (y <= hi).all()
    # the model is untouched: same parameter objects and types, values, mode, no new bias
    assert model.training
    assert model[1].bias is None and model[0][0].bias is None
    for n, p in model.named_parameters():
        assert type(p) is nn.Parameter and torch.equal(p, before[n])


def test_bias_free_linear_is_sound_under_crown():
    """auto_LiRPA traces a bias-free Linear as Transpose+MatMul; the backend adds an exact zero bias."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 10, bias=False), nn.ReLU(), nn.Linear(10, 3, bias=False)).double()
    x = torch.randn(6, 6, dtype=F64)
    box = Box.around(model, 0.05)
    gen = torch.Generator().manual_seed(8)
    out = _forward_many(model, _stacked_samples(box, gen, 1_000, 1_000), x)
    for m in METHODS:
        lo, hi = bound_logits_lirpa(model, box, x, method=m)
        tol = 1e-5 * (1 + out.abs())
        assert (out >= lo - tol).all() and (out <= hi + tol).all(), m


# ----------------------------------------------------------------------------- (e) process state
_STATE_PROBE = textwrap.dedent(
    """
    import json, logging, sys, warnings, torch
    from torch import nn

    def state():
        root = logging.getLogger()
        ex = torch._C._jit_set_profiling_executor(True); torch._C._jit_set_profiling_executor(ex)
        mode = torch._C._jit_set_profiling_mode(True); torch._C._jit_set_profiling_mode(mode)
        return {
            "handlers": [repr(h) for h in root.handlers],
            "handler_ids": [id(h) for h in root.handlers],
            "level": root.level,
            "filters": [repr(f) for f in warnings.filters],
            "filters_id": id(warnings.filters),
            "profiling": [ex, mode],
        }

    # a non-default starting state, so that "restored" cannot pass by coincidence
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("error", message="lidgate-probe")
    before = state()
    assert "auto_LiRPA" not in sys.modules
    from lid_engine.bounds._lirpa_compat import import_auto_lirpa
    lirpa = import_auto_lirpa()
    assert import_auto_lirpa() is lirpa and "auto_LiRPA" in sys.modules
    after_import = state()

    from lid_engine.bounds.lirpa import bound_logits_lirpa
    from lid_engine.domains import Box
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    for method in ("ibp", "crown"):
        bound_logits_lirpa(model, Box.around(model, 0.01), torch.randn(2, 3), method=method)
    after_bounds = state()
    print(json.dumps({"before": before, "after_import": after_import, "after_bounds": after_bounds}))
    """
)


def test_import_and_bounds_leave_logging_warnings_and_torchscript_settings_alone():
    proc = subprocess.run([sys.executable, "-c", _STATE_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    states = json.loads(lines[-1])
    assert len(lines) == 1, f"unexpected output on stdout: {lines[:-1]}"
    assert states["after_import"] == states["before"]
    assert states["after_bounds"] == states["before"]
    assert "torch.jit.script" not in proc.stderr  # auto_LiRPA's import-time deprecation noise is dropped


def test_missing_auto_lirpa_gives_install_advice(monkeypatch):
    import importlib.util

    from lid_engine.bounds import _lirpa_compat

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(_lirpa_compat, "_module", None)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "auto_LiRPA" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="make venv"):
        _lirpa_compat.import_auto_lirpa()
