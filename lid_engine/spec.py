"""Specifications: what must hold for every parameter vector in a domain.

An example is *certified* when, for every θ' in the domain, the true class wins: the lower bound of
its logit exceeds the upper bound of every other logit (the worst-case logit vector's argmax is the
label, strictly, so ties cannot flip the prediction). Certified accuracy is the fraction certified;
certified balanced accuracy averages the per-class certified recall. The differentiable surrogate
used by the search is the softmax probability of the label under the worst-case logits.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .bounds import bound_logits, combine_margins, margin_bounds
from .domains import Box
from .errors import InvalidInputError
from .zonotope import Zonotope

SPEC_KINDS = ("accuracy", "balanced_accuracy")


def check_labels(y: Tensor, n_outputs: int | None, n_examples: int, where: str) -> Tensor:
    """``y`` as int64 class indices, or a clear error; ``n_outputs=None`` skips the range check."""
    if not isinstance(y, Tensor):
        raise InvalidInputError(f"{where}: 'y' must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or len(y) != n_examples:
        raise InvalidInputError(f"{where}: 'y' must have shape ({n_examples},), got {tuple(y.shape)}")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise InvalidInputError(f"{where}: 'y' holds non-integer labels")
        y = y.long()
    y = y.long()
    if n_outputs is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
        raise InvalidInputError(
            f"{where}: labels must lie in 0..{n_outputs - 1} (the model has {n_outputs} outputs), "
            f"got range {int(y.min())}..{int(y.max())}"
        )
    return y


def evaluation_dtypes(model: nn.Module, dtype: torch.dtype) -> list[torch.dtype]:
    """``dtype`` followed by every other precision among the model's floating parameters and buffers.

    A bound computed in one precision covers forward passes in that precision only: a float32 model
    runs in float32 however it was certified, and a float64 model certified in float32 still runs
    in float64 (where, say, an input float32 would flush to zero stays nonzero)."""
    out = [dtype]
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dtype not in out:
            out.append(t.dtype)
    return out


def _certify_bounds(model, domain, x, y, method, dtype, batch_size, where: str) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Sound ``(lo, hi, linear margins or None, labels)`` for the certified metrics."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
        raise InvalidInputError(f"{where}: 'batch_size' must be a positive integer or None, got {batch_size!r}")
    batch_size = None if batch_size is None else int(batch_size)
    if method == "linear":
        labels = check_labels(y, None, len(x), where) if isinstance(x, Tensor) else y  # else: margin_bounds says why
        lo, hi, lin = margin_bounds(model, domain, x, labels, method, mode="certify", dtype=dtype,
                                    batch_size=batch_size, where=where)
    else:  # IBP, or a method bound_logits refuses to certify with (it says why)
        lo, hi = bound_logits(model, domain, x, method, mode="certify", dtype=dtype, batch_size=batch_size)
        lin = None
    if lo.dim() != 2:
        raise InvalidInputError(
            f"{where}: the model must output logits of shape (N, n_classes), got shape {tuple(lo.shape)}"
        )
    return lo, hi, lin, check_labels(y, lo.shape[1], len(lo), where).to(lo.device)


def worst_case_logits(lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
    """Lower bound for the true class, upper bound for every other class."""
    return hi.scatter(1, y[:, None], lo.gather(1, y[:, None]))


def certified_mask(lo: Tensor, hi: Tensor, y: Tensor, linear: Tensor | None = None) -> Tensor:
    """Boolean per example: every θ' in the domain predicts ``y`` (strictly, no ties).

    ``linear``: optional lower bounds on the margins ``z_y − z_j`` (``bound_margins``' linear
    method); class ``j`` is beaten when ``lo_y > hi_j`` *or* its margin bound is positive."""
    true_lo = lo.gather(1, y[:, None]).squeeze(1)
    if linear is None:
        others = hi.scatter(1, y[:, None], torch.full_like(true_lo[:, None], -torch.inf))
        return true_lo > others.max(dim=1).values
    beaten = (true_lo[:, None] > hi) | (linear > 0)  # NaN compares False: never counts as beaten
    return beaten.scatter(1, y[:, None], True).all(dim=1)


def balanced_mean(values: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """Mean over the classes present in ``y`` of the per-class mean of ``values``."""
    counts = torch.bincount(y, minlength=n_classes).to(values.dtype)
    sums = torch.zeros(n_classes, dtype=values.dtype, device=values.device).index_add(0, y, values)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


@dataclass(frozen=True)
class Spec:
    """``kind`` ∈ {"accuracy", "balanced_accuracy"} must reach ``tau`` over the domain.

    ``temperature`` scales the worst-case logits in the soft surrogate (the paper uses 10).
    """

    kind: str = "accuracy"
    tau: float = 0.0
    temperature: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in SPEC_KINDS:
            raise InvalidInputError(f"Spec: 'kind' must be one of {SPEC_KINDS}, got {self.kind!r}")
        if not 0.0 <= float(self.tau) <= 1.0:
            raise InvalidInputError(f"Spec: 'tau' must lie in [0, 1], got {self.tau}")
        if not self.temperature > 0:
            raise InvalidInputError(f"Spec: 'temperature' must be > 0, got {self.temperature}")

    def hard(self, lo: Tensor, hi: Tensor, y: Tensor, linear: Tensor | None = None) -> Tensor:
        """Sound certified metric of the bounds (a 0-dim tensor); ``linear`` as in ``certified_mask``."""
        mask = certified_mask(lo, hi, y, linear).to(lo.dtype)
        if self.kind == "accuracy":
            return mask.mean()
        return balanced_mean(mask, y, lo.shape[1])

    def soft(self, lo: Tensor, hi: Tensor, y: Tensor, linear: Tensor | None = None) -> Tensor:
        """Differentiable surrogate: softmax(T · worst-case logits)[y], averaged like ``hard``.

        That is ``1 / (1 + Σ_j exp(−T·m_j))`` for the margin bounds ``m``, which with ``linear``
        are the larger of ``lo_y − hi_j`` and the linear ones."""
        if linear is None:
            z = worst_case_logits(lo, hi, y) * self.temperature
            p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
        else:
            z = -self.temperature * combine_margins(lo, hi, y, linear)
            p = torch.exp(-torch.logsumexp(torch.cat([torch.zeros_like(z[:, :1]), z], dim=1), dim=1))
        if self.kind == "accuracy":
            return p.mean()
        return balanced_mean(p, y, lo.shape[1])

    def to_dict(self) -> dict:
        return asdict(self)


def certified_accuracy(
    model: nn.Module,
    domain: Box | Zonotope,
    x: Tensor,
    y: Tensor,
    *,
    method: str = "ibp",
    balanced: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int | None = 2048,
) -> float:
    """Sound lower bound on the (balanced) accuracy on ``(x, y)`` of every parameter vector in ``domain``
    (a ``Box`` or a ``Zonotope``).

    ``method``: ``"ibp"`` or ``"linear"`` (tighter on weight-shared layers; see ``bound_margins``)."""
    mask, y, n_classes, _ = certified_in_every_dtype(model, domain, x, y, method, dtype, batch_size,
                                                     "certified_accuracy")
    values = mask.double()
    return float(balanced_mean(values, y, n_classes) if balanced else values.mean())


def certified_examples(
    model: nn.Module, domain: Box | Zonotope, x: Tensor, y: Tensor, *, method: str = "ibp", dtype: torch.dtype | None = None,
    batch_size: int | None = 2048,
) -> Tensor:
    """Boolean mask of the examples certified for every parameter vector in ``domain``."""
    return certified_in_every_dtype(model, domain, x, y, method, dtype, batch_size, "certified_examples")[0]


def certified_in_every_dtype(
    model: nn.Module, domain: Box | Zonotope, x: Tensor, y: Tensor, method: str, dtype: torch.dtype | None,
    batch_size: int | None, where: str,
) -> tuple[Tensor, Tensor, int, list[torch.dtype]]:
    """(mask, labels, n_classes, dtypes): certified in the bound's dtype (``dtype``, else ``x``'s) and
    in every precision the model is stored in (``dtypes``, in that order), so the mask holds for the
    model's own forward pass too. Shared by the certified metrics and ``certificate.certified_counts``."""
    lo, hi, lin, labels = _certify_bounds(model, domain, x, y, method, dtype, batch_size, where)
    mask = certified_mask(lo, hi, labels, lin)
    dtypes = evaluation_dtypes(model, lo.dtype)
    for other in dtypes[1:]:
        if other not in (torch.float32, torch.float64):
            raise InvalidInputError(f"{where}: the model holds {other} tensors; certification supports float32 and "
                                    "float64 arithmetic only")
        lo2, hi2, lin2, _ = _certify_bounds(model, domain, x, y, method, other, batch_size, where)
        mask &= certified_mask(lo2, hi2, labels, lin2).to(mask.device)
    return mask, labels, lo.shape[1], dtypes
