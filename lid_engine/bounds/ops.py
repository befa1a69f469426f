"""Bounds of the operations a traced model may use (registered in ``registry``).

Every handler returns element-wise bounds that hold for every parameter vector in the domain. In
certify mode each also covers floating-point rounding — of our own bound computation *and* of a
float evaluation of the model at any parameter vector of the domain — with an a-priori bound:

* **+, −, ×, ÷ and √** are correctly rounded (IEEE 754-2019 §5.4.1): the exact result lies within
  half an ulp of the float one, so one ulp outward (``registry.outward``) encloses it.
* **sums, means and matrix products** of ``n`` terms: Higham's γ_n bound (``rounding.widen``).
* **exp, erf, tanh, sigmoid** are not correctly rounded. The libraries torch uses document their
  maximum errors: SLEEF's vectorised u10 functions ≤ 1.0 ulp (sleef.org), glibc ≤ 2–3 ulp for
  expf/erff/tanhf ("Known Maximum Errors in Math Functions", glibc manual §19.7), CUDA ≤ 2 ulp for
  expf/erff/tanhf (CUDA C++ Programming Guide, "Mathematical Functions", Table 13). A sigmoid
  computed as 1/(1 + e^−x) adds two roundings. We allow :data:`FUNCTION_ULPS` ulps for one
  evaluation (ours) plus as many for the forward pass, relative to the result (GELU's error is
  bounded absolutely: its docstring), plus twice the smallest normal number — not a subnormal:
  vectorised kernels may flush tiny results to zero (found by the sampling test of softmax).

Non-monotone activations (GELU, SiLU) are quasi-convex: decreasing then increasing, so the maximum
over an interval is at an end and the minimum is at an end or at the known minimiser.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedLayerError
from .. import numerics as rounding
from .registry import (
    BoundContext,
    Bounds,
    from_stacked,
    interval_mul,
    outward,
    outward_stacked,
    register_function,
    register_module,
    stacked,
    widen_relative,
)

FUNCTION_ULPS = 8.0  # per evaluation of exp/erf/tanh/sigmoid: ≥ 2× every documented maximum (module docstring)


class OpError(UnsupportedLayerError):
    """An op's arguments are not what its bound supports (raised with the op's name added)."""


def as_bounds(ctx: BoundContext, v) -> Bounds:
    """A number, a constant tensor or Bounds as Bounds in the context's dtype and device."""
    if isinstance(v, Bounds):
        return v
    if isinstance(v, (int, float, bool)) or isinstance(v, Tensor):
        t = torch.as_tensor(v, dtype=ctx.dtype, device=ctx.device)
        return Bounds.exact(t, nonneg=bool((t >= 0).all()))
    raise OpError(f"expected a tensor or a number, got {type(v).__name__}")


def _rounded(ctx: BoundContext, lo: Tensor, hi: Tensor, nonneg: bool = False) -> Bounds:
    """Bounds of one correctly rounded operation: outward by one ulp in certify mode."""
    if ctx.certify:
        lo, hi = outward(lo, hi)
    return Bounds(lo, hi, nonneg=nonneg)


# ------------------------------------------------------------------------ arithmetic
@register_function(operator.add, torch.add, "add", operator.iadd)
def _add(ctx: BoundContext, a, b, *, alpha=1, out=None) -> Bounds:
    if alpha != 1:
        b = _mul(ctx, b, alpha)
    a, b = as_bounds(ctx, a), as_bounds(ctx, b)
    za, zb = stacked(a), stacked(b)
    if za is not None and zb is not None and za.shape == zb.shape:  # both bounds in one op (a residual sum)
        z = za + zb
        return from_stacked(outward_stacked(z) if ctx.certify else z, nonneg=a.nonneg and b.nonneg)
    return _rounded(ctx, a.lo + b.lo, a.hi + b.hi, nonneg=a.nonneg and b.nonneg)


