"""Sound bounds on a model's outputs for every parameter vector in a domain (input fixed).

``bound_logits(model, domain, x)`` bounds each logit; ``bound_margins(model, domain, x, y)`` bounds
the margins ``z_y − z_j`` that decide a prediction, which the linear method (``linear.py``) bounds
much more tightly than the difference of two logit bounds. ``mode="certify"`` (default) is sound
under floating point; ``mode="search"`` is the cheaper, differentiable variant the LID search
optimises through.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import numerics as rounding
from ..domains import Box
from ..errors import DomainMismatchError, InvalidInputError, LidError
from ..zonotope import Zonotope
from . import ibp, linear, linear_graph

METHODS = ("ibp", "crown", "crown+ibp")
MARGIN_METHODS = ("ibp", "linear")  # the sound ones: both usable in mode="certify"
MODES = ("certify", "search")
LINEAR_CHUNK = 256  # examples per linear-bound pass: ~0.5 GB in float64 for the 10-class MNIST CNN


def bound_logits(
    model: nn.Module,
    domain: Box | Zonotope,
    x: Tensor,
    method: str = "ibp",
    *,
    mode: str = "certify",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Element-wise (lo, hi) on ``model(x)`` holding for every parameter vector in ``domain``
    (a ``Box``, or a ``Zonotope``: IBP over its bounding box, certify mode).

    ``method``: ``"ibp"`` (own engine, all supported layers), ``"crown"`` (auto_LiRPA, Linear/ReLU
    models), ``"crown+ibp"`` (the intersection of both). ``dtype`` is the arithmetic used (float32
    by default; the model is evaluated at that precision). ``batch_size`` bounds memory by chunking
    ``x``. In ``mode="search"`` gradients flow to ``domain.lower``/``domain.upper``.
    """
    domain, x, nonneg = _prepare(model, domain, x, method, METHODS, mode, dtype, batch_size, "bound_logits")
    if _is_zonotope(domain):
        if method != "ibp":
            raise LidError(f"bound_logits: a Zonotope is bounded with method='ibp' (over its bounding box), got {method!r}")
        domain = _ibp_box(domain, x)
    if method != "ibp" and mode == "certify":
        raise LidError(
            f"bound_logits: method={method!r} is not available in mode='certify': auto_LiRPA's CROWN "
            "has no floating-point rounding guarantee. Use method='ibp' for certificates, or mode='search'."
        )
    chunks = [x[s] for s in _chunks(len(x), batch_size)]
    los, his = [], []
    if method == "ibp":
        layers = ibp.check_supported(model)
        ctx = rounding.certification_backend() if mode == "certify" else rounding.native_kernels()
        with ctx, (torch.no_grad() if mode == "certify" else _null_ctx()):
            for chunk in chunks:
                lo, hi = ibp.propagate(model, domain, chunk, certify=mode == "certify", layers=layers,
                                       nonneg=_chunk_nonneg(chunk, nonneg, len(chunks)))
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
    if mode == "search":
        _check_search_input(x, los + his, "bound_logits")
    return torch.cat(los), torch.cat(his)


