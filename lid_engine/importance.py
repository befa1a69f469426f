"""Importance scores and masks that decide which coordinates of an LID may have width (METHOD.md §3.2).

A box around θ certifies the old task; how useful it is for the *next* task depends on which
coordinates it leaves room in. Scores borrowed from continual-learning regularisers rank the
coordinates:

* ``fisher_importance`` — the diagonal empirical Fisher (EWC): the mean squared per-example gradient
  of the log-likelihood of the true label;
* ``si_importance`` — Synaptic Intelligence: train a throw-away copy for a few steps and accumulate
  −gradient × parameter change along the path.

``importance_mask`` turns scores into the ``mask=`` of ``compute_lid`` (True = frozen, zero width):

* ``"lookahead"`` (scores from upcoming data): freeze the coordinates *least* important for the next
  task, so the width goes where the next update will need it;
* ``"retrospective"`` (scores from old data): freeze the coordinates *most* important for the old
  task, so the box can be wide elsewhere.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .errors import InvalidInputError

MODES = ("lookahead", "retrospective")


def _check_data(x: Tensor, y: Tensor, where: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or len(x) == 0 or len(x) != len(y):
        raise InvalidInputError(f"{where}: x and y must be non-empty tensors of equal length")


def fisher_importance(model: nn.Module, x: Tensor, y: Tensor, *, max_examples: int = 1024, batch_size: int = 256,
                      seed: int = 0) -> dict[str, Tensor]:
    """Diagonal empirical Fisher: mean over examples of (∂ log p(y|x, θ) / ∂θ)²."""
    _check_data(x, y, "fisher_importance")
    if len(x) > max_examples:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_examples]
        x, y = x[idx], y[idx]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    device = next(iter(params.values())).device

    def nll(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_example = vmap(grad(nll), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(x), batch_size):
            g = per_example(params, x[s : s + batch_size].to(device), y[s : s + batch_size].to(device))
            for n in total:
                total[n] += g[n].pow(2).sum(0)
    finally:
        model.train(was_training)
    return {n: t / len(x) for n, t in total.items()}


def si_importance(model: nn.Module, x: Tensor, y: Tensor, *, steps: int = 50, lr: float = 1e-3,
                  batch_size: int = 256, seed: int = 0) -> dict[str, Tensor]:
    """Synaptic Intelligence path integral Σ −g·Δθ on a throw-away copy trained for ``steps`` Adam steps."""
    _check_data(x, y, "si_importance")
    scratch = copy.deepcopy(model).train()
    opt = torch.optim.Adam(scratch.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    device = next(scratch.parameters()).device
    score = {n: torch.zeros_like(p) for n, p in scratch.named_parameters()}
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        opt.zero_grad()
        F.cross_entropy(scratch(x[idx].to(device)), y[idx].to(device)).backward()
        before = {n: p.detach().clone() for n, p in scratch.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in scratch.named_parameters()}
        opt.step()
        for n, p in scratch.named_parameters():
            score[n] += -grads[n] * (p.detach() - before[n])
    return {n: s.clamp(min=0) for n, s in score.items()}


def importance_mask(scores: dict[str, Tensor], frozen_fraction: float, mode: str = "lookahead") -> dict[str, Tensor]:
    """Boolean masks (True = frozen) over a global quantile of the importance scores."""
    if mode not in MODES:
        raise InvalidInputError(f"importance_mask: 'mode' must be one of {MODES}, got {mode!r}")
    if not 0.0 <= frozen_fraction < 1.0:
        raise InvalidInputError(f"importance_mask: 'frozen_fraction' must lie in [0, 1), got {frozen_fraction}")
    flat = torch.cat([s.detach().reshape(-1).double().cpu() for s in scores.values()])
    if not bool(torch.isfinite(flat).all()):
        raise InvalidInputError("importance_mask: scores hold NaN or inf")
    k = int(round(frozen_fraction * flat.numel()))
    order = torch.argsort(flat, stable=True)  # ties broken by position: exactly k frozen
    frozen_flat = torch.zeros(flat.numel(), dtype=torch.bool)
    if mode == "lookahead":
        frozen_flat[order[:k]] = True  # least important for the next task
    else:
        frozen_flat[order[flat.numel() - k :]] = True  # most important for the old task
    masks, offset = {}, 0
    for n, s in scores.items():
        masks[n] = frozen_flat[offset : offset + s.numel()].view(s.shape).to(s.device)
        offset += s.numel()
    return masks


__all__ = ["fisher_importance", "importance_mask", "si_importance"]
