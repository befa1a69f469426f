"""Interval bound propagation over a *parameter* box, with the input held fixed.

Each layer maps an input interval [lo, hi] (the activations of all parameter vectors in the box)
to an output interval. Three cases are told apart because they differ in cost and tightness:

* **point input** (the model's input, unchanged by exact parameter-free layers): for a
  non-negative x the set ``{W x : W ∈ [W_l, W_u]}`` is exactly ``[W_l x, W_u x]``; for a general x
  it is ``W_mid x ± W_rad |x|``. No interval arithmetic on x.
* **non-negative interval** (after ReLU): the exact interval product
  ``lo = W_l⁺ x_l + W_l⁻ x_u``, ``hi = W_u⁺ x_u + W_u⁻ x_l`` (7–12% tighter than midpoint–radius).
* **general interval**: Rump's midpoint–radius product
  ``W_mid x_mid ± (|W_mid| x_rad + W_rad (|x_mid| + x_rad))``.

Intervals are kept *stacked*: one tensor whose channel/feature axis (dim 1) holds the lower bounds
followed by the upper bounds. An affine layer is then a single matmul/convolution against the block
weight ``[[W_l⁺, W_l⁻], [W_u⁻, W_u⁺]]``, and ReLU/pooling run once on both bounds — this is what
keeps a bound pass within a small multiple of the nominal forward pass.

``certify=True`` additionally widens every affine layer by an a-priori rounding bound
(``lid_engine/numerics.py``; the magnitude it needs is one more product of non-negative operands) and rounds
outward, so the result encloses the real-number outputs and those of any float evaluation;
``certify=False`` (search mode) skips that and stays differentiable for the LID search.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..domains import Box
from ..errors import UnsoundBoundError, UnsupportedLayerError
from ..layers import TaskMask
from ..model_graph import ModelGraph
from ..model_walk import is_chain, iter_layers, param_name
from .. import numerics as rounding
from . import registry
from .graph import propagate_graph, trace_supported

SUPPORTED_LAYERS = (
    "Linear, Conv2d, ReLU, Flatten, BatchNorm1d/BatchNorm2d (eval mode), AvgPool2d, MaxPool2d, "
    "Dropout (eval mode), Identity, lid_engine.TaskMask, nested nn.Sequential"
)


@dataclass
class Interval:
    """Activations of every parameter vector in the box.

    ``z`` stacks lower then upper bounds along dim 1; for a point (``point=True``) ``z`` is the
    exact value itself, unstacked.
    """

    z: Tensor
    point: bool = False
    nonneg: bool = False  # lo ≥ 0 holds exactly

    @property
    def lo(self) -> Tensor:
        return self.z if self.point else self.z.chunk(2, dim=1)[0]

    @property
    def hi(self) -> Tensor:
        return self.z if self.point else self.z.chunk(2, dim=1)[1]


def _stacked(lo: Tensor, hi: Tensor, nonneg: bool = False) -> Interval:
    return Interval(torch.cat([lo, hi], dim=1), nonneg=nonneg)


def _point(t: Tensor, nonneg: bool = False) -> Interval:
    return Interval(t, point=True, nonneg=nonneg)


@dataclass
class _Ctx:
    box: Box
    certify: bool
    dtype: torch.dtype
    device: torch.device
    # the chain walk without a record: an interval state (never the input point) is a fresh tensor that
    # only the next layer reads, so element-wise layers may update it in place
    owned: bool = False

    def bounds(self, path: str, attr: str) -> tuple[Tensor, Tensor]:
        name = param_name(path, attr)
        return (self.box.lower[name].to(self.device, self.dtype), self.box.upper[name].to(self.device, self.dtype))


# --------------------------------------------------------------------------------------- affine
@dataclass
class _Affine:
    """A bilinear layer ``op(x, W) + b``: matmul (Linear) or convolution (Conv2d)."""

    op: Callable[..., Tensor]  # op(input, weight, bias=None)
    n_terms: int  # length of each dot product
    bias_shape: tuple[int, ...]  # how a (out,) bias broadcasts against op's output
    can_stack: bool  # whether block weights along dim 0/1 express several products at once


def _affine(ctx: _Ctx, x: Interval, w: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor] | None, a: _Affine) -> Interval:
    wl, wu = w
    bl, bu = b if b is not None else (None, None)
    if x.nonneg and a.can_stack:
        return _affine_nonneg(ctx, x, wl, wu, bl, bu, a)
    if x.nonneg:  # grouped convolution: same exact product, one call per block
        return _affine_nonneg_split(ctx, x, wl, wu, bl, bu, a)
    return _affine_midrad(ctx, x, wl, wu, bl, bu, a)


def _affine_nonneg(ctx, x: Interval, wl, wu, bl, bu, a: _Affine) -> Interval:
    """Exact interval product for non-negative inputs, as one stacked product.

    Certifying, the magnitude ``max(|W_l|, |W_u|)·x_u`` is a second, smaller product where the layer has
    ``_SPLIT_MAG_OUT`` outputs or more: as a third block row it would multiply zeros against x_l, and
    give a convolution 3/2 the output channels, which oneDNN's direct kernel runs in blocks of 8/16
    channels. With fewer outputs (a block anyway) it stays one product of three block rows."""
    mag_weight = torch.maximum(wl.abs(), wu.abs()) if ctx.certify else None
    mag_bias = torch.maximum(bl.abs(), bu.abs()) if ctx.certify and bl is not None else None
    one_product = ctx.certify and wl.shape[0] < _SPLIT_MAG_OUT
    if x.point:  # x ≥ 0 fixed: the extreme weights are simply W_l and W_u
        weight = torch.cat([wl, wu] + ([mag_weight] if one_product else []), dim=0)
        terms = a.n_terms + 1
    else:
        weight = _block_weight(wl, wu)
        if one_product:
            weight = torch.cat([weight, torch.cat([torch.zeros_like(wl), mag_weight], 1)])
        terms = a.n_terms + 2  # two n-term products summed, plus the bias
    bias = None if bl is None else torch.cat([bl, bu] + ([mag_bias] if one_product else []))
    out = a.op(x.z, weight, bias)
    if not ctx.certify:
        return Interval(out)
    if one_product:
        lo, hi, mag = out.chunk(3, dim=1)
    else:
        # Mag ≥ |W_l⁺|x_l + |W_l⁻|x_u and |W_u⁺|x_u + |W_u⁻|x_l, as 0 ≤ x_l ≤ x_u: a product of non-negative
        # operands of at most ``terms`` terms, so the slack's (1 − u)(1 − γ) allowance covers its rounding
        lo, hi = out.chunk(2, dim=1)
        mag = a.op(x.hi, mag_weight, mag_bias)
    return Interval(rounding.widen_stacked(lo, hi, mag, terms))


_SPLIT_MAG_OUT = 8  # see _affine_nonneg


def _block_weight(wl: Tensor, wu: Tensor) -> Tensor:
    """``[[W_l⁺, W_l⁻], [W_u⁻, W_u⁺]]``: the weight that multiplies a stacked non-negative interval
    ``[x_l | x_u]``.

    Without autograd the blocks are written straight into one buffer (``out=``) instead of four
    clamped copies joined by three concatenations: on a 1024×1024 layer that is one pass over the 16 MB
    block instead of three (the same numbers: a clamp is exact)."""
    if torch.is_grad_enabled() and (wl.requires_grad or wu.requires_grad):  # out= records no gradient
        return torch.cat([torch.cat([wl.clamp(min=0), wl.clamp(max=0)], 1),
                          torch.cat([wu.clamp(max=0), wu.clamp(min=0)], 1)], dim=0)
    o, i = wl.shape[0], wl.shape[1]
    w = wl.new_empty((2 * o, 2 * i, *wl.shape[2:]))
    torch.clamp(wl, min=0, out=w[:o, :i])
    torch.clamp(wl, max=0, out=w[:o, i:])
    torch.clamp(wu, max=0, out=w[o:, :i])
    torch.clamp(wu, min=0, out=w[o:, i:])
    return w


def _affine_nonneg_split(ctx, x: Interval, wl, wu, bl, bu, a: _Affine) -> Interval:
    xl, xu = x.lo, x.hi
    lo = a.op(xl, wl.clamp(min=0)) + a.op(xu, wl.clamp(max=0))
    hi = a.op(xu, wu.clamp(min=0)) + a.op(xl, wu.clamp(max=0))
    if bl is not None:
        lo, hi = lo + bl.reshape(a.bias_shape), hi + bu.reshape(a.bias_shape)
    if ctx.certify:
        mag = a.op(xu, torch.maximum(wl.abs(), wu.abs()))
        if bl is not None:
            mag = mag + torch.maximum(bl.abs(), bu.abs()).reshape(a.bias_shape)
        return Interval(rounding.widen_stacked(lo, hi, mag, a.n_terms + 2))
    return _stacked(lo, hi)


def _affine_midrad(ctx, x: Interval, wl, wu, bl, bu, a: _Affine) -> Interval:
    """Rump's midpoint–radius product for inputs of either sign (for a point input, whatever its
    sign, ``W_mid x ± W_rad |x|`` is the exact set in real arithmetic)."""
    split = rounding.midpoint_radius if ctx.certify else (lambda l, u: ((l + u) / 2, (u - l) / 2))
    wm, wr = split(wl, wu)
    bm, br = split(bl, bu) if bl is not None else (None, None)
    bias_shape = a.bias_shape
    few = a.op is _linear_op and _few_outputs(x.z, wm)
    if x.point and ctx.certify and a.can_stack:
        # radius and magnitude share the input |x|: one product against [W_rad; |W_mid| + W_rad]
        rad_w, rad_b = torch.cat([wr, wm.abs() + wr]), None if bl is None else torch.cat([br, bm.abs() + br])
        if few:
            centre, rad_mag = _point_linear_few(x.z, wm, bm, rad_w, rad_b)
        else:
            centre, rad_mag = a.op(x.z, wm, bm), a.op(x.z.abs(), rad_w, rad_b)
        radius, mag = rad_mag.chunk(2, dim=1)
        bm = None  # the biases are inside the products
    elif x.point and few and not ctx.certify:
        centre, radius = _point_linear_few(x.z, wm, None, wr, None)
        mag = None
    elif x.point:
        xabs = x.z.abs()
        centre, radius = a.op(x.z, wm), a.op(xabs, wr)
        mag = a.op(xabs, wm.abs() + wr) if ctx.certify else None
    else:
        xm, xr = split(x.lo, x.hi)
        xmag = xm.abs() + xr
        centre = a.op(xm, wm)
        radius = a.op(xr, wm.abs()) + a.op(xmag, wr)
        mag = a.op(xmag, wm.abs() + wr) if ctx.certify else None
    if ctx.certify:
        if bm is not None:
            centre, radius = centre + bm.reshape(bias_shape), radius + br.reshape(bias_shape)
            if mag is not None:
                mag = mag + (bm.abs() + br).reshape(bias_shape)
        # centre: n products + bias; radius: two n-term products + two additions
        return Interval(rounding.widen_stacked(centre - radius, centre + radius, mag, a.n_terms + 2))
    if bm is not None:  # in place: the products are fresh tensors that nothing else holds
        centre, radius = centre.add_(bm.reshape(bias_shape)), radius.add_(br.reshape(bias_shape))
    return _centre_radius(centre, radius)


def _centre_radius(centre: Tensor, radius: Tensor) -> Interval:
    """``[centre − radius | centre + radius]`` stacked along dim 1, written straight into one
    buffer when no gradient is recorded (the same numbers as ``cat``, one pass fewer)."""
    if torch.is_grad_enabled() and (centre.requires_grad or radius.requires_grad):
        return _stacked(centre - radius, centre + radius)
    o = centre.shape[1]
    out = centre.new_empty((centre.shape[0], 2 * o, *centre.shape[2:]))
    torch.sub(centre, radius, out=out[:, :o])
    torch.add(centre, radius, out=out[:, o:])
    return Interval(out)


_CHUNK_BYTES = 3 << 19  # rows of x per chunk in _point_linear_few: 1.5 MiB, so x and |x| of a chunk stay in L2


def _few_outputs(t: Tensor, w: Tensor) -> bool:
    """Whether ``_linear_op`` takes the ``(W tᵀ)ᵀ`` orientation: a CPU matrix against at most 3 outputs."""
    return t.dim() == 2 and w.shape[0] <= 3 and t.device.type == "cpu"


def _point_linear_few(x: Tensor, w_x: Tensor, b_x: Tensor | None, w_abs: Tensor, b_abs: Tensor | None):
    """``(x·w_xᵀ + b_x, |x|·w_absᵀ + b_abs)`` for a Linear layer with few outputs (a small head),
    over row chunks of ``x`` of ``_CHUNK_BYTES``.

    With a few outputs each product only streams ``x`` once, so the cost is memory traffic: the
    whole-batch form writes ``|x|`` to memory and reads it back (4096×384 at 2 threads: 0.44 ms against
    0.30 ms chunked, where a chunk's ``x`` and ``|x|`` stay in cache). Every output is still one BLAS
    dot product of ``in_features`` terms plus the bias (``_linear_op``), so the rounding model is the
    same."""
    rows = max(1, _CHUNK_BYTES // (x.shape[1] * x.element_size()))
    if x.shape[0] <= rows:
        return _linear_op(x, w_x, b_x), _linear_op(x.abs(), w_abs, b_abs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_x, b_x, w_abs, b_abs)):
        parts = [(_linear_op(xs, w_x, b_x), _linear_op(xs.abs(), w_abs, b_abs)) for xs in x.split(rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n = x.shape[0]
    out_x, out_abs = x.new_empty((w_x.shape[0], n)), x.new_empty((w_abs.shape[0], n))
    buf = x.new_empty((rows, x.shape[1]))
    for s in range(0, n, rows):
        xs = x[s:s + rows]
        xa = torch.abs(xs, out=buf[:len(xs)])
        for t, w, b, out in ((xs, w_x, b_x, out_x), (xa, w_abs, b_abs, out_abs)):
            if b is None:
                torch.mm(w, t.t(), out=out[:, s:s + len(xs)])
            else:
                torch.addmm(b.unsqueeze(1), w, t.t(), out=out[:, s:s + len(xs)])
    return out_x.t(), out_abs.t()


def _linear_op(t: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, computed as ``(W tᵀ)ᵀ`` when W has at most 3 rows: MKL's sgemm is ~2× faster in
    that orientation for a few outputs (4096×384 input, 2 outputs: 0.22 ms against 0.41 ms on this
    CPU), which matters for a small head where the product only streams the input once. Either way
    every output is one BLAS dot product of ``in_features`` terms plus the bias: the same rounding
    model (``numerics``)."""
    if t.dim() == 2 and w.shape[0] <= 3 and t.device.type == "cpu":
        if bias is None:
            return torch.mm(w, t.t()).t()
        return torch.addmm(bias.unsqueeze(1), w, t.t()).t()
    return F.linear(t, w, bias)


def _linear(ctx: _Ctx, path: str, m: nn.Linear, x: Interval) -> Interval:
    width = x.z.shape[-1] if x.point else x.z.shape[-1] // 2
    if x.z.dim() != 2 or width != m.in_features:
        raise UnsupportedLayerError(
            f"layer '{path}' (Linear) expects inputs of shape (N, {m.in_features}), got "
            f"{tuple(x.lo.shape)}; add nn.Flatten() before it"
        )
    w = ctx.bounds(path, "weight")
    b = ctx.bounds(path, "bias") if m.bias is not None else None
    spec = _Affine(_linear_op, m.in_features, (1, -1), can_stack=True)
    return _affine(ctx, x, w, b, spec)


# Search-mode convolutions with at least this many output channels (rows of the stacked weight) run on
# oneDNN's direct kernel, the rest on torch's native path (NNPACK). Measured on this CPU at 1 thread:
# a 1→16-channel stride-2 stem 0.9 ms against 2.4 ms (NNPACK), a 16→16 block 2.8 ms against 4.6 ms, a
# 1→16 5×5 layer 12 ms against 13.5 ms; but a 16→2 layer 17 ms against 9.6 ms (oneDNN pads the
# output channels to blocks of 8 or 16).
_ONEDNN_MIN_OUT = 8


def _conv2d(ctx: _Ctx, path: str, m: nn.Conv2d, x: Interval) -> Interval:
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"layer '{path}' (Conv2d): padding_mode={m.padding_mode!r}; only 'zeros' is supported")
    if x.lo.dim() != 4 or x.lo.shape[1] != m.in_channels:
        raise UnsupportedLayerError(
            f"layer '{path}' (Conv2d) expects inputs of shape (N, {m.in_channels}, H, W), got {tuple(x.lo.shape)}"
        )
    w = ctx.bounds(path, "weight")
    b = ctx.bounds(path, "bias") if m.bias is not None else None

    direct = rounding.direct_conv_available(x.z) and not isinstance(m.padding, str)

    def op(t: Tensor, wt: Tensor, bias: Tensor | None = None) -> Tensor:
        if direct and (ctx.certify or wt.shape[0] >= _ONEDNN_MIN_OUT):
            # certification: oneDNN's direct convolution, plain dot products (rounding.direct_conv2d);
            # search: the same kernel where it beats NNPACK (``_ONEDNN_MIN_OUT``)
            return rounding.direct_conv2d(t, wt, bias, m.stride, m.padding, m.dilation, m.groups)
        # search: native kernels (NNPACK where torch picks it); certification elsewhere (float64, CUDA):
        # rounding.certification_backend() has switched oneDNN, NNPACK and cuDNN off, leaving torch's
        # im2col + gemm kernel (slow_conv2d): plain dot products.
        return F.conv2d(t, wt, bias, m.stride, m.padding, m.dilation, m.groups)

    n_terms = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    spec = _Affine(op, n_terms, (1, -1, 1, 1), can_stack=m.groups == 1)
    return _affine(ctx, x, w, b, spec)