@register_function(operator.sub, torch.sub, "sub", operator.isub)
def _sub(ctx: BoundContext, a, b, *, alpha=1, out=None) -> Bounds:
    if alpha != 1:
        b = _mul(ctx, b, alpha)
    a, b = as_bounds(ctx, a), as_bounds(ctx, b)
    return _rounded(ctx, a.lo - b.hi, a.hi - b.lo)


@register_function(operator.neg, torch.neg, "neg")
def _neg(ctx: BoundContext, a) -> Bounds:
    a = as_bounds(ctx, a)
    return Bounds.exact(-a.lo) if a.point else Bounds(-a.hi, -a.lo)  # exact in floating point


@register_function(operator.mul, torch.mul, "mul", operator.imul)
def _mul(ctx: BoundContext, a, b) -> Bounds:
    a, b = as_bounds(ctx, a), as_bounds(ctx, b)
    lo, hi = interval_mul(a.lo, a.hi, b.lo, b.hi)
    return _rounded(ctx, lo, hi, nonneg=a.nonneg and b.nonneg)


@register_function(operator.truediv, torch.div, "div", torch.true_divide)
def _div(ctx: BoundContext, a, b, *, rounding_mode=None) -> Bounds:
    if rounding_mode is not None:
        raise OpError(f"division with rounding_mode={rounding_mode!r} is not supported")
    a, b = as_bounds(ctx, a), as_bounds(ctx, b)
    if not bool(((b.lo > 0) | (b.hi < 0)).all()):
        raise OpError("the divisor's bounds contain zero: the quotient is unbounded over the domain")
    q = torch.stack(torch.broadcast_tensors(a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi))
    return _rounded(ctx, q.min(0).values, q.max(0).values)


# ------------------------------------------------------------------------ reductions and products
def _reduce_dims(x: Bounds, dim) -> tuple[list[int], int]:
    dims = list(range(x.lo.dim())) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    n = math.prod(x.shape[d] for d in dims)
    return dims, n


def _reduce(ctx: BoundContext, x, dim, keepdim: bool, mean: bool) -> Bounds:
    x = as_bounds(ctx, x)
    dims, n = _reduce_dims(x, dim)
    fn = torch.mean if mean else torch.sum
    lo, hi = fn(x.lo, dims, keepdim=keepdim), fn(x.hi, dims, keepdim=keepdim)
    if not ctx.certify:
        return Bounds(lo, hi, nonneg=x.nonneg)
    mag = fn(torch.maximum(x.lo.abs(), x.hi.abs()), dims, keepdim=keepdim)
    lo, hi = rounding.widen(lo, hi, mag, n + 1)  # n − 1 additions and the division
    return Bounds(lo, hi)


@register_function(torch.mean, "mean")
def _mean(ctx: BoundContext, x, dim=None, keepdim: bool = False, *, dtype=None) -> Bounds:
    return _reduce(ctx, x, dim, keepdim, mean=True)


@register_function(torch.sum, "sum")
def _sum(ctx: BoundContext, x, dim=None, keepdim: bool = False, *, dtype=None) -> Bounds:
    return _reduce(ctx, x, dim, keepdim, mean=False)


def matmul_bounds(ctx: BoundContext, a: Bounds, b: Bounds) -> Bounds:
    """``a @ b`` for every pair of values in the bounds (both may vary): Rump's midpoint–radius
    product, |centre − a·b| ≤ |a_mid|·b_rad + a_rad·|b_mid| + a_rad·b_rad, rounded with γ_{n+3}
    (one n-term product per term, three terms summed) against the magnitude (|a_mid| + a_rad)(|b_mid| + b_rad)."""
    split = rounding.midpoint_radius if ctx.certify else (lambda lo, hi: ((lo + hi) / 2, (hi - lo) / 2))
    n = a.shape[-1]
    if a.point and b.point:
        centre, radius = a.lo @ b.lo, None
        mag = a.lo.abs() @ b.lo.abs() if ctx.certify else None
    elif a.point:
        bm, br = split(b.lo, b.hi)
        centre, radius = a.lo @ bm, a.lo.abs() @ br
        mag = a.lo.abs() @ (bm.abs() + br) if ctx.certify else None
    elif b.point:
        am, ar = split(a.lo, a.hi)
        centre, radius = am @ b.lo, ar @ b.lo.abs()
        mag = (am.abs() + ar) @ b.lo.abs() if ctx.certify else None
    else:
        am, ar = split(a.lo, a.hi)
        bm, br = split(b.lo, b.hi)
        centre = am @ bm
        radius = am.abs() @ br + ar @ (bm.abs() + br)
        mag = (am.abs() + ar) @ (bm.abs() + br) if ctx.certify else None
    lo, hi = (centre, centre) if radius is None else (centre - radius, centre + radius)
    if ctx.certify:
        lo, hi = rounding.widen(lo, hi, mag, n + 3)
    return Bounds(lo, hi)


