"""Models beyond nn.Sequential: traced graphs, new operations, the op registry.

Soundness is checked by sampling (DESIGN.md rule 2): every operation on random interval inputs
(10⁴ points inside and at the ends, float32 and float64, against the float op and, for float32, the
float64 value), whole graph models at parameter vectors inside the domain and at its vertices, and
random compositions drawn by hypothesis.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lid_engine as le
from lid_engine.bounds import ibp, registry
from lid_engine.bounds.ops import GELU_ARGMIN, GELU_MIN, SILU_ARGMIN, SILU_MIN
from lid_engine.errors import UnsupportedLayerError
from lid_engine.model_graph import ModelGraph
from lid_engine.testing import check_soundness
from tests.helpers.models import fitted

DTYPES = (torch.float32, torch.float64)
POINTS = 10_000


def ctx(dtype: torch.dtype, certify: bool = True) -> registry.BoundContext:
    return registry.BoundContext(le.Box({}, {}, check=False), certify, dtype, torch.device("cpu"))


def random_bounds(shape, dtype, gen, scale=3.0, width=0.5) -> registry.Bounds:
    centre = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    rad = torch.rand(shape, generator=gen, dtype=torch.float64) * width
    return registry.Bounds((centre - rad).to(dtype), (centre + rad).to(dtype))


def points_in(b: registry.Bounds, n: int, gen) -> torch.Tensor:
    """n points per element: uniform inside, and every 4th at an end."""
    t = torch.rand((n, *b.shape), generator=gen, dtype=torch.float64)
    t[::4] = torch.randint(0, 2, t[::4].shape, generator=gen).double()
    lo, hi = b.lo.double(), b.hi.double()
    return (lo + t * (hi - lo)).clamp(lo, hi).to(b.lo.dtype)


def assert_encloses(out: registry.Bounds, values: torch.Tensor, what: str) -> None:
    lo, hi = out.lo.to(values.dtype), out.hi.to(values.dtype)
    bad = (values < lo) | (values > hi)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} values outside the bounds, worst " \
        f"{float(torch.maximum(lo - values, values - hi).max()):.3g}"


UNARY = {
    "gelu": (F.gelu, lambda c, b: registry.FUNCTIONS[F.gelu](c, b)),
    "silu": (F.silu, lambda c, b: registry.FUNCTIONS[F.silu](c, b)),
    "tanh": (torch.tanh, lambda c, b: registry.FUNCTIONS[torch.tanh](c, b)),
    "sigmoid": (torch.sigmoid, lambda c, b: registry.FUNCTIONS[torch.sigmoid](c, b)),
    "relu": (torch.relu, lambda c, b: registry.FUNCTIONS[F.relu](c, b)),
    "mean": (lambda t: t.mean(-1, keepdim=True), lambda c, b: registry.FUNCTIONS["mean"](c, b, -1, True)),
    "sum": (lambda t: t.sum(1), lambda c, b: registry.FUNCTIONS["sum"](c, b, 1)),
    "div-const": (lambda t: t / 3.0, lambda c, b: registry.FUNCTIONS[operator.truediv](c, b, 3.0)),
    "mul-const": (lambda t: t * -0.7, lambda c, b: registry.FUNCTIONS[operator.mul](c, b, -0.7)),
    "neg": (lambda t: -t, lambda c, b: registry.FUNCTIONS[operator.neg](c, b)),
    "softmax": (lambda t: torch.softmax(t, -1), lambda c, b: registry.FUNCTIONS[F.softmax](c, b, -1)),
    "softmax-dim0": (lambda t: torch.softmax(t, 0), lambda c, b: registry.FUNCTIONS["softmax"](c, b, 0)),
    "normalize": (lambda t: F.normalize(t, dim=1), lambda c, b: registry.FUNCTIONS[F.normalize](c, b, dim=1)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(UNARY))
@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_unary_operations_enclose_every_float_and_real_value(name, scale, dtype):
    fn, handler = UNARY[name]
    gen = torch.Generator().manual_seed(hash((name, scale)) % 2**31)
    b = random_bounds((4, 6), dtype, gen, scale=scale, width=scale / 4)
    if name in ("gelu", "silu"):  # make some intervals straddle the minimiser
        argmin = GELU_ARGMIN if name == "gelu" else SILU_ARGMIN
        b.lo[0], b.hi[0] = torch.full((6,), argmin - 0.01, dtype=dtype), torch.full((6,), argmin + 0.02, dtype=dtype)
    out = handler(ctx(dtype), b)
    pts = points_in(b, POINTS // 24, gen)
    values = torch.stack([fn(p) for p in pts])
    assert_encloses(out, values, f"{name} in {dtype}")
    if dtype == torch.float32:  # the real-number value (float64 is ~10⁹× closer to it than float32)
        assert_encloses(out, torch.stack([fn(p.double()) for p in pts]), f"{name}, real values")
    search = handler(ctx(dtype, certify=False), b)
    assert bool((out.lo <= search.lo).all() and (search.hi <= out.hi).all()), "certify must contain search"


def test_gelu_and_silu_minima_are_lower_bounds():
    xs = torch.linspace(-3, 0, 200_001, dtype=torch.float64)
    assert float(F.gelu(xs).min()) >= GELU_MIN and float(F.gelu(xs).min()) - GELU_MIN < 1e-9
    assert float(F.silu(xs).min()) >= SILU_MIN and float(F.silu(xs).min()) - SILU_MIN < 1e-9


BINARY = {
    "add": (operator.add, operator.add),
    "sub": (operator.sub, operator.sub),
    "mul": (operator.mul, operator.mul),
    "div": (operator.truediv, operator.truediv),
    "matmul": (operator.matmul, operator.matmul),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(BINARY))
def test_binary_operations_of_two_varying_operands(name, dtype):
    fn, key = BINARY[name]
    gen = torch.Generator().manual_seed(len(name))
    a = random_bounds((3, 5, 7), dtype, gen)
    b = random_bounds((3, 7, 4) if name == "matmul" else (3, 5, 7), dtype, gen)
    if name == "div":  # a divisor away from zero
        b = registry.Bounds(b.lo.abs() + 1, b.lo.abs() + 1 + (b.hi - b.lo))
    out = registry.FUNCTIONS[key](ctx(dtype), a, b)
    pa, pb = points_in(a, 400, gen), points_in(b, 400, gen)
    assert_encloses(out, torch.stack([fn(x, y) for x, y in zip(pa, pb)]), f"{name} in {dtype}")
    if dtype == torch.float32:
        assert_encloses(out, torch.stack([fn(x.double(), y.double()) for x, y in zip(pa, pb)]), f"{name}, real")


def test_division_by_an_interval_holding_zero_is_refused():
    b = registry.Bounds(torch.tensor([-1.0]), torch.tensor([1.0]))
    with pytest.raises(UnsupportedLayerError, match="divisor"):
        registry.FUNCTIONS[operator.truediv](ctx(torch.float32), registry.Bounds.exact(torch.ones(1)), b)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("offset", [0.0, 50.0], ids=["centred", "large-mean"])
def test_layer_norm_encloses_float_and_real_values(dtype, offset):
    gen = torch.Generator().manual_seed(7)
    x = random_bounds((5, 16), dtype, gen, scale=2.0, width=0.05)
    x = registry.Bounds(x.lo + offset, x.hi + offset)
    g = random_bounds((16,), dtype, gen, scale=1.0, width=0.02)
    beta = random_bounds((16,), dtype, gen, scale=1.0, width=0.02)
    out = registry.FUNCTIONS[F.layer_norm](ctx(dtype), x, (16,), g, beta, 1e-5)
    pts = points_in(x, 600, gen)
    gs, bs = points_in(g, 600, gen), points_in(beta, 600, gen)
    values = torch.stack([F.layer_norm(p, (16,), w, b, 1e-5) for p, w, b in zip(pts, gs, bs)])
    assert_encloses(out, values, f"layer_norm in {dtype}")
    if dtype == torch.float32:
        real = torch.stack([F.layer_norm(p.double(), (16,), w.double(), b.double(), 1e-5) for p, w, b in zip(pts, gs, bs)])
        assert_encloses(out, real, "layer_norm, real values")
    assert float((out.hi - out.lo).max()) < 1.0, "LayerNorm bounds should stay informative for narrow inputs"


# ------------------------------------------------------------------------------------ graph models
class ResidualMLP(nn.Module):
    def __init__(self, d=8, classes=3):
        super().__init__()
        self.inp = nn.Linear(6, d)
        self.ln = nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gate = nn.Parameter(torch.full((d,), 0.5))
        self.head = nn.Linear(2 * d, classes)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.ff2(F.gelu(self.ff1(self.ln(h)))) * self.gate
        pooled = torch.sigmoid(h).mean(-1, keepdim=True)
        return self.head(torch.cat([F.silu(h), torch.tanh(h) - pooled], dim=1))


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1, self.c2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))
        return self.fc(torch.flatten(self.pool(h), 1))


class TokenMixer(nn.Module):
    """Shapes as in a transformer block: (N, L, d) tokens, a parameter matrix used via matmul,
    transpose/view/permute, mean pooling over tokens."""

    def __init__(self, tokens=4, d=6, classes=2):
        super().__init__()
        self.tokens, self.d = tokens, d
        self.w = nn.Parameter(torch.randn(d, d) * 0.3)
        self.mix = nn.Linear(tokens, tokens)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = x.view(x.shape[0], self.tokens, self.d)
        t = self.ln(t + F.gelu(t @ self.w))
        t = t + self.mix(t.transpose(1, 2)).permute(0, 2, 1) / 2
        return self.head(t.mean(1))


class TinyEncoder(nn.Module):
    """A transformer encoder block on token ids: embedding + positions, multi-head self-attention (q, k, v
    projections, scores as a product of two interval matrices, softmax), residuals, LayerNorm, a GELU
    feed-forward, masked mean pooling, a head. ``sdpa`` uses F.scaled_dot_product_attention instead."""

    def __init__(self, vocab=20, tokens=5, d=8, heads=2, classes=3, sdpa=False):
        super().__init__()
        self.tokens, self.d, self.heads, self.sdpa = tokens, d, heads, sdpa
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(tokens, d) * 0.1)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)
        self.register_buffer("keep", torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))  # the last token is padding

    def split(self, t):
        return t.view(t.shape[0], self.tokens, self.heads, self.d // self.heads).transpose(1, 2)

    def forward(self, ids):
        h = self.emb(ids) + self.pos
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-2, -1) / (self.d // self.heads) ** 0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(ids.shape[0], self.tokens, self.d)
        h = self.ln1(h + self.o(a))
        h = self.ln2(h + self.ff2(F.gelu(self.ff1(h))))
        pooled = (h * self.keep[:, None]).sum(1) / self.keep.sum()
        return self.head(pooled)


MODELS = {
    "residual-mlp": (ResidualMLP, (6,)),
    "encoder": (TinyEncoder, "ids"),
    "encoder-sdpa": (lambda: TinyEncoder(sdpa=True), "ids"),
    "residual-cnn": (ResidualCNN, (1, 8, 8)),
    "token-mixer": (TokenMixer, (24,)),
}


def trained_like(model: nn.Module) -> nn.Module:
    """Non-default BatchNorm statistics, so the running mean/var matter."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_models_are_sound_inside_the_domain_and_at_its_vertices(name):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = trained_like(cls())
    assert isinstance(ibp.check_supported(model), ModelGraph)
    x = torch.randint(0, 20, (16, 5)) if shape == "ids" else torch.randn(16, *shape)
    report = check_soundness(model, le.Box.around(model, 0.02), x, samples=1000)
    assert report.violations == 0 and report.nominal_enclosed, report


