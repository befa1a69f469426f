"""The soundness test every bound must pass — run it on a model with a custom layer handler.

``check_soundness(model, domain, x)`` draws parameter vectors from the domain (half uniformly
inside, half at random vertices), evaluates the model at each with a plain forward pass in every
requested dtype, and counts the outputs that fall outside the certify-mode bounds of that dtype
(``mode="search"`` checks the search's bounds, up to a tolerance ``rtol``).
A sound engine has zero. It also checks that a zero-width domain around the model's own parameters
encloses the nominal forward pass. Use it when registering a handler
(``lid_engine.bounds.registry``)::

    report = le.testing.check_soundness(model, le.Box.around(model, 0.01), x, samples=10_000)
    assert report.violations == 0, report

With ``method="linear"`` and labels ``y`` it checks the linear margin bounds the same way.

The parameter vectors of a batch are drawn together. Each is evaluated with a plain forward pass
(``evaluations=("plain",)``, what a user runs); ``"vmap"`` evaluates the batch with
``torch.func.vmap`` over ``functional_call`` instead (several times faster on small models; a
model vmap cannot batch falls back to one vector at a time). A batched evaluation orders its sums
differently; certify-mode bounds hold for every floating-point evaluation order, so both must lie
inside them.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from .bounds import bound_logits, bound_margins
from .domains import Box
from .errors import DomainMismatchError

EVALUATIONS = ("plain", "vmap")


@dataclass
class SoundnessReport:
    """What ``check_soundness`` found: per dtype, how many sampled outputs fell outside the bounds."""

    samples: int
    violations: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    worst_excess: float = 0.0  # the largest distance of an output outside its bounds
    nominal_enclosed: bool = True
    # the largest (lo − out, out − hi) over every sampled output with a bound: ≤ 0 when all are inside
    max_excess: float = -math.inf

    def __str__(self) -> str:
        return (f"{self.samples} parameter vectors per dtype: {self.violations} outputs outside the bounds "
                f"({', '.join(f'{k}: {v}' for k, v in self.by_dtype.items())}; worst excess {self.worst_excess:.3g}; "
                f"max excess {self.max_excess:.3g}); "
                f"nominal forward enclosed by a zero-width domain: {self.nominal_enclosed}")


def check_soundness(model: nn.Module, domain: Box, x: Tensor, *, samples: int = 1000,
                    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64), seed: int = 0,
                    batch: int = 64, y: Tensor | None = None, method: str = "ibp", mode: str = "certify",
                    rtol: float = 0.0, evaluations: tuple[str, ...] = ("plain",)) -> SoundnessReport:
    """Sample ``samples`` parameter vectors of ``domain`` (uniform and vertices, alternately) and
    count forward-pass outputs on ``x`` outside ``bound_logits(model, domain, x)`` in each dtype.

    Args:
        model: the model; copied and cast to each dtype, never modified.
        domain: the box the parameter vectors are drawn from.
        x: the fixed input batch (token ids stay integers).
        samples: parameter vectors per dtype.
        dtypes: the arithmetic of the bounds and of the forward passes.
        seed: seeds the draws (the same draws in every dtype).
        batch: parameter vectors drawn and evaluated together.
        y: the labels; needed with ``method="linear"``.
        method: ``"ibp"`` checks the logit bounds; ``"linear"`` checks that every sampled margin
            ``z_y − z_j`` is at least ``bound_margins(model, domain, x, y, method="linear")``.
        mode: the bounds' mode. ``"search"`` bounds are sound in real arithmetic only: give an
            ``rtol`` of a few units of roundoff's worth to check them.
        rtol: outputs within ``rtol·(1 + |output|)`` beyond a bound still count as inside.
        evaluations: how each vector is evaluated: ``"plain"`` (one forward pass per vector) and/or
            ``"vmap"`` (the batch at once); with both, every vector's outputs are checked twice.

    Returns:
        A :class:`SoundnessReport`; ``violations == 0`` for a sound bound.
    """
    if method == "linear" and y is None:
        raise ValueError("check_soundness: method='linear' checks margins and needs the labels 'y'")
    if not evaluations or set(evaluations) - set(EVALUATIONS):
        raise ValueError(f"check_soundness: 'evaluations' must name some of {EVALUATIONS}, got {evaluations!r}")
    if not isinstance(domain, Box):
        raise DomainMismatchError(f"check_soundness: 'domain' must be a lid_engine Box, got {type(domain).__name__}")
    report = SoundnessReport(samples)
    for dtype in dtypes:
        m = copy.deepcopy(model).to(dtype).eval()
        box = domain.to(dtype=dtype)
        xd = x.to(dtype) if x.is_floating_point() else x  # token ids stay integers for the forward pass
        if method == "linear":
            lo, hi = bound_margins(m, box, xd, y, method="linear", mode=mode, dtype=dtype).detach(), None
        else:
            lo, hi = (b.detach() for b in bound_logits(m, box, xd, mode=mode, dtype=dtype))
        forwards = [_forward(m, xd, e == "vmap") for e in evaluations]
        gen = torch.Generator().manual_seed(seed)
        bad = 0
        for start in range(0, samples, batch):
            params = _draws(box, gen, start, min(batch, samples - start))
            for forward in forwards:
                bad += _outside(forward(params), lo, hi, y, rtol, report)
        report.by_dtype[str(dtype).replace("torch.", "")] = bad
        report.violations += bad
        with torch.no_grad():
            nominal = m(xd)
        slack = rtol * (1 + nominal.abs())
        if hi is None:
            zlo = bound_margins(m, Box.point(m), xd, y, method="linear", mode=mode, dtype=dtype).detach()
            margin = nominal.gather(1, y[:, None]) - nominal
            report.nominal_enclosed &= bool(((zlo <= margin + slack) | (zlo == torch.inf)).all())
        else:
            zlo, zhi = (b.detach() for b in bound_logits(m, Box.point(m), xd, mode=mode, dtype=dtype))
            report.nominal_enclosed &= bool(((zlo - slack <= nominal) & (nominal <= zhi + slack)).all())
    return report


def _outside(out: Tensor, lo: Tensor, hi: Tensor | None, y: Tensor | None, rtol: float,
             report: SoundnessReport) -> int:
    """How many of the sampled outputs ``out`` (draws, N, C) lie outside ``[lo, hi]`` — or, with
    ``hi`` None, how many margins ``z_y − z_j`` lie below ``lo`` — beyond ``rtol·(1 + |z|)``; updates
    the report's excesses. A NaN output escapes every bound."""
    if hi is None:
        out = out.gather(2, y[None, :, None].expand(len(out), -1, 1)) - out
        claimed = lo < torch.inf  # +inf at j = y: no claim there
        outside = ((out < lo - rtol * (1 + out.abs())) | out.isnan()) & claimed
        excess = (lo - out).nan_to_num(nan=torch.inf).masked_fill(~claimed, -torch.inf)
    else:
        slack = rtol * (1 + out.abs())
        outside = (out < lo - slack) | (out > hi + slack) | out.isnan()
        excess = torch.maximum(lo - out, out - hi).nan_to_num(nan=torch.inf)
    if excess.numel():
        report.max_excess = max(report.max_excess, float(excess.max()))
    if not bool(outside.any()):
        return 0
    report.worst_excess = max(report.worst_excess, float(excess[outside].max()))
    return int(outside.sum())


