"""Training and evaluation shared by every continual-learning method (METHOD.md §5.1 recipe).

The paper trains each task with Adam (lr 1e-3, batch 64) plus two regularisers: an L2 penalty on
the parameter norm and an "unbias" term that pulls the softmax on uniform-noise inputs towards the
uniform distribution. Every method here trains with the same recipe, so the comparison is between
the continual-learning mechanisms, not between training set-ups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lid_engine import TaskMask
from lid_engine import accuracy as plain_accuracy


@dataclass
class Recipe:
    """How one task is trained (defaults: the paper's MNIST recipe, METHOD.md §5.1)."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    l2: float = 0.01
    unbias: float = 0.01
    unbias_batch: int = 16


def task_mask(model: nn.Module) -> TaskMask | None:
    """The model's ``TaskMask`` (Task-IL models end in one), or None."""
    last = model[-1] if isinstance(model, nn.Sequential) else None
    return last if isinstance(last, TaskMask) else None


def set_task(model: nn.Module, task: int | None) -> None:
    mask = task_mask(model)
    if mask is not None:
        mask.set_task(task)


def raw_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Logits before any task mask: what distillation and multi-task losses compare."""
    return model[:-1](x) if task_mask(model) is not None else model(x)


def regularisers(model: nn.Module, recipe: Recipe, x_shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """λ₂‖θ‖₂ + λ_u · KL(uniform ‖ softmax(f(u))) on inputs u ~ U[0, 1]."""
    total = torch.zeros(())
    if recipe.l2:
        # vector_norm's gradient at θ = 0 is 0; sqrt(Σθ²) would give NaN there
        total = total + recipe.l2 * torch.linalg.vector_norm(torch.cat([p.reshape(-1) for p in model.parameters()]))
    if recipe.unbias:
        u = torch.rand((recipe.unbias_batch, *x_shape), generator=gen)
        logp = F.log_softmax(raw_logits(model, u), dim=1)
        total = total + recipe.unbias * (-logp.mean(1) - math.log(logp.shape[1])).mean()
    return total


def train_task(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    recipe: Recipe,
    *,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    extra_loss: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
    replay: tuple[Tensor, Tensor] | None = None,
    replay_ratio: float = 1.0,
    epochs: int | None = None,
) -> None:
    """Minibatch training on one task. ``extra_loss`` adds a method's penalty (EWC, LwF);
    ``before_step`` may edit the gradients (A-GEM); ``optimizer`` may be a ``ProjectedOptimizer``;
    ``replay`` examples are mixed into every minibatch, ``replay_ratio`` old ones per new one."""
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=recipe.lr)
    model.train()
    for _ in range(epochs if epochs is not None else recipe.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), recipe.batch_size):
            idx = perm[s : s + recipe.batch_size]
            xb, yb = x[idx], y[idx]
            if replay is not None and len(replay[0]):
                r = torch.randint(len(replay[0]), (max(1, round(len(idx) * replay_ratio)),), generator=gen)
                xb, yb = torch.cat([xb, replay[0][r]]), torch.cat([yb, replay[1][r]])
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb) + regularisers(model, recipe, tuple(x.shape[1:]), gen)
            if extra_loss is not None:
                loss = loss + extra_loss(model, xb, yb)
            loss.backward()
            if before_step is not None:
                before_step(model)
            opt.step()
    model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, task: int | None = None) -> float:
    """``lid_engine.accuracy`` with the task mask set to ``task`` (Task-IL), restored afterwards."""
    mask = task_mask(model)
    previous = mask.task if mask is not None else None
    set_task(model, task)
    try:
        return plain_accuracy(model, x, y)
    finally:
        set_task(model, previous)
