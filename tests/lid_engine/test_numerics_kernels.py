"""The fast certify-mode kernels keep the rounding model of ``lid_engine.numerics``.

* ``direct_conv2d`` (oneDNN's direct convolution) errs by at most γ_K·Σ|x||w| against a float64
  reference, subnormals included, and oneDNN reports the direct algorithm for it;
* ``widen``'s slack is ≥ c·Mag + k·η exactly (checked with fractions) and never wider than the
  former ``round_up(round_up(Mag·c) + k·η)`` except below the documented floor;
* ``invalid_bounds`` flags exactly NaN, infinities and lower > upper.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from lid_engine import numerics as rounding

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

SHAPES = [  # (N, C_in, H, W), (C_out, C_in/groups, k, k), stride, padding, groups: the bound pass's convolutions
    ((50, 1, 28, 28), (24, 1, 5, 5), 1, 1, 1),  # MNIST CNN layer 0, certify (W_l; W_u; |W|)
    ((20, 16, 26, 26), (3, 16, 5, 5), 1, 1, 1),  # layer 2 on the stacked interval
    ((20, 1, 28, 28), (24, 1, 3, 3), 2, 1, 1),  # residual CNN stem
    ((20, 16, 14, 14), (24, 16, 3, 3), 1, 1, 1),  # residual block on the stacked interval
    ((20, 8, 14, 14), (8, 4, 3, 3), 1, 1, 2),  # grouped
]


@needs_onednn
@pytest.mark.parametrize("scale", [1.0, 2.0**-120, 2.0**-140])
@pytest.mark.parametrize("shape", SHAPES)
def test_direct_conv_error_within_gamma_bound(shape, scale):
    xs, ws, stride, pad, groups = shape
    g = torch.Generator().manual_seed(0)
    x = torch.rand(xs, generator=g) * scale  # scale 2^-140: products and sums deep in the subnormals
    w = torch.randn(ws, generator=g)
    b = torch.randn(ws[0], generator=g) * scale
    with rounding.certification_backend():
        got = rounding.direct_conv2d(x, w, b, stride, pad, 1, groups).double()
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, pad, 1, groups)
    mag = F.conv2d(x.double().abs(), w.double().abs(), b.double().abs(), stride, pad, 1, groups)
    n = ws[1] * ws[2] * ws[3] + 1
    bound = rounding.gamma(n, torch.float32) * mag + n * rounding.eta(torch.float32)
    err = (got - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    if scale == 1.0:  # far inside: the kernel is a plain dot product, not a fast algorithm
        assert float((err / bound).max()) < 0.5


@needs_onednn
def test_direct_conv_is_onednn_direct_algorithm():
    code = ("import torch; from lid_engine import numerics as r\n"
            "with r.certification_backend():\n"
            "    r.direct_conv2d(torch.rand(8, 16, 26, 26), torch.randn(3, 16, 5, 5), None, 1, 1, 1, 1)\n"
            "    r.direct_conv2d(torch.rand(8, 1, 28, 28), torch.randn(24, 1, 3, 3), None, 2, 1, 1, 1)\n")
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ",exec," in ln and ",convolution," in ln]
    assert len(lines) >= 2, out.stdout[-2000:]
    for ln in lines:
        assert "alg:convolution_direct" in ln and "wino" not in ln, ln
        assert "bf16" not in ln and "tf32" not in ln, ln


@needs_onednn
@pytest.mark.parametrize("variable", ["ONEDNN_DEFAULT_FPMATH_MODE", "DNNL_DEFAULT_FPMATH_MODE"])
def test_a_bf16_math_mode_in_the_environment_keeps_certificates_sound(variable):
    """oneDNN reads its default math mode from the environment, past torch's precision switches; on a CPU
    with bf16 units (AMX, AVX512-BF16) the "direct" kernel then rounds operands to bf16 (1360 of 2048
    outputs outside the bounds before the guard). Certification must take another kernel."""
    code = ("import torch, lid_engine as le\n"
            "from lid_engine import numerics as r\n"
            "torch.manual_seed(0)\n"
            "assert not r.direct_conv_available(torch.zeros(1))\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(64, 8, 3, padding=1), torch.nn.Flatten()).eval()\n"
            "x = torch.rand(4, 64, 8, 8)\n"
            "lo, hi = le.bound_logits(m, le.Box.point(m), x)\n"  # float32 certify mode
            "with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):\n"  # IEEE forwards: what is certified
            "    refs = [m(x), m.double()(x.double()).float()]\n"
            "for ref in refs:\n"
            "    assert bool(((lo <= ref) & (ref <= hi)).all()), float(torch.maximum(lo - ref, ref - hi).max())\n")
    env = dict(os.environ, **{variable: "BF16"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_terms", [1, 26, 401, 100_000])
def test_widen_slack_covers_c_mag_plus_k_eta(dtype, n_terms):
    c, k = rounding.slack_coefficients(n_terms, dtype)
    e, u = rounding.eta(dtype), rounding.unit_roundoff(dtype)
    tiny = torch.finfo(dtype).tiny
    mag = torch.tensor([0.0, e, 7 * e, tiny, 1e-35, 1e-30, 1e-20, 1e-8, 1.0, 3.7, 1e20, 1e30], dtype=dtype)
    mag = torch.cat([mag, torch.rand(200, dtype=dtype) * 10.0 ** torch.randint(-38, 30, (200,), dtype=dtype)])
    lo = torch.zeros_like(mag)
    new_lo, new_hi = rounding.widen(lo, lo, mag, n_terms)
    stacked = rounding.widen_stacked(lo[:, None], lo[:, None], mag[:, None], n_terms)
    assert torch.equal(stacked[:, 0], new_lo) and torch.equal(stacked[:, 1], new_hi)
    t = 2.0 ** math.ceil(math.log2(k * e / (2 * u)))
    inf = torch.tensor(math.inf, dtype=dtype)
    old = torch.nextafter(torch.nextafter(mag * c, inf) + k * e, inf)  # the former slack …
    old = torch.nextafter(lo + old, inf)  # … and the former upper bound
    for m, s_new, s_old in zip(mag.tolist(), new_hi.tolist(), old.tolist()):  # lo = hi = 0: bound = slack
        assert Fraction(s_new) >= Fraction(c) * Fraction(m) + Fraction(k) * Fraction(e)
        if m * c >= t:
            assert s_new <= s_old  # never wider than before
        else:
            assert s_new <= 2 * t + 2 * k * e  # the documented floor
    assert torch.equal(-new_lo, new_hi)


def test_invalid_bounds():
    T = lambda *v: torch.tensor(v)  # noqa: E731
    inf, nan = math.inf, math.nan
    cases = [((0., 1.), (1., 2.), False), ((0., 1.), (1., 0.5), True), ((0., -inf), (1., 2.), True),
             ((0., 1.), (1., inf), True), ((inf, 1.), (inf, 2.), True), ((0., nan), (1., 2.), True),
             ((0., 1.), (nan, 2.), True), ((-3e38, 0.), (3e38, 1.), False), ((-inf, 0.), (-inf, 1.), True)]
    for lo, hi, bad in cases:
        assert bool(rounding.invalid_bounds(T(*lo), T(*hi))) == bad, (lo, hi)
    assert not rounding.invalid_bounds(T(1., 2.)) and rounding.invalid_bounds(T(1., nan))
    assert rounding.invalid_bounds(T(inf, 1.)) and not rounding.invalid_bounds(torch.zeros(0), torch.zeros(0))


def test_native_kernels_restores_switches():
    C = torch._C
    before = (C._get_mkldnn_enabled(), C._get_cudnn_enabled(), C._get_nnpack_enabled())
    with rounding.certification_backend():
        assert not C._get_mkldnn_enabled() and not C._get_nnpack_enabled()
        if hasattr(torch.backends.mkldnn, "conv"):
            assert torch.backends.mkldnn.conv.fp32_precision == "ieee"
    with rounding.native_kernels():
        assert not C._get_mkldnn_enabled() and C._get_nnpack_enabled()
    assert (C._get_mkldnn_enabled(), C._get_cudnn_enabled(), C._get_nnpack_enabled()) == before
