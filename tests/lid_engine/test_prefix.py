"""The frozen prefix of a partial domain is evaluated once: the cut is exact, the search gives the
LID it gives without the cache, and the prefix is no longer bounded on every search pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lid_engine as le
from lid_engine.bounds import registry
from lid_engine.bounds import ibp
from lid_engine.bounds.ibp import check_supported
from lid_engine.prefix import split_frozen
from tests.helpers.models import fitted

BLOCKS = ["stem", "inner", "skip", "norm", "head"]


class Residual(nn.Module):
    """A stem, a residual block whose branch has two layers, LayerNorm and a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.inner, self.skip = nn.Linear(6, 24), nn.Linear(24, 24), nn.Linear(24, 24)
        self.norm, self.head = nn.LayerNorm(24), nn.Linear(24, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.skip(F.gelu(self.inner(h)))
        return self.head(self.norm(h))


def data(n=900, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] - x[:, 1] > 0).long() + (x[:, 2] > 1).long()


def residual(steps=150):
    torch.manual_seed(0)
    x, y = data()
    return fitted(Residual(), x, y, steps)


def chain():
    torch.manual_seed(0)
    x, y = data()
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, 3))
    return fitted(model, x, y, 150)


def test_the_cut_is_exact_and_lands_after_the_last_fixed_layer():
    x, _ = data(64)
    model = residual(0)
    head = split_frozen(model, check_supported(model), le.width_mask(model, only=["head"]))
    assert "norm" in head.cut and set(head.names.values()) == {"head.weight", "head.bias"}
    assert torch.equal(head.suffix(head.features(x)), model(x))
    # width inside the residual branch: the cut goes before the branch point (the skip needs that value)
    branch = split_frozen(model, check_supported(model), le.width_mask(model, only=["skip", "head"]))
    assert "relu" in branch.cut and set(branch.names.values()) >= {"skip.weight", "inner.weight", "head.weight"}
    assert branch.prefix_parameters == 6 * 24 + 24
    assert torch.equal(branch.suffix(branch.features(x)), model(x))
    # nothing to cache: the first layer carries width, or no mask fixes anything
    assert split_frozen(model, check_supported(model), le.width_mask(model, only=["stem"])) is None
    assert split_frozen(model, check_supported(model), {}) is None

    seq = chain()
    cut = split_frozen(seq, check_supported(seq), le.width_mask(seq, only=["3"]))
    assert cut.cut == "after layer '2.1' (ReLU)" and cut.names == {"0.weight": "3.weight", "0.bias": "3.bias"}
    assert isinstance(cut.suffix, nn.Sequential)  # chains keep the chain engine
    assert torch.equal(cut.suffix(cut.features(x)), seq(x))


@settings(max_examples=25, deadline=None)
@given(st.sets(st.sampled_from(BLOCKS), min_size=1))
def test_any_partial_domain_cuts_into_prefix_and_suffix_that_compose_to_the_model(wide):
    model = residual(0)
    x, _ = data(32, seed=1)
    cut = split_frozen(model, check_supported(model), le.width_mask(model, only=sorted(wide)))
    if cut is None:
        assert "stem" in wide  # only a model whose first layer has width has nothing to cache
        return
    assert torch.equal(cut.suffix(cut.features(x)), model(x))
    # every parameter with width is in the suffix, under its own name, as the model's own tensor
    named = dict(model.named_parameters())
    assert {n for n in named if n.split(".")[0] in wide} <= set(cut.names.values())
    assert all(p is named[cut.names[n]] for n, p in cut.suffix.named_parameters())
    assert not {id(p) for p in cut.prefix.parameters()} & {id(p) for p in cut.suffix.parameters()}


def _counting(monkeypatch) -> dict[int, int]:
    """Count, per module (by identity), how often the bound engine bounds a Linear layer (graph and chain engines)."""
    calls: dict[int, int] = {}

    def counting(inner):
        def counted(ctx, path, m, x):
            calls[id(m)] = calls.get(id(m), 0) + 1
            return inner(ctx, path, m, x)
        return counted

    monkeypatch.setitem(registry.MODULES, nn.Linear, counting(registry.MODULES[nn.Linear]))
    monkeypatch.setitem(ibp._HANDLERS, nn.Linear, counting(ibp._HANDLERS[nn.Linear]))
    return calls


@pytest.mark.parametrize("build,only,first", [(residual, ["head"], "stem"), (residual, ["skip", "head"], "stem"),
                                              (chain, ["3"], "0")])
def test_the_search_bounds_the_prefix_only_to_certify_and_finds_the_same_lid(monkeypatch, tmp_path, build, only, first):
    model = build()
    x, y = data()
    cx, cy = data(300, seed=5)
    tau = le.accuracy(model, x, y) - 0.05
    mask = le.width_mask(model, only=only)
    kw = dict(cert_x=cx, cert_y=cy, mask=mask, iterations=30, checkpoints=3, progress=False, keep="all")
    calls = _counting(monkeypatch)
    cached = le.compute_lid(model, x, y, tau, **kw)
    with_cache = dict(calls)
    calls.clear()
    plain = le.compute_lid(model, x, y, tau, prefix_cache=False, **kw)
    # without the cache the stem is bounded on every search pass; with it, only by the certificates
    stem = id(model.get_submodule(first))
    assert calls[stem] >= 30 > with_cache[stem]
    assert cached.search_config["prefix_cache"]["prefix_parameters"] > 0
    assert plain.search_config["prefix_cache"] is None
    # same domain (up to float noise of the search), over the whole model, prefix at zero width
    assert cached.width_sum() == pytest.approx(plain.width_sum(), rel=0.02)
    for a, b in zip(cached, plain):
        assert a.names == b.names == [n for n, _ in model.named_parameters()]
        for n in a.names:
            if n.split(".")[0] not in only:
                assert torch.equal(a.lower[n], a.upper[n])
    assert cached.width_sum()[0] > 0
    # the certificates are of the whole model: verify recomputes them from scratch
    assert le.verify(cached.save(tmp_path / "lid"), model, cx, cy).ok