@register_function(torch.matmul, operator.matmul, "matmul")
def _matmul(ctx: BoundContext, a, b) -> Bounds:
    a, b = as_bounds(ctx, a), as_bounds(ctx, b)
    if a.lo.dim() < 2 or b.lo.dim() < 2:
        raise OpError(f"matmul of shapes {tuple(a.shape)} and {tuple(b.shape)}: both operands need ≥ 2 dimensions")
    return matmul_bounds(ctx, a, b)


@register_function(F.linear)
def _f_linear(ctx: BoundContext, x, weight, bias=None) -> Bounds:
    out = matmul_bounds(ctx, as_bounds(ctx, x), as_bounds(ctx, weight).map(lambda t: t.transpose(0, 1)))
    return out if bias is None else _add(ctx, out, bias)


# ------------------------------------------------------------------------ shape operations (exact)
def _exact_shape(fn):
    def handler(ctx: BoundContext, x, *args, **kwargs):
        x = as_bounds(ctx, x)
        return x.map(lambda t: fn(t, *args, **kwargs))
    handler.rearranges = True  # graph.py skips its overflow check: the input was checked
    return handler


for _names, _fn in (
    ((torch.flatten, "flatten"), torch.flatten),
    (("view",), lambda t, *s: t.view(*s)),
    ((torch.reshape, "reshape"), lambda t, *s: t.reshape(*s)),
    ((torch.permute, "permute"), lambda t, *d: t.permute(*d)),
    ((torch.transpose, "transpose"), torch.transpose),
    (("contiguous",), lambda t, *a, **k: t.contiguous()),
    ((torch.unsqueeze, "unsqueeze"), torch.unsqueeze),
    ((torch.squeeze, "squeeze"), torch.squeeze),
    ((operator.getitem,), operator.getitem),
    ((F.dropout,), lambda t, p=0.5, training=False, inplace=False: _eval_dropout(t, p, training)),
):
    register_function(*_names)(_exact_shape(_fn))


def _eval_dropout(t: Tensor, p: float, training: bool) -> Tensor:
    if training and p > 0:
        raise OpError("F.dropout with training=True changes the output at random; call model.eval()")
    return t


@register_function(torch.cat, torch.concat)
def _cat(ctx: BoundContext, tensors: Sequence, dim: int = 0) -> Bounds:
    parts = [as_bounds(ctx, t) for t in tensors]
    if all(p.point for p in parts):
        return Bounds.exact(torch.cat([p.lo for p in parts], dim), all(p.nonneg for p in parts))
    return Bounds(torch.cat([p.lo for p in parts], dim), torch.cat([p.hi for p in parts], dim),
                  nonneg=all(p.nonneg for p in parts))


@register_function("size")
def _size(ctx: BoundContext, x, dim=None):
    x = as_bounds(ctx, x)
    return x.lo.size() if dim is None else x.lo.size(dim)


@register_function(getattr)
def _getattr(ctx: BoundContext, x, name: str):
    if name in ("shape", "ndim", "dtype", "device") and isinstance(x, Bounds):
        return getattr(x.lo, name)
    raise OpError(f"attribute '{name}' of a traced tensor is not supported (only shape, ndim, dtype, device)")


