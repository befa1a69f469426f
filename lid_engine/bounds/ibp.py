"""Interval bound propagation over a *parameter* box, with the input held fixed.

Each layer maps an input interval [lo, hi] (the activations of all parameter vectors in the box)
to an output interval. Three cases are told apart because they differ in cost and tightness:

* **point input** (the model's input, unchanged by Flatten/Identity): the set ``{W x : W ∈ box}`` is
  exactly ``W_mid x ± W_rad |x|`` — two products, no interval arithmetic on x.
* **non-negative interval** (after ReLU/MaxPool of non-negative values): the exact interval product
  ``lo = W_l⁺ x_l + W_l⁻ x_u``, ``hi = W_u⁺ x_u + W_u⁻ x_l`` (tighter than midpoint–radius).
* **general interval**: Rump's midpoint–radius product
  ``W_mid x_mid ± (|W_mid| x_rad + W_rad (|x_mid| + x_rad))``.

``mode="certify"`` additionally widens every affine layer by an a-priori rounding bound
(``rounding.py``) and rounds outward, so the result encloses the real-number outputs and those of
any float evaluation; ``mode="search"`` skips that and stays differentiable for the LID search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..domains import Box
from ..errors import UnsoundBoundError, UnsupportedLayerError
from ..layers import TaskMask
from ..model_walk import iter_layers, param_name
from . import rounding

SUPPORTED_LAYERS = (
    "Linear, Conv2d, ReLU, Flatten, BatchNorm1d/BatchNorm2d (eval mode), AvgPool2d, MaxPool2d, "
    "Dropout (eval mode), Identity, lid_engine.TaskMask, nested nn.Sequential"
)


@dataclass
class Interval:
    """Activations of every parameter vector in the box: ``lo ≤ a ≤ hi`` element-wise."""

    lo: Tensor
    hi: Tensor
    point: bool = False  # lo and hi are the same exact tensor (the fixed input)
    nonneg: bool = False  # lo ≥ 0 holds exactly


@dataclass
class _Ctx:
    box: Box
    certify: bool
    dtype: torch.dtype
    device: torch.device

    def bounds(self, path: str, attr: str) -> tuple[Tensor, Tensor] | None:
        name = param_name(path, attr)
        if name not in self.box.lower:
            return None
        return (self.box.lower[name].to(self.device, self.dtype), self.box.upper[name].to(self.device, self.dtype))


# --------------------------------------------------------------------------------------- affine
def _affine(
    ctx: _Ctx,
    x: Interval,
    w: tuple[Tensor, Tensor],
    b: tuple[Tensor, Tensor] | None,
    op: Callable[[Tensor, Tensor], Tensor],
    n_terms: int,
    bias_shape: tuple[int, ...],
) -> Interval:
    """Bound ``op(x, W) + b`` over W ∈ [w_l, w_u], b ∈ [b_l, b_u], x ∈ [x.lo, x.hi].

    ``op`` is bilinear (matmul or convolution); ``n_terms`` is the length of each dot product.
    """
    wl, wu = w
    bl, bu = (b[0].reshape(bias_shape), b[1].reshape(bias_shape)) if b is not None else (None, None)
    if x.nonneg and not x.point:
        lo = op(x.lo, wl.clamp(min=0)) + op(x.hi, wl.clamp(max=0))
        hi = op(x.hi, wu.clamp(min=0)) + op(x.lo, wu.clamp(max=0))
        if bl is not None:
            lo, hi = lo + bl, hi + bu
        if ctx.certify:
            mag = op(x.hi, torch.maximum(wl.abs(), wu.abs()))
            if bl is not None:
                mag = mag + torch.maximum(bl.abs(), bu.abs())
            # two n-term products, one addition, one bias addition: γ_{n+2} covers it
            lo, hi = rounding.widen(lo, hi, mag, n_terms + 2)
        return Interval(lo, hi)

    if ctx.certify:
        wm, wr = rounding.midpoint_radius(wl, wu)
        bm, br = rounding.midpoint_radius(bl, bu) if bl is not None else (None, None)
    else:
        wm, wr = (wl + wu) / 2, (wu - wl) / 2
        bm, br = ((bl + bu) / 2, (bu - bl) / 2) if bl is not None else (None, None)

    if x.point:
        xabs = x.lo.abs()
        centre, radius = op(x.lo, wm), op(xabs, wr)
        terms = n_terms + 1
        mag = op(xabs, wm.abs() + wr) if ctx.certify else None
    else:
        if ctx.certify:
            xm, xr = rounding.midpoint_radius(x.lo, x.hi)
        else:
            xm, xr = (x.lo + x.hi) / 2, (x.hi - x.lo) / 2
        xmag = xm.abs() + xr
        centre = op(xm, wm)
        radius = op(xr, wm.abs()) + op(xmag, wr)
        terms = n_terms + 2  # two n-term products + two additions (radius); centre has n + 1
        mag = op(xmag, wm.abs() + wr) if ctx.certify else None
    if bm is not None:
        centre, radius = centre + bm, radius + br
        if mag is not None:
            mag = mag + bm.abs() + br
    lo, hi = centre - radius, centre + radius
    if ctx.certify:
        lo, hi = rounding.widen(lo, hi, mag, terms)
    return Interval(lo, hi)


def _linear(ctx: _Ctx, path: str, m: nn.Linear, x: Interval) -> Interval:
    w = ctx.bounds(path, "weight")
    b = ctx.bounds(path, "bias") if m.bias is not None else None
    if x.lo.shape[-1] != m.in_features:
        raise UnsupportedLayerError(
            f"layer '{path}' (Linear) expects {m.in_features} input features, got shape {tuple(x.lo.shape[1:])}"
        )
    return _affine(ctx, x, w, b, lambda a, wt: a @ wt.T, m.in_features, (m.out_features,))


def _conv2d(ctx: _Ctx, path: str, m: nn.Conv2d, x: Interval) -> Interval:
    if m.padding_mode != "zeros":
        raise UnsupportedLayerError(f"layer '{path}' (Conv2d): padding_mode={m.padding_mode!r}; only 'zeros' is supported")
    w = ctx.bounds(path, "weight")
    b = ctx.bounds(path, "bias") if m.bias is not None else None

    def op(a: Tensor, wt: Tensor) -> Tensor:
        return F.conv2d(a, wt, None, m.stride, m.padding, m.dilation, m.groups)

    n_terms = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
    return _affine(ctx, x, w, b, op, n_terms, (1, m.out_channels, 1, 1))


# --------------------------------------------------------------------------------------- elementwise
def _interval_mul(al: Tensor, ah: Tensor, bl: Tensor, bh: Tensor) -> tuple[Tensor, Tensor]:
    """Exact interval product (min/max of the four corner products)."""
    p = torch.stack([al * bl, al * bh, ah * bl, ah * bh])
    return p.min(dim=0).values, p.max(dim=0).values


def _batchnorm(ctx: _Ctx, path: str, m: nn.modules.batchnorm._BatchNorm, x: Interval) -> Interval:
    if m.training:
        raise UnsupportedLayerError(
            f"layer '{path}' ({type(m).__name__}) is in training mode; call model.eval() — batch "
            "statistics depend on the batch, so only eval-mode BatchNorm has a fixed meaning"
        )
    if m.running_mean is None or m.running_var is None:
        raise UnsupportedLayerError(f"layer '{path}' ({type(m).__name__}) has no running statistics (track_running_stats=False)")
    shape = (1, -1) + (1,) * (x.lo.dim() - 2)
    mean = m.running_mean.to(ctx.device, ctx.dtype).reshape(shape)
    inv_std = torch.rsqrt(m.running_var.to(ctx.device, ctx.dtype) + m.eps).reshape(shape)
    if m.affine:
        gl, gu = (t.reshape(shape) for t in ctx.bounds(path, "weight"))
        bl, bu = (t.reshape(shape) for t in ctx.bounds(path, "bias"))
    else:
        one = torch.ones_like(mean)
        gl = gu = one
        bl = bu = torch.zeros_like(mean)
    if not ctx.certify:
        zl, zh = (x.lo - mean) * inv_std, (x.hi - mean) * inv_std
        yl, yh = _interval_mul(zl, zh, gl, gu)
        return Interval(yl + bl, yh + bu)
    # Certification: interval arithmetic rounded outward op by op. 1/sqrt is given a generous
    # 16-ulp enclosure so that any reasonable float implementation of the forward pass is covered.
    u = rounding.unit_roundoff(ctx.dtype)
    dn, up = rounding.round_down, rounding.round_up
    s_lo, s_hi = dn(inv_std * (1 - 16 * u)), up(inv_std * (1 + 16 * u))
    al, ah = dn(x.lo - mean), up(x.hi - mean)
    zl, _ = _interval_mul(al, al, s_lo, s_hi)
    _, zh = _interval_mul(ah, ah, s_lo, s_hi)
    zl, zh = dn(zl), up(zh)
    yl, yh = _interval_mul(zl, zh, gl, gu)
    yl, yh = dn(dn(yl) + bl), up(up(yh) + bu)
    # A float forward may associate differently ((x·γs) + (β − μγs)); cover that deviation too.
    mag = (torch.maximum(x.lo.abs(), x.hi.abs()) + mean.abs()) * s_hi * torch.maximum(gl.abs(), gu.abs())
    mag = mag + torch.maximum(bl.abs(), bu.abs())
    slack = up(up(mag * (8 * u)) + 8 * rounding.eta(ctx.dtype))
    return Interval(dn(yl - slack), up(yh + slack))


def _avgpool(ctx: _Ctx, path: str, m: nn.AvgPool2d, x: Interval) -> Interval:
    lo, hi = m(x.lo), m(x.hi)  # positive averaging weights: monotone
    if ctx.certify:
        ks = m.kernel_size
        k = ks * ks if isinstance(ks, int) else ks[0] * ks[1]
        mag = m(torch.maximum(x.lo.abs(), x.hi.abs()))
        lo, hi = rounding.widen(lo, hi, mag, k + 1)
    return Interval(lo, hi, nonneg=x.nonneg)


def _maxpool(ctx: _Ctx, path: str, m: nn.MaxPool2d, x: Interval) -> Interval:
    if m.return_indices:
        raise UnsupportedLayerError(f"layer '{path}' (MaxPool2d): return_indices=True is not supported")
    if x.point:  # max is exact in floating point
        return _point(m(x.lo), x.nonneg)
    return Interval(m(x.lo), m(x.hi), nonneg=x.nonneg)  # max is monotone


def _relu(ctx: _Ctx, path: str, m: nn.ReLU, x: Interval) -> Interval:
    if x.point:  # ReLU is exact in floating point, so a point stays a point
        return _point(torch.relu(x.lo), True)
    return Interval(torch.relu(x.lo), torch.relu(x.hi), nonneg=True)


def _flatten(ctx: _Ctx, path: str, m: nn.Flatten, x: Interval) -> Interval:
    if x.point:
        return _point(m(x.lo), x.nonneg)
    return Interval(m(x.lo), m(x.hi), nonneg=x.nonneg)


def _point(t: Tensor, nonneg: bool = False) -> Interval:
    return Interval(t, t, point=True, nonneg=nonneg)


def _identity(ctx: _Ctx, path: str, m: nn.Module, x: Interval) -> Interval:
    if isinstance(m, nn.Dropout) and m.training and m.p > 0:
        raise UnsupportedLayerError(f"layer '{path}' (Dropout) is in training mode; call model.eval()")
    return x


def _task_mask(ctx: _Ctx, path: str, m: TaskMask, x: Interval) -> Interval:
    return Interval(m(x.lo), m(x.hi))


_HANDLERS: dict[type, Callable[[_Ctx, str, nn.Module, Interval], Interval]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.ReLU: _relu,
    nn.Flatten: _flatten,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.AvgPool2d: _avgpool,
    nn.MaxPool2d: _maxpool,
    nn.Dropout: _identity,
    nn.Identity: _identity,
    TaskMask: _task_mask,
}


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers in execution order; raises naming the first unsupported one."""
    layers = list(iter_layers(model))
    for path, m in layers:
        if type(m) not in _HANDLERS:
            raise UnsupportedLayerError(
                f"layer '{path or '<model>'}' ({type(m).__name__}) is not supported by the IBP bound "
                f"engine. Supported: {SUPPORTED_LAYERS}."
            )
    return layers


def propagate(
    model: nn.Module, box: Box, x: Tensor, *, certify: bool, layers: list[tuple[str, nn.Module]] | None = None
) -> tuple[Tensor, Tensor]:
    """Push the point input ``x`` through ``model`` for every parameter vector in ``box``."""
    layers = check_supported(model) if layers is None else layers
    ctx = _Ctx(box, certify, x.dtype, x.device)
    state = _point(x, nonneg=bool((x >= 0).all()))
    for path, m in layers:
        state = _HANDLERS[type(m)](ctx, path, m, state)
        if certify:
            _check_interval(state, path, m)
    return state.lo, state.hi


def _check_interval(state: Interval, path: str, m: nn.Module) -> None:
    if not (torch.isfinite(state.lo).all() and torch.isfinite(state.hi).all()):
        raise UnsoundBoundError(f"layer '{path}' ({type(m).__name__}): bounds overflowed to inf/NaN")
    if bool((state.lo > state.hi).any()):
        raise UnsoundBoundError(f"layer '{path}' ({type(m).__name__}): lower bound above upper bound")
