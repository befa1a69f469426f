"""Backward linear bounds on logit margins over a parameter box (our own CROWN-style relaxation).

Why: IBP bounds every neuron on its own, so the uncertainty of a *shared* weight (a convolution
kernel is used at every position) is added up position by position in absolute value. The margin
``z_y − z_j`` depends on that weight through sums whose terms partly cancel; a linear bound keeps
their signs. On the paper's MNIST CNN this certifies 2.8–6.3× wider convolution radii at the same
certified accuracy (benchmarks/results/margins.md). The last layer gains nothing (IBP is already
exact there for a point-valued input), so ``bound_margins`` intersects both bounds.

**The bound.** For the margin ``c·z_L`` (``c = e_y − e_j``) pick any multipliers ``Λ_k`` on the
outputs of the affine layers, ``Λ_L = c``. With ``z_k = W_k a + b_k + δ_k`` (``δ_k`` the rounding
of a float forward pass, zero in exact arithmetic), ``W ∈ [W_m ± W_r]``, ``a ∈ [a_m ± a_r]``
(IBP intervals of the layer input) and ``ν_k = W_mᵀ Λ_k``:

    Λ·z_k  ≥  ν·a − Σ|G|·W_r − Σ|Λ|·(W_r ⋆ a_r) + S·b_m − |S|·b_r − |Λ|·e_k,

where ``G`` is the per-example correlation of ``Λ`` with ``a_m`` (the weight "gradient"; for a
shared kernel it sums over positions *before* the absolute value — the whole gain), ``S`` the sum
of ``Λ`` over positions, and ``|δ_k| ≤ e_k``. The exact identity behind it is
``W a = W_m a + (W − W_m) a_m + (W − W_m)(a − a_m)``. For the first layer (a point input ``x``)
the product is linear in ``W`` and bounded exactly: ``Λ·(W_m ⋆ x) − Σ|G|·W_r``. Then
``ν·relu(z) ≥ Λ'·z + ρ`` for *any* ``Λ'``, with ``ρ = min_{z∈[l,u]} (ν·relu(z) − Λ'·z)``, a
1-D minimum attained at ``l``, ``u`` or ``0``; ``Λ'`` is CROWN's choice (upper slope ``u/(u−l)``
where ``ν < 0``, lower slope 0 or 1 where ``ν ≥ 0``). Since every step holds for any multipliers,
the bound is valid whatever rounding did to ``Λ``: only the final evaluation must be rigorous.

**Zonotopes.** Over ``W = W_m + Σ_k ε_k g_k + δ`` (``lid_engine.zonotope``) the first-order term
``Λ·((W − W_m) a_m)`` is ``Σ_k ε_k·⟨G, g_k⟩ + ⟨G, δ⟩``: the ε parts of every layer are summed
per generator and minimised over the coefficient ranges once (the ε are shared), the δ part is
the box term with the residual radius, and the second-order term uses ``|W − W_m| ≤`` the
zonotope's reach. The intermediate intervals come from IBP over its bounding box.

**Floating point (certify mode).** The IBP intervals come from certification mode in the
evaluation dtype, so they enclose the real-number activations and those of a float forward pass
in that dtype; ``e_k`` is the a-priori error of such a pass (``lid_engine/numerics.py``). The bound itself is
evaluated in float64 next to a magnitude ``M`` (the same expression with every operand replaced by
its absolute value), and lowered by ``c_D·M + 2⁻¹⁰⁰⁰``, ``c_D`` the γ-bound of the longest chain of
operations ``D`` (Higham, Lemma 3.3; ``2⁻¹⁰⁰⁰`` covers underflow of up to 10²⁰ products). Inexact
``ν`` (the one quantity with an exact meaning, ``W_mᵀΛ``) is charged the same way, through
``|W_m|ᵀ|Λ| · max|a|``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..domains import Box
from ..errors import UnsupportedLayerError
from ..layers import TaskMask
from ..model_graph import ModelGraph
from ..zonotope import Zonotope
from ..model_walk import param_name
from .. import numerics as rounding
from . import ibp

SUPPORTED_LAYERS = (
    "Linear, Conv2d (groups=1, zero padding), ReLU, Flatten, Dropout (eval mode), Identity, "
    "lid_engine.TaskMask (as the last layer), nested nn.Sequential"
)
UNDERFLOW_ALLOWANCE = 2.0**-1000  # ≥ 10²⁰ · 2⁻¹⁰⁷⁴: every product that can underflow in float64
_PASS_THROUGH = (nn.Flatten, nn.Dropout, nn.Identity)


def walk(model: nn.Module, layers: list[tuple[str, nn.Module]] | ModelGraph) -> list[tuple[str, nn.Module]] | ModelGraph:
    """What the linear bound walks for ``model`` (``layers`` = ``ibp.check_supported(model)``): the chain
    itself when every layer has a relaxation here, else the traced graph (``linear_graph.py``), where
    layers without one (BatchNorm, LayerNorm, GELU …) are crossed with their IBP interval."""
    if isinstance(layers, ModelGraph):
        return layers
    try:
        check_supported(layers)
    except UnsupportedLayerError:
        from .graph import trace_supported

        return trace_supported(model)
    return layers


def check_supported(layers: list[tuple[str, nn.Module]] | ModelGraph) -> None:
    """Raise naming the first layer of a chain that the chain walk cannot relax (``walk`` then traces
    the model instead; ``linear_graph.margins`` bounds either)."""
    if isinstance(layers, ModelGraph):
        raise UnsupportedLayerError("the chain walk bounds nn.Sequential chains; a traced graph goes through "
                                    "lid_engine.bounds.linear_graph.margins")
    for i, (path, m) in enumerate(layers):
        where = f"layer '{path or '<model>'}' ({type(m).__name__})"
        if isinstance(m, TaskMask) and i != len(layers) - 1:
            raise UnsupportedLayerError(f"{where}: method='linear' needs TaskMask as the last layer")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise UnsupportedLayerError(f"{where}: method='linear' supports Conv2d with groups=1 only; use method='ibp'")
        if isinstance(m, nn.Conv2d):
            conv_padding(m, where)
        if not isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU, TaskMask) + _PASS_THROUGH):
            raise UnsupportedLayerError(
                f"{where} is not supported by method='linear'. Supported: {SUPPORTED_LAYERS}. "
                "Use method='ibp' for this model."
            )


def conv_padding(m: nn.Conv2d, where: str = "Conv2d") -> tuple[int, int]:
    """The layer's zero padding as integers: unfold and the transposed convolutions behind the
    bound take no 'same' / 'valid' strings, and an asymmetric 'same' has no integer form."""
    if not isinstance(m.padding, str):
        return tuple(m.padding)
    if m.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
    if any(t % 2 for t in totals):
        raise UnsupportedLayerError(
            f"{where}: padding='same' with kernel_size={m.kernel_size}, dilation={m.dilation} pads unevenly; "
            "method='linear' needs symmetric padding (use an odd kernel, integer padding, or method='ibp')"
        )
    return tuple(t // 2 for t in totals)


class _Sum:
    """The bound's value per (example, competitor), its magnitude M and the longest chain D.

    A zonotope's generator terms are linear in coefficients ε shared by every layer: they are
    collected per generator (``shared``) across layers and minimised over ε once, in ``lower``."""

    def __init__(self, shape: tuple[int, int], like: Tensor, certify: bool):
        self.value = like.new_zeros(shape)
        self.mag = like.new_zeros(shape) if certify else None
        self.depth = 0
        self.certify = certify
        self.shared: dict[int, list[Tensor]] = {}  # generator k -> [Σ t_k (N, J), magnitude (N, J)]
        self.shared_depth = 0
        self.coeff_lo = self.coeff_hi = None

    def add_shared(self, k: int, value: Tensor, mag: Tensor | None, depth: int, coeff_lo: Tensor, coeff_hi: Tensor) -> None:
        """Add ``t`` (N, J) to generator ``k``'s coefficient: the bound gains ``min_ε ε_k·Σ t``."""
        self.coeff_lo, self.coeff_hi = coeff_lo, coeff_hi
        total = self.shared.setdefault(k, [torch.zeros_like(value), torch.zeros_like(value)])
        total[0] = total[0] + value
        if self.certify:
            total[1] = total[1] + mag
        self.shared_depth += depth + 1

    def _settle_shared(self) -> None:
        for k, (t, mag) in sorted(self.shared.items()):
            value = torch.minimum(self.coeff_lo[k] * t, self.coeff_hi[k] * t)
            scale = torch.maximum(self.coeff_lo[k].abs(), self.coeff_hi[k].abs())
            self.value = self.value + value
            if self.certify:
                self.mag = self.mag + mag * scale
        if self.shared:
            self.depth += self.shared_depth + len(self.shared) + 2
        self.shared = {}

    def add(self, value: Tensor, mag: Tensor | None, depth: int) -> None:
        """Add a term (N, J, ...) summed over its trailing dimensions; ``depth`` = its chain length."""
        self.value = self.value + value.flatten(2).sum(2)
        if self.certify:
            self.mag = self.mag + mag.flatten(2).sum(2)
            self.depth += depth + math.prod(value.shape[2:]) + 1

    def lower(self) -> Tensor:
        self._settle_shared()
        if not self.certify:
            return self.value
        c, _ = rounding.slack_coefficients(self.depth, torch.float64)
        slack = rounding.round_up(rounding.round_up(self.mag * c) + UNDERFLOW_ALLOWANCE)
        return rounding.round_down(self.value - slack)