# ------------------------------------------------------------------------ activations
@register_function(F.relu, torch.relu, "relu")
def _relu_fn(ctx: BoundContext, x, inplace: bool = False) -> Bounds:
    x = as_bounds(ctx, x)
    z = stacked(x)
    if z is not None:  # both bounds in one op
        return from_stacked(torch.relu(z), nonneg=True)
    out = x.map(torch.relu)  # exact in floating point
    out.nonneg = True
    return out


def _monotone(ctx: BoundContext, x, fn) -> Bounds:
    """An increasing function evaluated at both ends, widened for its evaluation error (certify)."""
    x = as_bounds(ctx, x)
    lo, hi = fn(x.lo), fn(x.hi)
    if ctx.certify:
        lo, hi = widen_relative(lo, hi, 2 * FUNCTION_ULPS)
    return Bounds(lo, hi)


@register_function(torch.tanh, F.tanh, "tanh")
def _tanh(ctx: BoundContext, x) -> Bounds:
    return _monotone(ctx, x, torch.tanh)


@register_function(torch.sigmoid, F.sigmoid, "sigmoid")
def _sigmoid(ctx: BoundContext, x) -> Bounds:
    out = _monotone(ctx, x, torch.sigmoid)
    out.nonneg = not ctx.certify or bool((out.lo >= 0).all())
    return out


def _argmin(f, a: float, b: float) -> float:
    """Golden-section search for the minimiser of a unimodal ``f`` on [a, b] (float64)."""
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if f(c) < f(d) else (c, b)
    return (a + b) / 2


def _gelu64(v: float) -> float:
    return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))


def _silu64(v: float) -> float:
    return v / (1 + math.exp(-v))


GELU_ARGMIN = _argmin(_gelu64, -2.0, 0.0)
SILU_ARGMIN = _argmin(_silu64, -3.0, 0.0)
# lower bounds on the minima, 1e-12 below the float64 evaluation (whose error is ~1e-16)
GELU_MIN = _gelu64(GELU_ARGMIN) - 1e-12
SILU_MIN = _silu64(SILU_ARGMIN) - 1e-12


def _quasiconvex(ctx: BoundContext, x, fn, argmin: float, minimum: float, abs_ulps: bool) -> Bounds:
    x = as_bounds(ctx, x)
    fl, fh = fn(x.lo), fn(x.hi)
    lo, hi = torch.minimum(fl, fh), torch.maximum(fl, fh)
    inside = (x.lo < argmin) & (x.hi > argmin)
    lo = torch.where(inside, torch.full_like(lo, minimum), lo)
    if not ctx.certify:
        return Bounds(lo, hi)
    if abs_ulps:  # error bounded by c·u·|x| (GELU: _gelu docstring)
        u, floor = rounding.unit_roundoff(lo.dtype), 2 * rounding.smallest_normal(lo.dtype)
        slack = rounding.round_up(torch.maximum(x.lo.abs(), x.hi.abs()) * (4 * FUNCTION_ULPS * u) + floor)
        return Bounds(rounding.round_down(lo - slack), rounding.round_up(hi + slack))
    return Bounds(*widen_relative(lo, hi, 2 * FUNCTION_ULPS + 4))


@register_function(F.gelu)
def _gelu(ctx: BoundContext, x, approximate: str = "none") -> Bounds:
    """GELU(x) = x·Φ(x) = ½x(1 + erf(x/√2)). Float error: x/√2 (u), erf (≤ 2 ulp, and its input's
    error moves it by at most erf′(t)·|t|·u ≤ 0.49u), 1 + erf (u), the product with x (u): in total at
    most ½|x|·(1 + erf)(3u) + ½|x|(2·2u + 0.49u) ≤ 6u·|x| per evaluation; we allow 4·FUNCTION_ULPS·u·|x|
    (32u·|x|) for ours and the forward's together, plus twice the smallest normal number."""
    if approximate != "none":
        raise OpError(f"GELU(approximate={approximate!r}) is not supported; use approximate='none'")
    return _quasiconvex(ctx, x, F.gelu, GELU_ARGMIN, GELU_MIN, abs_ulps=True)