@pytest.mark.parametrize("name", list(MODELS))
def test_graph_bounds_shrink_with_the_domain_and_collapse_on_a_point(name):
    cls, shape = MODELS[name]
    torch.manual_seed(1)
    model = trained_like(cls())
    x = torch.randint(0, 20, (8, 5)) if shape == "ids" else torch.randn(8, *shape)
    widths = []
    for r in (0.02, 0.01, 0.0):
        lo, hi = le.bound_logits(model, le.Box.around(model, r), x, dtype=torch.float64)
        widths.append(hi - lo)
    assert bool((widths[1] <= widths[0]).all()) and bool((widths[2] <= widths[1]).all())
    assert float(widths[2].max()) < 1e-9  # float64 rounding slack only
    xin = x if shape == "ids" else x.double()
    with torch.no_grad():
        nominal = model.double()(xin)
    lo, hi = le.bound_logits(model, le.Box.point(model), xin, dtype=torch.float64)
    assert bool(((lo <= nominal) & (nominal <= hi)).all())


class Composed(nn.Module):
    """A random composition: each step applies one op to the running state, optionally residual."""

    def __init__(self, steps: list[tuple[str, bool]], d: int = 5):
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in steps)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in steps)
        self.scales = nn.ParameterList(nn.Parameter(torch.rand(d) + 0.5) for _ in steps)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = x
        for i, (op, residual) in enumerate(self.steps):
            if op == "linear":
                y = self.layers[i](h)
            elif op == "layernorm":
                y = self.norms[i](h)
            elif op == "scale":
                y = h * self.scales[i]
            elif op == "centre":
                y = h - h.mean(-1, keepdim=True)
            elif op == "cat-split":
                y = torch.cat([h, -h], dim=1)[:, : h.shape[1]]
            else:
                y = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                     "relu": F.relu}[op](self.layers[i](h))
            h = h + y if residual else y
        return self.head(h)