# --------------------------------------------------------------------------------------- elementwise
def _batchnorm(ctx: _Ctx, path: str, m: nn.modules.batchnorm._BatchNorm, x: Interval) -> Interval:
    if m.training:
        raise UnsupportedLayerError(
            f"layer '{path}' ({type(m).__name__}) is in training mode; call model.eval() — batch "
            "statistics depend on the batch, so only eval-mode BatchNorm has a fixed meaning"
        )
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedLayerError(f"layer '{path}' ({type(m).__name__}) has no running statistics (track_running_stats=False)")
    if not bool((m.running_var + m.eps > 0).all()):
        raise UnsupportedLayerError(
            f"layer '{path}' ({type(m).__name__}): running_var + eps must be positive, got a minimum of "
            f"{float((m.running_var + m.eps).min()):.3g}"
        )
    xl, xh = x.lo, x.hi
    shape = (1, -1) + (1,) * (xl.dim() - 2)
    mean = m.running_mean.to(ctx.device, ctx.dtype).reshape(shape)
    inv_std = torch.rsqrt(m.running_var.to(ctx.device, ctx.dtype) + m.eps).reshape(shape)
    if m.affine:
        gl, gu = (t.reshape(shape) for t in ctx.bounds(path, "weight"))
        bl, bu = (t.reshape(shape) for t in ctx.bounds(path, "bias"))
    else:
        gl = gu = torch.ones_like(mean)
        bl = bu = torch.zeros_like(mean)
    if not ctx.certify:
        if not x.point and bool((gl >= 0).all()):
            return _batchnorm_stacked(x.z, mean, inv_std, gl, gu, bl, bu)
        yl, yh = registry.interval_mul((xl - mean) * inv_std, (xh - mean) * inv_std, gl, gu)
        return _stacked(yl + bl, yh + bu)
    # Certification: interval arithmetic rounded outward op by op. 1/sqrt gets a generous 16-ulp
    # enclosure so that any reasonable float implementation of the forward pass is covered.
    u = rounding.unit_roundoff(ctx.dtype)
    dn, up = rounding.round_down, rounding.round_up
    s_lo, s_hi = dn(inv_std * (1 - 16 * u)), up(inv_std * (1 + 16 * u))
    if (not x.point and bool((gl >= 0).all())
            and not (torch.is_grad_enabled() and any(v.requires_grad for v in (x.z, gl, gu, bl, bu)))):
        return _batchnorm_certify_stacked(x.z, mean, s_lo, s_hi, gl, gu, bl, bu)
    al, ah = dn(xl - mean), up(xh - mean)
    zl = dn(torch.minimum(al * s_lo, al * s_hi))
    zh = up(torch.maximum(ah * s_lo, ah * s_hi))
    yl, yh = registry.interval_mul(zl, zh, gl, gu)
    yl, yh = dn(dn(yl) + bl), up(up(yh) + bu)
    # A float forward may associate differently ((x·γs) + (β − μγs)); cover that deviation too.
    mag = (torch.maximum(xl.abs(), xh.abs()) + mean.abs()) * s_hi * torch.maximum(gl.abs(), gu.abs())
    mag = mag + torch.maximum(bl.abs(), bu.abs())
    slack = up(up(mag * (8 * u)) + 8 * rounding.eta(ctx.dtype))
    return _stacked(dn(yl - slack), up(yh + slack))