@register_function(F.silu)
def _silu(ctx: BoundContext, x, inplace: bool = False) -> Bounds:
    """SiLU(x) = x·σ(x): σ's error (≤ FUNCTION_ULPS) and one product, relative to the result."""
    return _quasiconvex(ctx, x, F.silu, SILU_ARGMIN, SILU_MIN, abs_ulps=False)


# ------------------------------------------------------------------------ layer normalisation
def _square(lo: Tensor, hi: Tensor, dn, up) -> tuple[Tensor, Tensor]:
    """Bounds of t² for t ∈ [lo, hi] (0 below when the interval holds 0); ``dn``/``up`` round them."""
    sq_lo = torch.where(lo > 0, dn(lo * lo), torch.where(hi < 0, dn(hi * hi), torch.zeros_like(lo)))
    return sq_lo, up(torch.maximum(lo * lo, hi * hi))


def layer_norm_bounds(ctx: BoundContext, x: Bounds, shape: Sequence[int], weight: tuple[Tensor, Tensor] | None,
                      bias: tuple[Tensor, Tensor] | None, eps: float) -> Bounds:
    """LayerNorm over the last ``len(shape)`` dims: y = (x − μ)/√(σ² + ε)·γ + β.

    Real numbers: μ ∈ [mean lo, mean hi]; each x_i − μ lies in [lo_i − μ_hi, hi_i − μ_lo], so σ² (the
    mean of their squares) lies between the means of the squares' minima and maxima; then interval
    arithmetic. Certify mode rounds every step outward (means with γ_{n+1}) and adds the deviation of a
    float forward pass from the real-number output of its own parameters: the mean's error
    e_μ ≤ γ_n·mean|x|; the variance's relative error ≤ 2(n + 4)u·(1 + μ²/σ²) (two-pass and Welford
    algorithms — torch's CPU and CUDA kernels are Welford — Chan, Golub & LeVeque 1983; the one-pass
    E[x²] − μ² formula is not covered); so |ẑ − z| ≤ (e_μ + u|x − μ|)·s + |z|·((n + 4)u(1 + μ²/σ²) + 4u)
    with s = 1/√(σ² + ε), and |ŷ − y| ≤ |γ|·|ẑ − z| + 4u(|γz| + |β|)."""
    dims = tuple(range(-len(shape), 0))
    n = math.prod(shape)
    cert = ctx.certify
    dn, up = (rounding.round_down, rounding.round_up) if cert else (lambda t: t, lambda t: t)
    mu = _reduce(ctx, x, dims, True, mean=True)
    d_lo, d_hi = dn(x.lo - mu.hi), up(x.hi - mu.lo)
    sq_lo, sq_hi = _square(d_lo, d_hi, dn, up)
    var = _reduce(ctx, Bounds(sq_lo, sq_hi, nonneg=True), dims, True, mean=True)
    var_lo = var.lo.clamp(min=0)  # σ² ≥ 0: a sound tightening of a rounded-down mean of non-negatives
    s_lo = dn(1 / up(torch.sqrt(up(var.hi + eps))))
    s_hi = up(1 / dn(torch.sqrt(dn(var_lo + eps))))
    z_lo, z_hi = interval_mul(d_lo, d_hi, s_lo, s_hi)
    z_lo, z_hi = dn(z_lo), up(z_hi)
    if weight is not None:
        z_lo, z_hi = interval_mul(z_lo, z_hi, *weight)
        z_lo, z_hi = dn(z_lo), up(z_hi)
    if bias is not None:
        z_lo, z_hi = dn(z_lo + bias[0]), up(z_hi + bias[1])
    if not cert:
        return Bounds(z_lo, z_hi)
    u, eta = rounding.unit_roundoff(x.lo.dtype), rounding.eta(x.lo.dtype)
    xmag = torch.maximum(x.lo.abs(), x.hi.abs())
    e_mu = xmag.mean(dims, keepdim=True) * rounding.gamma(n + 1, x.lo.dtype) * 1.01
    mu_mag = torch.maximum(mu.lo.abs(), mu.hi.abs())
    kappa = 1 + mu_mag * mu_mag / (var_lo + eps)
    dmag = torch.maximum(d_lo.abs(), d_hi.abs())
    zmag = dmag * s_hi
    dz = (e_mu + u * dmag) * s_hi + zmag * ((n + 4) * u * kappa + 4 * u)
    gmag = torch.maximum(weight[0].abs(), weight[1].abs()) if weight is not None else torch.ones_like(zmag)
    bmag = torch.maximum(bias[0].abs(), bias[1].abs()) if bias is not None else torch.zeros_like(zmag)
    slack = up(up(gmag * dz + 4 * u * (gmag * zmag + bmag)) * 1.01 + 8 * eta)
    if not bool(torch.isfinite(slack).all()):
        raise OpError("LayerNorm: the rounding bound overflowed (σ² + ε underflows for some row)")
    return Bounds(dn(z_lo - slack), up(z_hi + slack))


