"""Sound bounds on a model's outputs for every parameter vector in a domain (input fixed).

``bound_logits(model, domain, x)`` is the one entry point. ``mode="certify"`` (default) is sound
under floating point; ``mode="search"`` is the cheaper, differentiable variant the LID search
optimises through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..domains import Box
from ..errors import DomainMismatchError, InvalidInputError, LidError
from . import ibp, rounding

METHODS = ("ibp", "crown", "crown+ibp")
MODES = ("certify", "search")


def bound_logits(
    model: nn.Module,
    domain: Box,
    x: Tensor,
    method: str = "ibp",
    *,
    mode: str = "certify",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Element-wise (lo, hi) on ``model(x)`` holding for every parameter vector in ``domain``.

    ``method``: ``"ibp"`` (own engine, all supported layers), ``"crown"`` (auto_LiRPA, Linear/ReLU
    models), ``"crown+ibp"`` (the intersection of both). ``dtype`` is the arithmetic used (float32
    by default; the model is evaluated at that precision). ``batch_size`` bounds memory by chunking
    ``x``. In ``mode="search"`` gradients flow to ``domain.lower``/``domain.upper``.
    """
    if method not in METHODS:
        raise LidError(f"bound_logits: 'method' must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise LidError(f"bound_logits: 'mode' must be one of {MODES}, got {mode!r}")
    if not isinstance(domain, Box):
        raise DomainMismatchError(f"bound_logits: 'domain' must be a lid_engine Box, got {type(domain).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise LidError(f"bound_logits: 'batch_size' must be a positive int or None, got {batch_size!r}")
    domain.check_matches(model, "bound_logits")
    x = _check_input(x, dtype)
    if method != "ibp" and mode == "certify":
        raise LidError(
            f"bound_logits: method={method!r} is not available in mode='certify': auto_LiRPA's CROWN "
            "has no floating-point rounding guarantee. Use method='ibp' for certificates, or mode='search'."
        )
    if domain.device != x.device or domain.dtype != x.dtype:
        domain = domain.to(x.device, x.dtype) if mode == "certify" else _cast_keep_grad(domain, x)
    chunks = [x] if batch_size is None or batch_size >= len(x) else list(x.split(batch_size))
    los, his = [], []
    if method == "ibp":
        layers = ibp.check_supported(model)
        ctx = rounding.certification_backend() if mode == "certify" else rounding.native_kernels()
        with ctx, (torch.no_grad() if mode == "certify" else _null_ctx()):
            for chunk in chunks:
                lo, hi = ibp.propagate(model, domain, chunk, certify=mode == "certify", layers=layers)
                los.append(lo), his.append(hi)
    else:
        from .lirpa import bound_logits_lirpa

        for chunk in chunks:
            if method == "crown":
                lo, hi = bound_logits_lirpa(model, domain, chunk, method="crown")
            else:
                lo, hi = bound_logits_lirpa(model, domain, chunk, method="crown")
                ilo, ihi = ibp.propagate(model, domain.detach(), chunk, certify=False)
                lo, hi = torch.maximum(lo, ilo), torch.minimum(hi, ihi)
            los.append(lo), his.append(hi)
    return torch.cat(los), torch.cat(his)


def _check_input(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"bound_logits: 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or len(x) == 0:
        raise InvalidInputError(f"bound_logits: 'x' must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    dtype = dtype or (x.dtype if x.dtype in rounding.SUPPORTED_DTYPES else torch.float32)
    if dtype not in rounding.SUPPORTED_DTYPES:
        raise InvalidInputError(f"bound_logits: 'dtype' must be torch.float32 or torch.float64, got {dtype}")
    x = x.to(dtype)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
        raise InvalidInputError(f"bound_logits: 'x' holds NaN or inf (first at example {bad})")
    return x


def _cast_keep_grad(domain: Box, x: Tensor) -> Box:
    return Box({n: t.to(x.device, x.dtype) for n, t in domain.lower.items()},
               {n: t.to(x.device, x.dtype) for n, t in domain.upper.items()}, check=False)


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["bound_logits", "METHODS", "MODES"]