def _draws(box: Box, gen: torch.Generator, start: int, n: int) -> dict[str, Tensor]:
    """Parameter vectors ``start … start + n − 1`` stacked per parameter: the even ones uniform in
    the box (clamped so rounding cannot leave it), the odd ones random vertices."""
    vertex = torch.arange(start, start + n) % 2 == 1
    out = {}
    for name in box.names:
        lo, hi = box.lower[name].detach(), box.upper[name].detach()
        u = torch.rand((n, *lo.shape), generator=gen, dtype=lo.dtype, device="cpu").to(lo.device)
        uniform = torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)
        out[name] = torch.where(vertex.to(lo.device).view(-1, *[1] * lo.dim()), torch.where(u < 0.5, hi, lo), uniform)
    return out


def _forward(model: nn.Module, x: Tensor, vectorize: bool):
    """``params (stacked) -> outputs (draws, N, C)``: one forward pass per vector, or (``vectorize``)
    vmap over ``functional_call``, falling back to one vector at a time for a model vmap cannot batch
    (found on the first call)."""
    buffers = dict(model.named_buffers())

    def one(params: dict[str, Tensor]) -> Tensor:
        return functional_call(model, (params, buffers), (x,))

    batched = vmap(one)
    state = {"vmap": vectorize}

    def forward(params: dict[str, Tensor]) -> Tensor:
        with torch.no_grad(), warnings.catch_warnings():
            # vmap's per-vector fallback for an op without a batching rule (CPU flash attention): slower, same values
            warnings.filterwarnings("ignore", message="There is a performance drop")
            if state["vmap"]:
                try:
                    return batched(params)
                except (RuntimeError, NotImplementedError, TypeError, ValueError):
                    state["vmap"] = False  # e.g. data-dependent Python control flow on a parameter
            n = len(next(iter(params.values())))
            return torch.stack([one({k: v[i] for k, v in params.items()}) for i in range(n)])

    return forward