@register_function(F.layer_norm)
def _f_layer_norm(ctx: BoundContext, x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Bounds:
    x = as_bounds(ctx, x)
    w = (as_bounds(ctx, weight).lo, as_bounds(ctx, weight).hi) if weight is not None else None
    b = (as_bounds(ctx, bias).lo, as_bounds(ctx, bias).hi) if bias is not None else None
    return layer_norm_bounds(ctx, x, tuple(normalized_shape), w, b, eps)


@register_module(nn.LayerNorm)
def _layer_norm(ctx: BoundContext, path: str, m: nn.LayerNorm, x) -> Bounds:
    x = as_bounds(ctx, x)
    if tuple(x.shape[-len(m.normalized_shape):]) != tuple(m.normalized_shape):
        raise OpError(f"expects inputs ending in {tuple(m.normalized_shape)}, got {tuple(x.shape)}")
    w = ctx.parameter(path, "weight") if m.weight is not None else None
    b = ctx.parameter(path, "bias") if m.bias is not None else None
    return layer_norm_bounds(ctx, x, tuple(m.normalized_shape), w, b, m.eps)


# ------------------------------------------------------------------------ activation modules
register_module(nn.Tanh, lambda ctx, path, m, x: _tanh(ctx, x))
register_module(nn.Sigmoid, lambda ctx, path, m, x: _sigmoid(ctx, x))
register_module(nn.SiLU, lambda ctx, path, m, x: _silu(ctx, x))
register_module(nn.GELU, lambda ctx, path, m, x: _gelu(ctx, x, m.approximate))


# ------------------------------------------------------------------------ softmax and attention
def _lse_others(v: Tensor, dim: int) -> Tensor:
    """log Σ_{j≠i} exp(v_j) along ``dim``, for every i (−inf where there is no other j), in O(n) memory.

    With m the row's maximum and S = Σ_j e^{v_j − m} (≥ 1): for i other than the arg-max,
    Σ_{j≠i} = S − e^{v_i − m} ≥ 1 (the maximum's term stays), so the subtraction loses at most
    n·(n + FUNCTION_ULPS)·u relatively; for the arg-max the sum is formed without it, around the second
    largest value."""
    v = v.movedim(dim, -1)
    m = v.amax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(v - m_safe)
    total = e.sum(-1, keepdim=True)
    # ≥ 1 except at the arg-max, which is replaced below; the floor keeps log and its gradient finite
    # there (a log(0) under the replaced entry would turn the search's gradient into NaN)
    others = torch.log((total - e).clamp(min=torch.finfo(v.dtype).tiny)) + m_safe
    top = v.argmax(-1, keepdim=True)
    rest = v.scatter(-1, top, -torch.inf)
    without_top = torch.logsumexp(rest, -1, keepdim=True)
    out = others.scatter(-1, top, without_top)
    return out.movedim(-1, dim)


def softmax_bounds(ctx: BoundContext, x: Bounds, dim: int) -> Bounds:
    """softmax_i(z) = σ(z_i − log Σ_{j≠i} e^{z_j}) rises with z_i and falls with every other z_j, so
    lo_i = σ(lo_i − LSE_{j≠i}(hi)) and hi_i = σ(hi_i − LSE_{j≠i}(lo)).

    Certify mode: the computed LSE is off by at most (n + 1)(n + 16)u + 8u·|LSE| (n exps of ≤
    FUNCTION_ULPS each, their sum, the subtraction of one term from a sum ≥ 1 that is ≤ n, the log and the
    final addition: ``_lse_others``), the difference by u·|t|; σ's relative
    sensitivity to its argument is 1 − σ ≤ 1, and σ itself adds FUNCTION_ULPS. A float forward pass
    (exp(z − max)/Σ, or a blockwise online softmax) is within (n + 2·FUNCTION_ULPS + 4)u of the
    result, relatively. Both are added as a relative widening per element; the results are then
    clamped to [0, 1], where every softmax value lies."""
    dim = dim % x.lo.dim()
    n = x.shape[dim]
    lse_hi, lse_lo = _lse_others(x.hi, dim), _lse_others(x.lo, dim)
    t_lo, t_hi = x.lo - lse_hi, x.hi - lse_lo
    lo, hi = torch.sigmoid(t_lo), torch.sigmoid(t_hi)
    if ctx.certify:
        u, floor = rounding.unit_roundoff(lo.dtype), 2 * rounding.smallest_normal(lo.dtype)

        def rel(t: Tensor, lse: Tensor) -> Tensor:
            # ±inf (a masked key, or no other key) gives σ exactly 0 or 1, in the forward pass too
            e_t = (n + 1) * (n + 16) * u + 8 * u * lse.abs().nan_to_num(posinf=0.0) + u * t.abs().nan_to_num(posinf=0.0)
            return (e_t + (n + 3 * FUNCTION_ULPS + 4) * u) * 1.01
        lo = rounding.round_down(lo - rounding.round_up(lo * rel(t_lo, lse_hi) + floor))
        hi = rounding.round_up(hi + rounding.round_up(hi * rel(t_hi, lse_lo) + floor))
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise OpError("softmax: the rounding bound overflowed (inputs of magnitude beyond the float range)")
    return Bounds(lo.clamp(min=0, max=1), hi.clamp(min=0, max=1), nonneg=True)


@register_function(F.softmax, torch.softmax, "softmax")
def _softmax(ctx: BoundContext, x, dim=None, _stacklevel: int = 3, dtype=None) -> Bounds:
    if dim is None:
        raise OpError("softmax needs an explicit dim")
    if dtype is not None:
        raise OpError("softmax(dtype=...) is not supported; cast the model instead")
    return softmax_bounds(ctx, as_bounds(ctx, x), dim)


register_module(nn.Softmax, lambda ctx, path, m, x: softmax_bounds(ctx, as_bounds(ctx, x), m.dim if m.dim is not None else -1))


@register_function(F.scaled_dot_product_attention)
def _sdpa(ctx: BoundContext, q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
          scale=None, enable_gqa: bool = False) -> Bounds:
    """softmax(q·kᵀ·scale + mask)·v, each step bounded as above (the products of two interval
    matrices: ``matmul_bounds``). A boolean mask removes keys (−inf scores, which every softmax bound
    handles exactly); a float mask is added."""
    if dropout_p:
        raise OpError("scaled_dot_product_attention with dropout_p > 0 is random; call model.eval() and pass 0")
    if enable_gqa:
        raise OpError("scaled_dot_product_attention(enable_gqa=True) is not supported")
    q, k, v = as_bounds(ctx, q), as_bounds(ctx, k), as_bounds(ctx, v)
    s = (1.0 / math.sqrt(q.shape[-1])) if scale is None else float(scale)
    scores = matmul_bounds(ctx, q, k.map(lambda t: t.transpose(-2, -1)))
    scores = _mul(ctx, scores, s)
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=ctx.device).tril()
    if attn_mask is not None:
        m = attn_mask.lo if isinstance(attn_mask, Bounds) else torch.as_tensor(attn_mask, device=ctx.device)
        if m.dtype == torch.bool:
            scores = Bounds(scores.lo.masked_fill(~m, -torch.inf), scores.hi.masked_fill(~m, -torch.inf))
        else:
            scores = _add(ctx, scores, attn_mask)
    return matmul_bounds(ctx, softmax_bounds(ctx, scores, -1), v)