def _batchnorm_stacked(z: Tensor, mean: Tensor, inv_std: Tensor, gl: Tensor, gu: Tensor, bl: Tensor,
                       bu: Tensor) -> Interval:
    """Search-mode BatchNorm over the stacked interval ``z`` = [x_l | x_u] when γ ≥ 0 (``gl ≥ 0``): the
    same numbers as ``interval_mul`` on each bound, in 7 passes over ``z`` of which 5 update a fresh
    tensor in place (on the CPU an in-place pass costs about a third of one into another buffer).

    With t = (x − μ)·s, the products t·γ over t ∈ [t_l, t_h], γ ∈ [γ_l, γ_u] ⊂ [0, ∞) are lowest at
    t_l and highest at t_h (in floating point too: rounding is monotone, and t_l ≤ t_h), so
    lo = min(t_l·γ_l, t_l·γ_u) and hi = max(t_h·γ_l, t_h·γ_u), the four-corner minimum and maximum.
    Both halves are one ``maximum`` after negating the lower half's factors (negation is exact):
    lo = −max(−t_l·γ_l, −t_l·γ_u)."""
    shape = mean.shape
    grad = torch.is_grad_enabled() and any(v.requires_grad for v in (z, gl, gu, bl, bu))
    t = z - torch.cat([mean, mean], 1)
    t.mul_(torch.cat([inv_std, inv_std], 1))
    a = t * torch.cat([-gl.expand(shape), gl.expand(shape)], 1)
    gu2 = torch.cat([-gu.expand(shape), gu.expand(shape)], 1)
    if grad:  # autograd keeps t and both products for the backward pass: no reuse
        m = torch.maximum(a, t * gu2)
    else:
        m = torch.maximum(a, t.mul_(gu2), out=a)
    m.mul_(torch.cat([-torch.ones_like(mean), torch.ones_like(mean)], 1))
    return Interval(m.add_(torch.cat([bl.expand(shape), bu.expand(shape)], 1)))