OPS = ["linear", "layernorm", "scale", "centre", "cat-split", "gelu", "silu", "tanh", "sigmoid", "relu"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.sampled_from(OPS), st.booleans()), min_size=1, max_size=5),
       seed=st.integers(0, 2**16), radius=st.sampled_from([0.0, 0.005, 0.05]))
def test_random_compositions_are_sound(steps, seed, radius):
    torch.manual_seed(seed)
    model = Composed(steps).eval()
    report = check_soundness(model, le.Box.around(model, radius), torch.randn(6, 5) * 2, samples=120, seed=seed)
    assert report.violations == 0 and report.nominal_enclosed, (steps, report)


# ------------------------------------------------------------------------------------ errors
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not a fixed graph
            return self.a(x)
        return -self.a(x)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x, mask):
        return self.a(x) * mask


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)

    def forward(self, x):
        return self.a(x), x


def test_untraceable_and_unsupported_models_are_named_with_the_users_line():
    x = torch.randn(3, 4)
    for model, needles in ((Branchy(), ["Branchy", "torch.fx", "test_graph.py", "if x.sum() > 0"]),
                           (TwoInputs(), ["several inputs", "'x'", "'mask'"]),
                           (TupleOut(), ["returns tuple", "one tensor"])):
        with pytest.raises(UnsupportedLayerError) as info:
            le.bound_logits(model, le.Box.around(model, 0.01), x)
        for n in needles:
            assert n in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------ the registry
