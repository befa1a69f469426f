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

from .bounds import bound_logits
from .domains import Box
from .errors import InvalidInputError

SPEC_KINDS = ("accuracy", "balanced_accuracy")


def check_labels(y: Tensor, n_outputs: int, n_examples: int, where: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise InvalidInputError(f"{where}: 'y' must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or len(y) != n_examples:
        raise InvalidInputError(f"{where}: 'y' must have shape ({n_examples},), got {tuple(y.shape)}")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise InvalidInputError(f"{where}: 'y' holds non-integer labels")
        y = y.long()
    y = y.long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
        raise InvalidInputError(
            f"{where}: labels must lie in 0..{n_outputs - 1} (the model has {n_outputs} outputs), "
            f"got range {int(y.min())}..{int(y.max())}"
        )
    return y


def _certify_logits(model, domain, x, method, dtype, batch_size, where: str) -> tuple[Tensor, Tensor]:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
        raise InvalidInputError(f"{where}: 'batch_size' must be a positive integer or None, got {batch_size!r}")
    lo, hi = bound_logits(model, domain, x, method, mode="certify", dtype=dtype, batch_size=batch_size)
    if lo.dim() != 2:
        raise InvalidInputError(
            f"{where}: the model must output logits of shape (N, n_classes), got shape {tuple(lo.shape)}"
        )
    return lo, hi


def worst_case_logits(lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
    """Lower bound for the true class, upper bound for every other class."""
    return hi.scatter(1, y[:, None], lo.gather(1, y[:, None]))


def certified_mask(lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
    """Boolean per example: every θ' in the domain predicts ``y`` (strictly, no ties)."""
    true_lo = lo.gather(1, y[:, None]).squeeze(1)
    others = hi.scatter(1, y[:, None], torch.full_like(true_lo[:, None], -torch.inf))
    return true_lo > others.max(dim=1).values


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

    def hard(self, lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
        """Sound certified metric of the bounds (a 0-dim tensor)."""
        mask = certified_mask(lo, hi, y).to(lo.dtype)
        if self.kind == "accuracy":
            return mask.mean()
        return balanced_mean(mask, y, lo.shape[1])

    def soft(self, lo: Tensor, hi: Tensor, y: Tensor) -> Tensor:
        """Differentiable surrogate: softmax(T · worst-case logits)[y], averaged like ``hard``."""
        z = worst_case_logits(lo, hi, y) * self.temperature
        p = torch.softmax(z, dim=1).gather(1, y[:, None]).squeeze(1)
        if self.kind == "accuracy":
            return p.mean()
        return balanced_mean(p, y, lo.shape[1])

    def to_dict(self) -> dict:
        return asdict(self)


def certified_accuracy(
    model: nn.Module,
    domain: Box,
    x: Tensor,
    y: Tensor,
    *,
    method: str = "ibp",
    balanced: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int | None = 2048,
) -> float:
    """Sound lower bound on the (balanced) accuracy on ``(x, y)`` of every parameter vector in ``domain``."""
    lo, hi = _certify_logits(model, domain, x, method, dtype, batch_size, "certified_accuracy")
    y = check_labels(y, lo.shape[1], len(lo), "certified_accuracy").to(lo.device)
    return float(Spec("balanced_accuracy" if balanced else "accuracy").hard(lo, hi, y))


def certified_examples(
    model: nn.Module, domain: Box, x: Tensor, y: Tensor, *, dtype: torch.dtype | None = None,
    batch_size: int | None = 2048,
) -> Tensor:
    """Boolean mask of the examples certified for every parameter vector in ``domain``."""
    lo, hi = _certify_logits(model, domain, x, "ibp", dtype, batch_size, "certified_examples")
    y = check_labels(y, lo.shape[1], len(lo), "certified_examples").to(lo.device)
    return certified_mask(lo, hi, y)