def linear_margins(
    model: nn.Module,
    box: Box,
    x: Tensor,
    y: Tensor,
    *,
    certify: bool,
    layers: list[tuple[str, nn.Module]],
    competitors: int | None = None,
    zonotope=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """IBP's logit bounds ``(lo, hi)`` and the linear lower bounds on ``z_y − z_j`` (N, C).

    ``box`` is what IBP propagates; with a ``zonotope`` (certify mode) it is the zonotope's
    bounding box, which gives the intermediate intervals, while the terms linear in the weights
    are minimised over the zonotope itself (see ``_coordinates``).

    The linear bound is ``-inf`` where it was not computed: at ``j = y``, at classes a ``TaskMask``
    hides, for examples whose label it hides, and (search mode, ``competitors=k``) beyond the ``k``
    classes with the smallest IBP margins.
    """
    check_supported(layers)
    states: list[ibp.Interval] = []
    lo, hi = ibp.propagate(model, box, x, certify=certify, layers=layers, record=states)
    linear = lo.new_full(lo.shape, -math.inf)
    if lo is hi:  # the output does not depend on the parameters: IBP is exact
        return lo, hi, linear
    mask = layers[-1][1] if isinstance(layers[-1][1], TaskMask) else None
    body = layers[:-1] if mask is not None else layers
    kept = torch.ones(lo.shape[1], dtype=torch.bool, device=lo.device)
    if mask is not None and mask.task is not None:
        kept = mask.masks[mask.task].to(lo.device)
    rows = kept[y]  # examples whose label competes at all; a hidden label is left to IBP
    n_kept = int(kept.sum())
    if n_kept < 2 or not bool(rows.any()):
        return lo, hi, linear
    with torch.no_grad():  # competitors: the kept classes other than y, worst IBP margin first
        # an overflowed (inf) or undefined (NaN) IBP margin still ranks a kept class ahead of every
        # excluded one, so only kept classes are ever chosen
        top = torch.finfo(lo.dtype).max
        rank = (lo.gather(1, y[:, None]) - hi)[rows].nan_to_num(nan=-math.inf).clamp(max=top)
        rank = rank.masked_fill(~kept, math.inf).scatter(1, y[rows, None], math.inf)
        k = n_kept - 1 if competitors is None else min(competitors, n_kept - 1)
        others = rank.argsort(dim=1)[:, :k]
    dtype = torch.float64 if certify else x.dtype
    sub = [ibp.Interval(s.z[rows].to(dtype), point=s.point, nonneg=s.nonneg) for s in states[: len(body)]]
    with contextlib.nullcontext() if certify else rounding.onednn_kernels():
        value = _backward(body, sub, box if zonotope is None else zonotope, x[rows], y[rows], others,
                          certify=certify, dtype=dtype)
    if certify:  # an overflow leaves NaN (inf − inf) or inf: no information, never a certificate
        value = _narrow_down(value.nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf), linear.dtype)
    filled = linear[rows].scatter(1, others, value)
    return lo, hi, linear.masked_scatter(rows[:, None].expand_as(linear), filled)