class Affine(nn.Module):
    """A user's custom layer: y = x·s + t with its own parameters."""

    def __init__(self, d: int):
        super().__init__()
        self.s, self.t = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return x * self.s + self.t


def _affine_sound(ctx, path, m, x):
    s_lo, s_hi = ctx.parameter(path, "s")
    t_lo, t_hi = ctx.parameter(path, "t")
    lo, hi = registry.interval_mul(x.lo, x.hi, s_lo, s_hi)
    if ctx.certify:
        lo, hi = registry.outward(lo, hi)
    lo, hi = lo + t_lo, hi + t_hi
    if ctx.certify:
        lo, hi = registry.outward(lo, hi)
    return registry.Bounds(lo, hi)


def _affine_unsound(ctx, path, m, x):  # forgets the parameters' widths: a bug check_soundness must catch
    s = m.s.detach().to(ctx.dtype)
    return registry.Bounds(x.lo * s + m.t.detach().to(ctx.dtype), x.hi * s + m.t.detach().to(ctx.dtype))


@pytest.fixture
def affine_registered():
    yield
    registry.MODULES.pop(Affine, None)


def test_a_registered_custom_layer_is_kept_whole_and_checked_by_the_soundness_helper(affine_registered):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Affine(5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(10, 4)
    registry.register_module(Affine, _affine_sound)
    graph = ibp.check_supported(model)
    assert [op.module_type for op in graph.ops if op.kind == "module"] == ["Linear", "Affine", "ReLU", "Linear"]
    report = check_soundness(model, le.Box.around(model, 0.05), x, samples=400)
    assert report.violations == 0 and report.nominal_enclosed, report
    registry.register_module(Affine, _affine_unsound)
    report = check_soundness(model, le.Box.around(model, 0.05), x, samples=400)
    assert report.violations > 0, "the soundness helper must catch a handler that ignores parameter widths"


# ------------------------------------------------------------------------------------ the public API
def test_lid_search_certificate_projection_and_verify_on_a_residual_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    model = fitted(ResidualMLP(d=6, classes=2), x, y, steps=150)
    acc = le.accuracy(model, x, y)
    assert acc > 0.9
    tau = acc - 0.1
    lid = le.compute_lid(model, x[:300], y[:300], tau=tau, cert_x=x[300:], cert_y=y[300:], iterations=60,
                         checkpoints=3, progress=False)
    assert len(lid) >= 1 and lid.members[0].width_sum() > 0
    cert = lid.certificate(0)
    assert cert.certified_accuracy >= tau
    # the certificate holds at sampled parameter vectors of the member, on the certification data
    member = lid.members[0]
    gen = torch.Generator().manual_seed(3)
    for i in range(50):
        m = copy.deepcopy(model)
        le.load_parameters_(m, member.vertex(gen) if i % 2 else member.sample(gen))
        assert le.accuracy(m, x[300:], y[300:]) >= cert.certified_accuracy
    # projected training stays inside; the saved LID verifies
    tuned = copy.deepcopy(model)
    popt = le.ProjectedOptimizer(torch.optim.Adam(tuned.parameters(), 1e-2), tuned, lid)
    for _ in range(20):
        popt.zero_grad()
        F.cross_entropy(tuned(x), 1 - y).backward()
        popt.step()
    assert lid.member_index(tuned) is not None
    lid.save(tmp_path / "lid")
    report = le.verify(tmp_path / "lid", model, x[300:], y[300:])
    assert report.ok, report


class Passthrough(nn.Module):
    """Identity in the forward pass; its registered bound is exact but has an infinite derivative."""

    def forward(self, x):
        return x


def _passthrough_bound(ctx, path, m, x):
    width = x.hi - x.lo
    kink = torch.sqrt(width - width.detach())  # value 0, derivative +inf: NaN/inf in the search's gradient
    return registry.Bounds(x.lo - kink, x.hi + kink)


@pytest.fixture
def passthrough_registered():
    registry.register_module(Passthrough, _passthrough_bound)
    yield
    registry.MODULES.pop(Passthrough, None)


def test_a_bound_with_a_non_finite_gradient_does_not_break_the_search(passthrough_registered):
    torch.manual_seed(0)
    x = torch.randn(300, 4)
    y = (x[:, 0] > 0).long()
    model = fitted(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Passthrough(), nn.Linear(8, 2)), x, y, steps=100)
    tau = le.accuracy(model, x[:200], y[:200]) - 0.1
    lid = le.compute_lid(model, x[:200], y[:200], tau=tau, cert_x=x[200:], cert_y=y[200:], iterations=30,
                         checkpoints=2, progress=False)
    for member in lid.members:
        assert all(bool(torch.isfinite(member.lower[n]).all() and torch.isfinite(member.upper[n]).all())
                   for n in member.names)
    assert lid.certificate(0).certified_accuracy >= tau