def _batchnorm_certify_stacked(z: Tensor, mean: Tensor, s_lo: Tensor, s_hi: Tensor, gl: Tensor, gu: Tensor,
                               bl: Tensor, bu: Tensor) -> Interval:
    """Certify-mode BatchNorm over the stacked interval ``z`` = [x_l | x_u] when γ ≥ 0 (``gl ≥ 0``): the
    numbers of ``_batchnorm``'s general path, in fewer passes (most of them in place, no gradient).

    It works on ``v = [−lo | hi]``, in which every bound of the general path is an *upper* bound:
    round-to-nearest is symmetric, so fl(−a ∘ b) = −fl(a ∘ b) for ∘ ∈ {+, ·}, ``round_down(a) =
    −round_up(−a)`` and ``min(a, b) = −max(−a, −b)``. Each step of the general path then is one
    operation over both halves followed by one ``nextafter`` towards +∞:

    * ``[−a_l | a_h] = up(v + [μ | −μ])`` (a_l = round_down(x_l − μ), a_h = round_up(x_h − μ));
    * ``[−z_l | z_h] = up(max(v·s_lo, v·s_hi))`` (the minimum/maximum over s ∈ [s_lo, s_hi]);
    * ``[−y_l | y_h] = up(max(v·γ_l, v·γ_u))``: for γ ≥ 0 and z_l ≤ z_h the four-corner minimum of
      ``interval_mul`` is min(z_l·γ_l, z_l·γ_u) and its maximum max(z_h·γ_l, z_h·γ_u), also after
      rounding (monotone); then ``up(v + [−β_l | β_u])``;
    * the slack from ``Mag`` (same operations as the general path), ``up(v + slack)``, then ``v``
      times ``[−1 | 1]``.

    The one difference: ``slack = round_up(round_up(Mag·8u) + 8η)`` becomes
    ``numerics.add_eta_up_(round_up(Mag·8u), 8)`` ≥ that sum (never a subnormal add per element), which
    is never wider than the general path's slack where ``Mag·8u`` is a normal number (test)."""
    n, c = z.shape[0], z.shape[1] // 2
    rest = z.shape[2:]
    u = rounding.unit_roundoff(z.dtype)
    up = z.new_full((), math.inf)

    def pair(a: Tensor, b: Tensor) -> Tensor:  # per-channel (1, C, 1…) → (1, 2, C, 1…) against the halves
        return torch.stack([a.expand(mean.shape), b.expand(mean.shape)], 1)

    def per_half(a: Tensor) -> Tensor:  # (1, C, 1…) → (1, 1, C, 1…): the same for both halves
        return a.expand(mean.shape).unsqueeze(1)

    halves = z.reshape(n, 2, c, *rest)
    sign = pair(-torch.ones_like(mean), torch.ones_like(mean))
    mag = halves.abs().amax(1)  # max(|x_l|, |x_h|)
    v = halves * sign
    v.add_(pair(mean, -mean))
    torch.nextafter(v, up, out=v)
    a = v * per_half(s_lo)
    torch.maximum(a, v.mul_(per_half(s_hi)), out=a)
    torch.nextafter(a, up, out=a)
    out = z.new_empty(z.shape)  # contiguous, not a view: the graph engine finds it from its halves' base
    b = torch.mul(a, per_half(gl), out=out.view(n, 2, c, *rest))
    torch.maximum(b, a.mul_(per_half(gu)), out=b)
    torch.nextafter(b, up, out=b)
    b.add_(pair(-bl, bu))
    torch.nextafter(b, up, out=b)
    # A float forward may associate differently ((x·γs) + (β − μγs)); cover that deviation too.
    mag.add_(mean.abs()).mul_(s_hi).mul_(torch.maximum(gl.abs(), gu.abs())).add_(torch.maximum(bl.abs(), bu.abs()))
    mag.mul_(8 * u)
    torch.nextafter(mag, up, out=mag)
    b.add_(rounding.add_eta_up_(mag, 8).unsqueeze(1))
    torch.nextafter(b, up, out=b)
    b.mul_(sign)
    return Interval(out)


