"""The fast paths of the IBP engine compute the numbers of the general ones (exact comparisons).

* the block weight written with ``out=`` equals the ``cat`` of clamps;
* the point-input Linear head over row chunks equals the whole-batch products in search mode;
* search-mode BatchNorm over the stacked interval equals ``interval_mul`` on each bound;
* certify-mode BatchNorm over the stacked interval equals the general path bit for bit where the
  slack is a normal number, and encloses it everywhere (tiny inputs included);
* a stacked residual sum (``ops._add``) equals the per-bound sums, rounded outward in certify mode.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lid_engine import numerics as rounding
from lid_engine.bounds import ibp, registry
from lid_engine.bounds import ops
from lid_engine.domains import Box


def _interval(n: int, c: int, hw: int, scale: float, g: torch.Generator, dtype=torch.float32) -> ibp.Interval:
    lo = torch.randn(n, c, hw, hw, generator=g, dtype=dtype) * scale
    hi = lo + torch.rand(n, c, hw, hw, generator=g, dtype=dtype) * scale
    lo[0, 0, 0, 0] = hi[0, 0, 0, 0] = 0.0  # a zero-width zero
    return ibp.Interval(torch.cat([lo, hi], 1))


def test_block_weight_out_equals_cat():
    g = torch.Generator().manual_seed(0)
    wl = torch.randn(5, 3, 3, 3, generator=g)
    wu = wl + torch.rand(5, 3, 3, 3, generator=g)
    with torch.no_grad():
        fast = ibp._block_weight(wl, wu)
    slow = ibp._block_weight(wl.clone().requires_grad_(), wu).detach()  # the autograd (cat) path
    assert torch.equal(fast, slow)
    assert torch.equal(fast, torch.cat([torch.cat([wl.clamp(min=0), wl.clamp(max=0)], 1),
                                        torch.cat([wu.clamp(max=0), wu.clamp(min=0)], 1)]))


def test_point_linear_chunks_equal_whole_batch():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 2))
    x = torch.randn(3 * (ibp._CHUNK_BYTES // (64 * 4)) + 7, 64, generator=g)  # several chunks and a short one
    box = Box.around(model, 1e-2)
    with torch.no_grad():
        lo, hi = ibp.propagate(model, box, x, certify=False, nonneg=False)
        wl, wu = box.lower["0.weight"], box.upper["0.weight"]
        bl, bu = box.lower["0.bias"], box.upper["0.bias"]
        wm, wr, bm, br = (wl + wu) / 2, (wu - wl) / 2, (bl + bu) / 2, (bu - bl) / 2
        centre, radius = ibp._linear_op(x, wm) + bm, ibp._linear_op(x.abs(), wr) + br
    assert torch.equal(lo, centre - radius) and torch.equal(hi, centre + radius)
    # with autograd the chunks are concatenated instead: the same numbers
    gbox = Box({k: v.clone().requires_grad_() for k, v in box.lower.items()},
               {k: v.clone().requires_grad_() for k, v in box.upper.items()}, check=False)
    glo, ghi = ibp.propagate(model, gbox, x, certify=False, nonneg=False)
    assert torch.equal(glo.detach(), lo) and torch.equal(ghi.detach(), hi)


def _bn(c: int, g: torch.Generator, dtype=torch.float32) -> tuple[nn.BatchNorm2d, Box]:
    m = nn.BatchNorm2d(c).to(dtype).eval()
    m.running_mean.copy_(torch.randn(c, generator=g, dtype=dtype))
    m.running_var.copy_(0.1 + torch.rand(c, generator=g, dtype=dtype))
    with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=dtype))
        m.bias.copy_(torch.randn(c, generator=g, dtype=dtype))
    return m, Box.around(nn.Sequential(m), 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batchnorm_search_stacked_equals_interval_mul(dtype):
    g = torch.Generator().manual_seed(2)
    m, box = _bn(6, g, dtype)
    x = _interval(7, 6, 5, 1.0, g, dtype)
    ctx = ibp._Ctx(box, False, dtype, torch.device("cpu"))
    with torch.no_grad():
        got = ibp._batchnorm(ctx, "0", m, x).z
    shape = (1, -1, 1, 1)
    mean, inv = m.running_mean.reshape(shape), torch.rsqrt(m.running_var + m.eps).reshape(shape)
    gl, gu = (t.reshape(shape) for t in ctx.bounds("0", "weight"))
    bl, bu = (t.reshape(shape) for t in ctx.bounds("0", "bias"))
    yl, yh = registry.interval_mul((x.lo - mean) * inv, (x.hi - mean) * inv, gl, gu)
    assert torch.equal(got, torch.cat([yl + bl, yh + bu], 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e3, 2.0**-100, 2.0**-140])
def test_batchnorm_certify_stacked_matches_general_path(dtype, scale):
    g = torch.Generator().manual_seed(3)
    m, box = _bn(6, g, dtype)
    if scale < 1:  # tiny activations around a zero mean: the slack floor regime
        m.running_mean.zero_()
        with torch.no_grad():
            m.bias.zero_()
        box = Box.around(nn.Sequential(m), 0.0)
    x = _interval(7, 6, 5, scale, g, dtype)
    ctx = ibp._Ctx(box, True, dtype, torch.device("cpu"))
    with torch.no_grad():
        fast = ibp._batchnorm(ctx, "0", m, x).z
    with torch.enable_grad():  # an input that requires grad takes the general path
        slow = ibp._batchnorm(ctx, "0", m, ibp.Interval(x.z.clone().requires_grad_())).z.detach()
    c = fast.shape[1] // 2
    f_lo, f_hi, s_lo, s_hi = fast[:, :c], fast[:, c:], slow[:, :c], slow[:, c:]
    assert bool((f_lo <= s_lo).all()) and bool((f_hi >= s_hi).all())  # encloses the general path
    if scale >= 1:  # normal slacks: the same numbers
        assert torch.equal(fast, slow)


@pytest.mark.parametrize("certify", [False, True])
def test_stacked_add_equals_per_bound_sums(certify):
    g = torch.Generator().manual_seed(4)
    a, b = (_interval(3, 4, 5, 1.0, g) for _ in range(2))
    ctx = registry.BoundContext(Box({}, {}, check=False), certify, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        got = ops._add(ctx, registry.from_stacked(a.z), registry.from_stacked(b.z))
    assert registry.stacked(got) is not None
    lo, hi = a.lo + b.lo, a.hi + b.hi
    if certify:
        lo, hi = rounding.round_down(lo), rounding.round_up(hi)
    assert torch.equal(got.lo, lo) and torch.equal(got.hi, hi)


def test_stacked_is_read_from_the_layout():
    z = torch.arange(24.0).reshape(2, 4, 3).clone()  # not a view itself
    assert registry.stacked(registry.from_stacked(z)) is z
    lo, hi = z.chunk(2, 1)
    assert registry.stacked(registry.Bounds(hi, lo)) is None  # swapped halves are not a stacked interval
    assert registry.stacked(registry.Bounds(lo.clone(), hi.clone())) is None


@pytest.mark.parametrize("kernel,stride,padding,shape", [
    (2, None, 0, (3, 4, 14, 14)), (3, 3, 0, (2, 2, 9, 12)), ((2, 3), (2, 3), 0, (2, 3, 8, 9)),
    (2, 2, 0, (2, 3, 7, 8)), (2, 1, 0, (2, 3, 6, 6)), (2, 2, 1, (2, 3, 6, 6)),  # the last three: torch's kernel
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_avg_pool_by_views_equals_torch(kernel, stride, padding, shape, dtype):
    g = torch.Generator().manual_seed(5)
    t = torch.randn(shape, generator=g, dtype=dtype) * torch.logspace(-30, 30, shape[-1], dtype=dtype)
    m = nn.AvgPool2d(kernel, stride, padding)
    assert torch.equal(ibp._avg_pool(m, t), m(t))