# ------------------------------------------------------------------------ embeddings
def embedding_bounds(ctx: BoundContext, ids: Bounds, weight: tuple[Tensor, Tensor]) -> Bounds:
    """Rows of the weight's bounds at fixed token ids: exact. The ids arrive as floats (the bound
    engine's input dtype), exact for integers below 2²⁴ in float32."""
    if not ids.point:
        raise OpError("embedding ids must be fixed (the model's input), not values that depend on parameters")
    t = ids.lo
    if not bool((t == t.round()).all()) or bool((t < 0).any()) or bool((t >= weight[0].shape[0]).any()):
        raise OpError(f"embedding ids must be integers in 0..{weight[0].shape[0] - 1}, got {float(t.min())}..{float(t.max())}")
    idx = t.long()
    return Bounds(weight[0][idx], weight[1][idx])


@register_module(nn.Embedding)
def _embedding(ctx: BoundContext, path: str, m: nn.Embedding, ids) -> Bounds:
    if m.max_norm is not None:
        raise OpError("nn.Embedding(max_norm=...) renormalises rows in place; it is not supported")
    return embedding_bounds(ctx, as_bounds(ctx, ids), ctx.parameter(path, "weight"))


@register_function(F.embedding)
def _f_embedding(ctx: BoundContext, ids, weight, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False) -> Bounds:
    if max_norm is not None:
        raise OpError("F.embedding(max_norm=...) is not supported")
    w = as_bounds(ctx, weight)
    return embedding_bounds(ctx, as_bounds(ctx, ids), (w.lo, w.hi))