def _avgpool(ctx: _Ctx, path: str, m: nn.AvgPool2d, x: Interval) -> Interval:
    z = _avg_pool(m, x.z)  # positive averaging weights: monotone, and per channel so stacking is kept
    if not ctx.certify:
        return Interval(z, point=x.point, nonneg=x.nonneg)
    ks = m.kernel_size
    k = ks * ks if isinstance(ks, int) else ks[0] * ks[1]
    if x.point:
        lo = hi = z
        mag = _avg_pool(m, x.z.abs())
    else:
        lo, hi = z.chunk(2, dim=1)
        mag = _avg_pool(m, torch.maximum(x.lo.abs(), x.hi.abs()))
    return _stacked(*rounding.widen(lo, hi, mag, k + 1), nonneg=x.nonneg)


def _avg_pool(m: nn.AvgPool2d, t: Tensor) -> Tensor:
    """``m(t)``; for non-overlapping windows that tile ``t`` exactly (kernel = stride, no padding), as
    sums of strided views: the same numbers as torch's CPU kernel, which adds a window's entries one by
    one, row by row, into a float accumulator and divides by the window size, but ~3× faster on the
    bound pass's (N, 2C, 14, 14) activations (its NCHW kernel walks one output at a time)."""
    kh, kw = (m.kernel_size, m.kernel_size) if isinstance(m.kernel_size, int) else m.kernel_size
    stride = m.stride if m.stride is not None else m.kernel_size
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    pad = m.padding if isinstance(m.padding, int) else max(m.padding)
    if (t.dim() != 4 or t.device.type != "cpu" or not t.is_contiguous() or (kh, kw) != (sh, sw) or pad != 0
            or m.divisor_override is not None or kh * kw < 2 or t.shape[2] % kh or t.shape[3] % kw):
        return m(t)
    n, c, h, w = t.shape
    v = t.view(n, c, h // kh, kh, w // kw, kw)
    windows = [v[:, :, :, i, :, j] for i in range(kh) for j in range(kw)]
    total = windows[0] + windows[1]
    for part in windows[2:]:
        total += part
    return total.div_(kh * kw)


def _monotone_exact(ctx: _Ctx, path: str, m: nn.Module, x: Interval) -> Interval:
    """Per-channel, monotone and exact in floating point (MaxPool2d): apply to both bounds at once."""
    if getattr(m, "return_indices", False):
        raise UnsupportedLayerError(f"layer '{path}' ({type(m).__name__}): return_indices=True is not supported")
    return Interval(m(x.z), point=x.point, nonneg=x.nonneg)


def _relu(ctx: _Ctx, path: str, m: nn.ReLU, x: Interval) -> Interval:
    if getattr(ctx, "owned", False) and not x.point:  # in place: nothing else reads the previous state
        return Interval(torch.relu_(x.z), nonneg=True)  # (autograd saves ReLU's result, not its input)
    return Interval(torch.relu(x.z), point=x.point, nonneg=True)  # exact in floating point


def _flatten(ctx: _Ctx, path: str, m: nn.Flatten, x: Interval) -> Interval:
    if x.point:
        return _point(m(x.z), x.nonneg)
    if m.start_dim == 1 and m.end_dim == -1:
        return Interval(m(x.z), nonneg=x.nonneg)  # (N, 2C, H, W) → (N, 2CHW) keeps lo | hi order
    return _stacked(m(x.lo), m(x.hi), nonneg=x.nonneg)


def _identity(ctx: _Ctx, path: str, m: nn.Module, x: Interval) -> Interval:
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        raise UnsupportedLayerError(f"layer '{path}' (Dropout) is in training mode; call model.eval()")
    return x


def _task_mask(ctx: _Ctx, path: str, m: TaskMask, x: Interval) -> Interval:
    if x.point:
        return _point(m(x.z))
    return _stacked(m(x.lo), m(x.hi))


_HANDLERS: dict[type, Callable[[_Ctx, str, nn.Module, Interval], Interval]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.ReLU: _relu,
    nn.Flatten: _flatten,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.AvgPool2d: _avgpool,
    nn.MaxPool2d: _monotone_exact,
    nn.Dropout: _identity,
    nn.Identity: _identity,
    TaskMask: _task_mask,
}


def _adapt(handler: Callable[[_Ctx, str, nn.Module, Interval], Interval]):
    """A chain layer handler as a graph op handler: Bounds in, Bounds out. Linear layers take inputs
    of any rank (…, in_features), as ``nn.Linear`` does."""
    def run(ctx: registry.BoundContext, path: str, m: nn.Module, x) -> registry.Bounds:
        from .ops import as_bounds

        x = as_bounds(ctx, x)
        lead = None
        if isinstance(m, nn.Linear) and x.lo.dim() > 2:
            lead = x.shape[:-1]
            x = x.map(lambda t: t.reshape(-1, t.shape[-1]))
        state = _point(x.lo, x.nonneg) if x.point else _as_interval(x)
        out = handler(ctx, path, m, state)
        value = registry.Bounds.exact(out.z, out.nonneg) if out.point else registry.from_stacked(out.z, out.nonneg)
        return value.map(lambda t: t.reshape(*lead, t.shape[-1])) if lead is not None else value
    return run


for _cls, _h in _HANDLERS.items():
    registry.register_module(_cls, _adapt(_h))


def _as_interval(x: registry.Bounds) -> Interval:
    """Bounds as a stacked Interval, without copying when ``lo`` and ``hi`` are still the two halves
    of one stacked tensor (the output of the previous chain handler): saves a ``cat`` per module."""
    z = registry.stacked(x)
    return Interval(z, nonneg=x.nonneg) if z is not None else _stacked(x.lo, x.hi, x.nonneg)


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]] | ModelGraph:
    """How the engine will walk ``model``: its layers in execution order when it is a (nested)
    ``nn.Sequential`` of supported layers (the fast chain engine), else its traced graph
    (``model_graph.trace``) with a handler for every op. Raises naming the first unsupported layer
    or op."""
    if is_chain(model, tuple(_HANDLERS)):
        return list(iter_layers(model))
    return trace_supported(model)


