"""Layers lidgate adds to express models the bound engine can certify.

Multi-head and task-incremental models (the paper's Task-IL setting) share one output layer and
only let the classes of the active task compete. ``TaskMask`` expresses that inside an
``nn.Sequential``: logits outside the active task are replaced by a constant that no in-task logit
can lose to, both in the forward pass and in the bounds, so predictions and certificates agree.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import InvalidInputError


class TaskMask(nn.Module):
    """Keep the logits of the active task's classes; set all others to ``fill``.

    ``tasks`` lists the class indices of each task; ``set_task(t)`` selects the active one
    (``None`` disables masking: all classes compete, i.e. Class-IL).
    """

    def __init__(self, n_classes: int, tasks: Sequence[Sequence[int]], fill: float = -1e4):
        super().__init__()
        if n_classes < 1:
            raise InvalidInputError(f"TaskMask: 'n_classes' must be ≥ 1, got {n_classes}")
        masks = torch.zeros(len(tasks), n_classes, dtype=torch.bool)
        for t, classes in enumerate(tasks):
            for c in classes:
                if not 0 <= int(c) < n_classes:
                    raise InvalidInputError(f"TaskMask: task {t} lists class {c}, outside 0..{n_classes - 1}")
                masks[t, int(c)] = True
        self.register_buffer("masks", masks)
        self.n_classes = n_classes
        if not math.isfinite(float(fill)):  # inf − inf in a margin bound is NaN: no certificate could be given
            raise InvalidInputError(f"TaskMask: 'fill' must be a finite number (the default -1e4 hides a class), got {fill}")
        self.fill = float(fill)
        self.task: int | None = None

    def set_task(self, task: int | None) -> TaskMask:
        if task is not None:
            try:
                task = operator.index(task)
            except TypeError:
                raise InvalidInputError(f"TaskMask.set_task: 'task' must be an integer or None, got {task!r}") from None
        if task is not None and not 0 <= task < len(self.masks):
            raise InvalidInputError(f"TaskMask.set_task: task {task} outside 0..{len(self.masks) - 1}")
        self.task = task
        return self

    def forward(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] != self.n_classes:
            raise InvalidInputError(
                f"TaskMask: built for {self.n_classes} classes but received {logits.shape[-1]} logits "
                f"(shape {tuple(logits.shape)})"
            )
        if self.task is None:
            return logits
        keep = self.masks[self.task].to(logits.device)
        return torch.where(keep, logits, torch.full_like(logits, self.fill))

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, tasks={len(self.masks)}, active={self.task}"