# ------------------------------------------------------------------------ L2 normalisation
@register_function(F.normalize)
def _normalize(ctx: BoundContext, x, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None) -> Bounds:
    """x / max(‖x‖₂, eps) along ``dim``. ‖x‖² lies between the sums of the squares' minima and maxima
    over each element's interval; then interval division by a positive denominator. Certify mode rounds
    each step outward and adds the float forward's deviation: its norm is within (n/2 + 2)u relatively
    (a sum of n squares, a square root) and the division adds u, so the result is widened by
    (n + 8) units of roundoff relative to itself."""
    if p != 2:
        raise OpError(f"F.normalize(p={p}) is not supported; only p=2")
    x = as_bounds(ctx, x)
    dn, up = (rounding.round_down, rounding.round_up) if ctx.certify else (lambda t: t, lambda t: t)
    sq_lo, sq_hi = _square(x.lo, x.hi, dn, up)
    total = _reduce(ctx, Bounds(sq_lo, sq_hi, nonneg=True), dim, True, mean=False)
    # max(√t, eps) = √max(t, eps²): the floor keeps the square root's gradient finite at t = 0
    d_lo = torch.clamp(dn(torch.sqrt(total.lo.clamp(min=eps * eps))), min=eps)
    d_hi = torch.clamp(up(torch.sqrt(total.hi)), min=eps)
    q = torch.stack([x.lo / d_lo, x.lo / d_hi, x.hi / d_lo, x.hi / d_hi])
    lo, hi = dn(q.min(0).values), up(q.max(0).values)
    if ctx.certify:
        lo, hi = widen_relative(lo, hi, x.shape[dim] + 8)
    return Bounds(lo, hi)