def _narrow_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Cast a float64 lower bound to ``dtype`` without rounding it up."""
    if dtype == t.dtype:
        return t
    n = t.to(dtype)
    return torch.where(n.to(t.dtype) > t, rounding.round_down(n), n)


def _backward(layers, states, domain, x: Tensor, y: Tensor, others: Tensor, *, certify: bool,
              dtype: torch.dtype) -> Tensor:
    """Walk the layers backwards from ``Λ_L = e_y − e_j``; return the bound (N, J).

    ``states[i]`` is the interval entering layer ``i`` (a point until the first layer with
    parameters); the walk stops at the first layer whose input is a point."""
    N, J = others.shape
    eye = torch.eye(_n_outputs(layers), dtype=dtype, device=x.device)
    lam = eye[y][:, None, :] - eye[others]  # (N, J, C)
    acc = _Sum((N, J), lam, certify)
    for i in range(len(layers) - 1, -1, -1):
        path, m = layers[i]
        state = states[i]
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            lam = _affine(acc, path, m, lam, state, domain, certify, dtype, x.dtype)
            if lam is None:
                break
        elif state.point:  # a parameter-free layer on a fixed value: its output is a constant
            out = states[i + 1].z
            acc.add(lam * out[:, None], lam.abs() * out.abs()[:, None] if certify else None, 1)
            break
        elif isinstance(m, nn.ReLU):
            lam = _relu(acc, lam, state.lo, state.hi, certify)
        else:  # Flatten / Dropout / Identity
            lam = lam.reshape(N, J, *state.lo.shape[1:])
    return acc.lower()


def _n_outputs(layers) -> int:
    for _, m in reversed(layers):
        if isinstance(m, nn.Linear):
            return m.out_features
        if isinstance(m, nn.Conv2d):
            break
    raise UnsupportedLayerError("method='linear' needs the logits to come from a Linear layer")


def _relu(acc: _Sum, nu: Tensor, l: Tensor, u: Tensor, certify: bool) -> Tensor:
    """``ν·relu(z) ≥ Λ'·z + ρ``: CROWN's slopes for Λ', ρ added to ``acc``; returns Λ'."""
    l, u = l[:, None], u[:, None]
    unstable = (l < 0) & (u > 0)
    active = (l >= 0).to(nu.dtype)
    upper_slope = torch.where(unstable, u / (u - l).clamp_min(torch.finfo(u.dtype).tiny), active)
    lower_slope = torch.where(unstable, (u >= -l).to(nu.dtype), active)
    lam = torch.where(nu >= 0, nu * lower_slope, nu * upper_slope)
    if not certify:
        # closed form of ρ for these slopes: ν·(−u·l/(u−l)) on unstable neurons where ν < 0, else 0
        acc.add(nu.clamp(max=0) * torch.where(unstable, -upper_slope * l, torch.zeros_like(l)), None, 0)
        return lam

    def g(z: Tensor) -> Tensor:
        return nu * torch.relu(z) - lam * z

    rho = torch.minimum(g(l), g(u))
    rho = torch.where(unstable, torch.minimum(rho, torch.zeros_like(rho)), rho)
    zmax = torch.maximum(l.abs(), u.abs())
    acc.add(rho, nu.abs() * torch.relu(u) + lam.abs() * zmax, 3)
    return lam


class _Coordinates:
    """One parameter tensor of the domain as the bound uses it: ``W = mid + Σ_k ε_k·gens[k] + δ``
    with ``ε_k ∈ [coeff_lo_k, coeff_hi_k]``, ``|δ| ≤ first``; ``|W − mid| ≤ second``; ``W ∈ [lo, hi]``.

    A box is ``mid ± rad`` without generators (``first = second = rad``). A zonotope's
    generator terms are minimised exactly over the coefficient ranges, jointly over all layers
    (``_Sum.add_shared``); only the second-order term sees its bounding box (``second``)."""

    def __init__(self, domain, name: str, certify: bool, dtype: torch.dtype, device: torch.device):
        self.gens = self.coeff_lo = self.coeff_hi = None
        if isinstance(domain, Zonotope):
            to = dict(device=device, dtype=dtype)
            self.mid = domain.centre[name].to(**to)
            self.first = domain.certified_residual(name).to(**to)
            self.second = domain.reach(name).to(**to)
            # only the magnitudes (a float forward pass's rounding) use these
            self.lo, self.hi = rounding.round_down(self.mid - self.second), rounding.round_up(self.mid + self.second)
            if name in domain.generators and domain.n_generators:
                self.gens = domain.generators[name].to(**to)
                self.coeff_lo, self.coeff_hi = domain.coeff_lower.to(**to), domain.coeff_upper.to(**to)
            return
        self.lo, self.hi = domain.lower[name].to(dtype), domain.upper[name].to(dtype)
        if certify:
            self.mid, self.first = rounding.midpoint_radius(self.lo, self.hi)
        else:
            self.mid, self.first = (self.lo + self.hi) / 2, (self.hi - self.lo) / 2
        self.second = self.first

    def generator_terms(self, acc: _Sum, correlate, magnitude, depth: int) -> None:
        """Add ``ε_k·t_k``, ``t_k = correlate(g_k)`` (N, J), to the shared generator terms, which
        ``acc`` minimises over ε jointly with every other tensor's; ``magnitude(|g_k|)`` bounds the
        terms of ``t_k``."""
        if self.gens is None:
            return
        for k in range(len(self.gens)):
            mag = magnitude(self.gens[k].abs()) if acc.certify else None
            acc.add_shared(k, correlate(self.gens[k]), mag, depth, self.coeff_lo, self.coeff_hi)


def _affine(acc: _Sum, path: str, m: nn.Module, lam: Tensor, state: ibp.Interval, domain, certify: bool,
            dtype: torch.dtype, eval_dtype: torch.dtype) -> Tensor | None:
    """Add layer ``m``'s terms for multiplier ``lam`` on its output; return ``ν`` (None at a point input)."""
    N, J = lam.shape[:2]
    weight = _Coordinates(domain, param_name(path, "weight"), certify, dtype, lam.device)
    wl, wu, wm, wr = weight.lo, weight.hi, weight.mid, weight.first
    conv = isinstance(m, nn.Conv2d)
    if conv:
        pad = conv_padding(m)
        op = lambda t, w: F.conv2d(t, w, None, m.stride, pad, m.dilation)  # noqa: E731
        n_terms = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        positions = lam.shape[-2] * lam.shape[-1]
    else:
        op = lambda t, w: F.linear(t, w)  # noqa: E731
        n_terms, positions = m.in_features, 1
    if state.point:
        am, ar = state.z, None
    elif certify:
        am, ar = rounding.midpoint_radius(state.lo, state.hi)
    else:
        am, ar = (state.lo + state.hi) / 2, (state.hi - state.lo) / 2
    amag = state.z.abs() if state.point else torch.maximum(state.lo.abs(), state.hi.abs())
    flat = lam.flatten(0, 1)  # (N·J, out...)

    # Σ|G|·W_r: for Linear, G = Λ ⊗ a_m is rank one, so |G| = |Λ| ⊗ |a_m|; generators: Σ_k min ε_k·⟨G, g_k⟩
    outputs = math.prod(lam.shape[2:])
    weight.generator_terms(
        acc, lambda g: (lam * op(am, g)[:, None]).flatten(2).sum(2),
        lambda g: (lam.abs() * op(am.abs(), g)[:, None]).flatten(2).sum(2), n_terms + outputs + 2)
    if conv:
        if certify:  # plain dot products (the rounding model) over the unfolded patches (N, K, L)
            patches = F.unfold(am, m.kernel_size, m.dilation, pad, m.stride)
            g = torch.einsum("njol,nkl->njok", lam.flatten(3), patches)
            gmag = torch.einsum("njol,nkl->njok", lam.abs().flatten(3), patches.abs()) * (wm.abs() + wr).reshape(1, 1, wr.shape[0], -1)
        else:
            g, gmag = _weight_correlation(lam, am, m), None
        acc.add(-g.abs() * wr.reshape(1, 1, wr.shape[0], -1), gmag, positions + 2)
    else:
        term = lam.abs() * op(am.abs(), wr)[:, None]
        acc.add(-term, term if certify else None, n_terms + 2)
    if state.point:  # Λ·(W_m ⋆ x), exact up to rounding
        centre = lam * op(am, wm)[:, None]
        acc.add(centre, lam.abs() * op(am.abs(), wm.abs())[:, None] if certify else None, n_terms + 1)
    else:  # second-order term Σ|Λ|·(W_r ⋆ a_r), W_r bounding every |W − W_m|
        second = lam.abs() * op(ar, weight.second)[:, None]
        acc.add(-second, second if certify else None, n_terms + 1)
    if m.bias is not None:
        bias = _Coordinates(domain, param_name(path, "bias"), certify, dtype, lam.device)
        bl, bu, bm, br = bias.lo, bias.hi, bias.mid, bias.first
        s = lam.flatten(3).sum(3) if conv else lam
        # Σ|Λ| over positions: the magnitudes only (certify mode), not the search's hot path
        sabs = (lam.abs().flatten(3).sum(3) if conv else lam.abs()) if certify else None
        bias_term = s * bm - s.abs() * br
        acc.add(bias_term, sabs * (bm.abs() + br) if certify else None, positions + 2)
        bias.generator_terms(acc, lambda g: (s * g).sum(2), lambda g: (sabs * g).sum(2), positions + s.shape[2] + 2)
    if certify:  # a float forward pass in the evaluation dtype deviates by at most e per output
        wmax = torch.maximum(wl.abs(), wu.abs())
        fwd = op(amag, wmax)
        if m.bias is not None:
            bmax = torch.maximum(bl.abs(), bu.abs())
            fwd = fwd + (bmax.reshape(1, -1, 1, 1) if conv else bmax)
        c, k = rounding.slack_coefficients(n_terms + 1, eval_dtype)
        e = rounding.round_up(rounding.round_up(fwd * c) + k * rounding.eta(eval_dtype))
        err = lam.abs() * e[:, None]
        acc.add(-err, err, 2)
    if state.point:
        return None
    if conv:
        nu = torch.nn.grad.conv2d_input((N * J, *am.shape[1:]), wm, flat, m.stride, pad, m.dilation)
    else:
        nu = flat @ wm
    nu = nu.reshape(N, J, *am.shape[1:])
    if certify:  # ν is W_mᵀΛ only up to rounding: charge |W_m|ᵀ|Λ|·max|a|
        if conv:
            nabs = torch.nn.grad.conv2d_input((N * J, *am.shape[1:]), wm.abs(), flat.abs(), m.stride, pad, m.dilation)
        else:
            nabs = flat.abs() @ wm.abs()
        acc.add(torch.zeros_like(nu), nabs.reshape(nu.shape) * amag[:, None], n_terms)
    return nu


def _weight_correlation(lam: Tensor, am: Tensor, m: nn.Conv2d) -> Tensor:
    """Per example and competitor, ``G = Σ_positions Λ ⊗ patch(a_m)`` as (N, J, Cout, Cin·kh·kw).

    One grouped convolution (examples as groups, Λ as the kernel; the layer's stride and dilation
    swap roles) instead of unfolding every patch: 3× faster in the search. ``a_m`` is detached: the
    gradient reaches the box through ``W_r``, and back-propagating through the patches cost a third
    of an iteration for little signal."""
    N, J, cout = lam.shape[:3]
    kh, kw = m.kernel_size
    with rounding.onednn_kernels():  # search mode only: any kernel will do
        out = F.conv2d(am.detach().transpose(0, 1), lam.reshape(N * J * cout, 1, *lam.shape[-2:]), None,
                       stride=m.dilation, padding=conv_padding(m), dilation=m.stride, groups=N)
    out = out[..., :kh, :kw].reshape(m.in_channels, N, J, cout, kh * kw)
    return out.permute(1, 2, 3, 0, 4).reshape(N, J, cout, m.in_channels * kh * kw)