def propagate(
    model: nn.Module, box: Box, x: Tensor, *, certify: bool, layers: list[tuple[str, nn.Module]] | None = None,
    record: list[Interval] | None = None, nonneg: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Push the point input ``x`` through ``model`` for every parameter vector in ``box``.

    ``record``, if given, receives the interval entering each layer (the linear bound needs them;
    chains only). ``nonneg``: whether ``x`` ≥ 0 everywhere, if the caller knows (else one pass finds out).
    """
    layers = check_supported(model) if layers is None else layers
    if isinstance(layers, ModelGraph):
        if record is not None:
            raise UnsupportedLayerError("the per-layer record (method='linear') is available for nn.Sequential chains only")
        return propagate_graph(model, layers, box, x, certify=certify, nonneg=nonneg)
    ctx = _Ctx(box, certify, x.dtype, x.device, owned=record is None)
    state = _point(x, nonneg=bool(x.min() >= 0) if nonneg is None else nonneg)
    flags = []
    for path, m in layers:
        if record is not None:
            record.append(state)
        try:
            state = _HANDLERS[type(m)](ctx, path, m, state)
        except (RuntimeError, IndexError) as exc:  # torch's own shape errors, named by layer
            if isinstance(exc, UnsoundBoundError) or "out of memory" in str(exc):
                raise
            raise UnsupportedLayerError(
                f"layer '{path or '<model>'}' ({type(m).__name__}) cannot take inputs of shape {tuple(state.lo.shape)}: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        if certify:  # one flag per layer, read back in a single sync at the end
            flags.append(_invalid(state))
    if flags:
        bad = torch.stack(flags).cpu()
        if bool(bad.any()):  # never repaired: name the first layer where it happened
            path, m = layers[int(bad.nonzero()[0])]
            raise UnsoundBoundError(
                f"layer '{path or '<model>'}' ({type(m).__name__}): bounds overflowed to inf/NaN or lower > upper"
            )
    return state.lo, state.hi


def _invalid(state: Interval) -> Tensor:
    """0-dim bool tensor: the interval holds NaN/inf or has lower > upper somewhere."""
    return rounding.invalid_bounds(state.z) if state.point else rounding.invalid_bounds(state.lo, state.hi)