def margin_bounds(
    model: nn.Module,
    domain: Box | Zonotope,
    x: Tensor,
    y: Tensor,
    method: str = "ibp",
    *,
    mode: str = "certify",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    competitors: int | None = None,
    where: str = "bound_margins",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """IBP's logit bounds ``(lo, hi)`` and, for ``method="linear"``, the linear margin bounds
    (N, C; ``-inf`` where not computed). The building block of ``bound_margins`` and of the
    certified counts, which compare ``lo_y > hi_j`` exactly instead of subtracting."""
    domain, x, nonneg = _prepare(model, domain, x, method, MARGIN_METHODS, mode, dtype, batch_size, where)
    if competitors is not None and (isinstance(competitors, bool) or not isinstance(competitors, int) or competitors < 1):
        raise LidError(f"{where}: 'competitors' must be a positive int or None, got {competitors!r}")
    if competitors is not None and mode == "certify":
        raise LidError(f"{where}: 'competitors' only speeds up mode='search'; certification bounds every class")
    if (not isinstance(y, Tensor) or y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex()
            or y.dtype == torch.bool):
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise InvalidInputError(f"{where}: 'y' must be an integer tensor of shape ({len(x)},), got {got}")
    y = y.to(x.device, torch.long)
    layers = ibp.check_supported(model)
    zonotope = domain if _is_zonotope(domain) else None
    box = _ibp_box(domain, x) if zonotope is not None else domain  # what IBP propagates
    if method == "linear":
        layers = linear.walk(model, layers)
        with torch.no_grad():  # one example through IBP: a wrong input shape is named by layer, labels checked early
            _check_label_range(y, ibp.propagate(model, box.detach(), x[:1], certify=False, layers=layers)[0].shape,
                               where)
        # the backward pass holds (examples × competitors × neurons) tensors: bound a few hundred at a time
        batch_size = min(batch_size or len(x), LINEAR_CHUNK)
    ctx = rounding.certification_backend() if mode == "certify" else rounding.native_kernels()
    parts = []
    with ctx, (torch.no_grad() if mode == "certify" else _null_ctx()):
        slices = _chunks(len(x), batch_size)
        for s in slices:
            if method == "linear":
                parts.append(linear_graph.margins(model, box, x[s], y[s], certify=mode == "certify", layers=layers,
                                                   competitors=competitors, zonotope=zonotope))
            else:
                nn = _chunk_nonneg(x[s], nonneg, len(slices))
                parts.append((*ibp.propagate(model, box, x[s], certify=mode == "certify", layers=layers, nonneg=nn),
                              None))
    if mode == "search":
        _check_search_input(x, [t for p in parts for t in p[:2]], where)  # IBP's: the linear one has -inf
    lo, hi = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    _check_label_range(y, lo.shape, where)
    lin = torch.cat([p[2] for p in parts]) if method == "linear" else None
    return lo, hi, lin


def _check_label_range(y: Tensor, out_shape: tuple[int, ...], where: str) -> None:
    if len(out_shape) != 2:
        raise InvalidInputError(f"{where}: the model must output logits of shape (N, n_classes), got {tuple(out_shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= out_shape[1]):
        raise InvalidInputError(f"{where}: labels must lie in 0..{out_shape[1] - 1}, got {int(y.min())}..{int(y.max())}")


def bound_margins(
    model: nn.Module,
    domain: Box | Zonotope,
    x: Tensor,
    y: Tensor,
    method: str = "ibp",
    *,
    mode: str = "certify",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    competitors: int | None = None,
) -> Tensor:
    """(N, C) lower bounds on ``z_y − z_j`` holding for every parameter vector in ``domain``
    (``+inf`` at ``j = y``): an example is certified when its row is positive.

    ``method``: ``"ibp"`` (``lo_y − hi_j``) or ``"linear"`` (the larger of that and the backward
    linear bound; Linear/Conv2d/ReLU models, ``linear.SUPPORTED_LAYERS``; over a ``Zonotope`` it
    minimises the generator terms exactly, jointly over all layers). Both are sound in
    ``mode="certify"``, where the IBP difference is rounded down. ``competitors`` (search mode)
    limits the linear bound to the ``k`` classes IBP finds most dangerous.
    """
    lo, hi, lin = margin_bounds(model, domain, x, y, method, mode=mode, dtype=dtype, batch_size=batch_size,
                                competitors=competitors)
    return combine_margins(lo, hi, y.to(lo.device, torch.long), lin, round_down=mode == "certify")


def combine_margins(lo: Tensor, hi: Tensor, y: Tensor, linear: Tensor | None = None, *,
                    round_down: bool = False) -> Tensor:
    """Margin bounds ``max(lo_y − hi_j, linear_j)`` (``+inf`` at ``j = y``); ``round_down`` makes the
    floating-point difference a guaranteed lower bound (certification)."""
    m = lo.gather(1, y[:, None]) - hi
    if round_down:
        m = rounding.round_down(m)
    if linear is not None:
        m = torch.fmax(m, linear)  # a NaN on one side (an overflow) leaves the other, sound, bound
    return m.masked_fill(torch.nn.functional.one_hot(y, lo.shape[1]).bool(), torch.inf)


def _prepare(model, domain, x, method: str, methods: tuple[str, ...], mode: str, dtype, batch_size, where: str):
    """The checks every entry point shares; returns the domain in ``x``'s device and dtype, ``x``, and
    whether ``x`` ≥ 0 everywhere (which the first affine layer's product uses)."""
    if method not in methods:
        raise LidError(f"{where}: 'method' must be one of {methods}, got {method!r}")
    if mode not in MODES:
        raise LidError(f"{where}: 'mode' must be one of {MODES}, got {mode!r}")
    if not isinstance(domain, (Box, Zonotope)):
        raise DomainMismatchError(f"{where}: 'domain' must be a lid_engine Box or Zonotope, got {type(domain).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise LidError(f"{where}: 'batch_size' must be a positive int or None, got {batch_size!r}")
    domain.check_matches(model, where)
    x, nonneg = _check_input(x, dtype, where, scan=mode == "certify")
    if _is_zonotope(domain):
        if mode != "certify":
            raise LidError(f"{where}: a Zonotope is bounded in mode='certify' only (the LID search optimises boxes)")
        return domain, x, nonneg
    if domain.device != x.device or domain.dtype != x.dtype:
        domain = domain.to(x.device, x.dtype) if mode == "certify" else _cast_keep_grad(domain, x)
    return domain, x, nonneg


def _is_zonotope(domain) -> bool:
    return isinstance(domain, Zonotope)


def _ibp_box(zonotope, x: Tensor) -> Box:
    """The zonotope's bounding box in ``x``'s device and dtype, rounded outward: IBP's input."""
    return zonotope.bounding_box().to(x.device, x.dtype)


def _chunk_nonneg(chunk: Tensor, whole: bool, n_chunks: int) -> bool:
    """Whether a batch is ≥ 0, which picks the first affine layer's product form: decided per batch, so
    that a batch is bounded the same whether it comes with the rest of the set or in a shard or stream
    of its own (their counts then add up to one pass's exactly)."""
    return whole if n_chunks == 1 or whole else bool(chunk.amin() >= 0)


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is None or batch_size >= n:
        return [slice(None)]
    return [slice(i, i + batch_size) for i in range(0, n, batch_size)]


def _check_input(x: Tensor, dtype: torch.dtype | None, where: str = "bound_logits", *,
                 scan: bool = True) -> tuple[Tensor, bool]:
    """``x`` in the bound's dtype and whether ``x ≥ 0`` everywhere.

    ``scan=True`` (certification) reads ``x`` once (``aminmax``): a NaN or inf anywhere is refused,
    and the sign lets the first affine layer use the one-product form for a non-negative input.
    ``scan=False`` (search) skips the finiteness scan — on a small head it costs as much as the
    forward — and reads the whole of ``x`` for its sign only when its first example has no negative
    entry: a mixed-sign input (embeddings, standardised features) is settled by one row and takes
    the midpoint–radius product, which for a point input is the same exact set in real arithmetic.
    A non-finite ``x`` is then found by ``_check_search_input`` from the bounds it produced.
    """
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"{where}: 'x' must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or len(x) == 0:
        raise InvalidInputError(f"{where}: 'x' must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if x.is_complex():
        raise InvalidInputError(f"{where}: 'x' must be real, got {x.dtype}")
    # integers go straight to the bound's dtype: through float32 first, 2**24 + 1 would become 2**24
    dtype = dtype or (x.dtype if x.dtype in rounding.SUPPORTED_DTYPES else torch.float32)
    if dtype not in rounding.SUPPORTED_DTYPES:
        raise InvalidInputError(f"{where}: 'dtype' must be torch.float32 or torch.float64, got {dtype}")
    x = x.to(dtype)
    if not scan:  # one negative entry in the first example settles the sign without reading the rest
        return x, not bool(x[:1].amin() < 0) and bool(x.amin() >= 0)
    lo, hi = torch.aminmax(x)  # one pass: a NaN or inf anywhere shows in the extremes
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        _raise_non_finite(x, where)
    return x, bool(lo >= 0)


def _raise_non_finite(x: Tensor, where: str) -> None:
    bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
    raise InvalidInputError(f"{where}: 'x' holds NaN or inf (first at example {bad})")


def _check_search_input(x: Tensor, outputs: list[Tensor], where: str) -> None:
    """Search mode: refuse a non-finite ``x`` once its bounds show it. A NaN or inf in ``x`` reaches
    the bounds (products with it are NaN or inf), so ``x`` is scanned only when some bound is
    non-finite — reading the small output instead of the whole input on every call. (A non-finite
    entry that no output depends on leaves finite, correct bounds and is not reported.)"""
    with torch.no_grad():
        if bool(torch.isfinite(torch.stack([t.sum() for t in outputs]).sum())):
            return  # a finite sum: every entry is finite
        if not bool(torch.isfinite(x).all()):  # else the bounds overflowed, which search mode reports as inf
            _raise_non_finite(x, where)


def _cast_keep_grad(domain: Box, x: Tensor) -> Box:
    return Box({n: t.to(x.device, x.dtype) for n, t in domain.lower.items()},
               {n: t.to(x.device, x.dtype) for n, t in domain.upper.items()}, check=False)


class _null_ctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


__all__ = ["bound_logits", "bound_margins", "combine_margins", "margin_bounds", "METHODS", "MARGIN_METHODS", "MODES"]