# ------------------------------------------------------------------------------------ in-place ops
class InPlaceShared(nn.Module):
    """``nn.ReLU(inplace=True)`` on a value used again: eager PyTorch sees relu(h) + relu(h)."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.o = nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Linear(2, 2)

    def forward(self, x):
        h = self.a(x)
        return self.o(self.r(h) + h)


class InPlaceAlias(nn.Module):
    """``h += 3`` where ``r`` is the same tensor: eager PyTorch sees r − h = 0."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        h = self.a(x)
        r = h
        h += 3.0
        return self.o(r - h)


class InPlaceView(nn.Module):
    """An in-place ReLU on a view: it overwrites the viewed tensor, which the skip connection reads."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        v = h.view(-1, 2, 2)
        g = F.relu(v, inplace=True).flatten(1)
        return self.o(g)


class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock style: in-place ReLU and ``out += identity`` on values nothing else reads."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        identity = x
        out = self.relu(self.c1(x))
        out = self.c2(out)
        out += identity
        out = self.relu(out)
        return self.head(torch.flatten(out, 1))


@pytest.mark.parametrize("model,needle", [(InPlaceShared(), "also uses the value it overwrites"),
                                          (InPlaceAlias(), "updates a tensor in place"),
                                          (InPlaceView(), "may share memory")])
def test_in_place_ops_on_values_seen_elsewhere_are_refused(model, needle):
    with pytest.raises(UnsupportedLayerError) as info:
        le.bound_logits(model.eval(), le.Box.around(model, 0.01), torch.randn(3, model.a.in_features))
    assert needle in str(info.value) and "out of place" in str(info.value), str(info.value)


def test_in_place_ops_nothing_else_sees_are_bounded_soundly():
    torch.manual_seed(0)
    model = TorchvisionBlock().eval()
    x, y = torch.rand(6, 2, 6, 6), torch.randint(0, 3, (6,))
    box = le.Box.around(model, 0.01)
    assert check_soundness(model, box, x, samples=200).violations == 0
    assert check_soundness(model, box, x, y=y, method="linear", samples=200).violations == 0
